"""``aziza-admin engine selftest``: the engine's correctness checks, runnable on any device.

Calls start at different ticks, a slot is reused after its call ends, and some calls skip ticks (their
slot frozen). Checks, per dtype:

* ``isolation``: every call run alone in the same B-slot engine (same kernels, same CUDA graphs, the other
  slots idle) gives exactly the tokens it got in the full batch. Exact on every device: a row's result
  must not depend on its neighbours. Slot reuse under CUDA graphs is part of it (calls d and e).
* ``reference``: each call against moshi's own single-stream ``LMGen`` at B=1 on an identical copy of the
  weights. Exact on CPU; on CUDA, B=1 and B=N pick different GEMM kernels, so an agreement rate is reported
  (tokens are autoregressive: one flipped token changes what follows) and must reach ``CUDA_MIN_AGREEMENT``.
* ``idle_finite``: after the run, every floating streaming-state tensor (all rows, idle ones included) and
  every output sample is finite.
* ``cuda_graphs``: on CUDA, the LM's step was really captured and replayed as a graph.

The last key of the JSON is ``ok``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
from moshi.models.lm import LMGen

from engine.moshi.backend import MoshiBackend, resolve_device
from engine.moshi.bench import open_model
from engine.moshi.loader import LoadedModel
from engine.protocol import FRAME_SAMPLES, PersonaParams

CUDA_MIN_AGREEMENT = 0.8


@dataclass(frozen=True)
class Call:
    name: str
    slot: int
    start: int  # tick of the first frame
    frames: int
    skip: frozenset[int] = frozenset()  # ticks on which the call has no frame (slot frozen)

    def ticks(self) -> list[int]:
        out: list[int] = []
        t = self.start
        while len(out) < self.frames:
            if t not in self.skip:
                out.append(t)
            t += 1
        return out


SCHEDULE = (
    Call("a", slot=0, start=0, frames=8),
    Call("b", slot=1, start=2, frames=9, skip=frozenset({5, 6, 9})),
    Call("c", slot=2, start=3, frames=4),
    Call("d", slot=0, start=9, frames=6),  # slot 0 reused after "a"
    Call("e", slot=2, start=7, frames=7, skip=frozenset({10})),  # slot 2 reused right after "c"
)
NUM_SLOTS = 3


def call_audio(name: str, frames: int) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, name)))
    t = np.arange(frames * FRAME_SAMPLES) / 24_000
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
    return (tone + rng.normal(0, 0.05, t.size)).astype(np.float32).reshape(frames, FRAME_SAMPLES)


Tokens = dict[str, np.ndarray]  # call -> (generated frames, 1 + dep_q)


def run_schedule(backend: MoshiBackend, calls: tuple[Call, ...] | list[Call]) -> tuple[Tokens, bool]:
    """Step ``calls`` through ``backend``; returns each call's generated tokens and whether all output
    PCM was finite."""
    audio = {c.name: call_audio(c.name, c.frames) for c in calls}
    tokens: dict[str, list[np.ndarray]] = {c.name: [] for c in calls}
    finite = True
    last = max(max(c.ticks()) for c in calls)
    for tick in range(last + 1):
        frames, owner = {}, {}
        for call in calls:
            ticks = call.ticks()
            if tick == call.start:
                backend.start_slot(call.slot, PersonaParams())
            if tick in ticks:
                frames[call.slot] = audio[call.name][ticks.index(tick)]
                owner[call.slot] = call.name
        outputs = backend.step(frames)
        for slot, name in owner.items():
            finite = finite and bool(np.isfinite(outputs[slot].pcm).all())
            tok = backend.last_tokens[slot]
            if (tok[1:] >= 0).all():
                tokens[name].append(tok.copy())
        for call in calls:
            if tick == call.ticks()[-1]:
                backend.end_slot(call.slot)
    return {k: np.stack(v) if v else np.zeros((0, 0), np.int64) for k, v in tokens.items()}, finite


def reference_tokens(loaded: LoadedModel, audio: np.ndarray) -> np.ndarray:
    """moshi's own single-stream path: Mimi + LMGen at B=1, greedy; ticks without output dropped."""
    gen = LMGen(loaded.lm, temp=0.0, temp_text=0.0)
    out_tokens = []
    device = loaded.lm.device
    with torch.no_grad(), loaded.mimi.streaming(1), gen.streaming(1):
        for frame in audio:
            codes = loaded.mimi.encode(torch.from_numpy(frame).to(device).view(1, 1, -1))
            out = gen.step(codes)
            if out is not None:
                out_tokens.append(out[0, :, 0].cpu().numpy().copy())
    return np.stack(out_tokens)


def states_finite(backend: MoshiBackend) -> tuple[bool, str]:
    for module in (backend.mimi, backend.lm_gen, backend.lm):
        for name, state in module.get_streaming_state().items():
            for key, value in vars(state).items():
                tensor = getattr(value, "cache", value)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    if not bool(torch.isfinite(tensor.float()).all()):
                        return False, f"{name}.{key}"
    return True, ""


def _agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """Fraction of equal tokens, and the number of leading frames that match entirely."""
    n = min(len(got), len(want))
    if n == 0:
        return 0.0, 0
    eq = got[:n] == want[:n]
    rows = eq.all(axis=1)
    lead = int(np.argmin(rows)) if not rows.all() else n
    return float(eq.mean()), lead


def check_dtype(model: str, dtype_name: str, device: torch.device) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    t0 = time.perf_counter()
    with open_model(model, dtype_name, device) as loaded:
        backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, NUM_SLOTS)
        try:
            together, pcm_finite = run_schedule(backend, SCHEDULE)
            finite, where = states_finite(backend)
            checks["idle_finite"] = {"ok": finite and pcm_finite,
                                     "detail": where or ("" if pcm_finite else "output PCM not finite")}
            mismatched = []
            for call in SCHEDULE:
                alone, _ = run_schedule(backend, [call])
                if not np.array_equal(alone[call.name], together[call.name]):
                    mismatched.append(call.name)
            checks["isolation"] = {"ok": not mismatched, "mismatched_calls": mismatched,
                                   "calls": len(SCHEDULE)}
            if device.type == "cuda":
                state = backend.lm_gen._streaming_state
                captured = state is not None and state.graphed_main._graph is not None
                checks["cuda_graphs"] = {"ok": bool(captured) or os.environ.get("NO_CUDA_GRAPH", "") != "",
                                         "captured": bool(captured)}
        finally:
            backend.close()
    with open_model(model, dtype_name, device) as ref_model:
        rates, leads = [], []
        for call in SCHEDULE:
            want = reference_tokens(ref_model, call_audio(call.name, call.frames))
            rate, lead = _agreement(together[call.name], want)
            rates.append(rate)
            leads.append(lead)
        agreement = float(np.mean(rates))
        exact = all(r == 1.0 for r in rates)
        need_exact = device.type != "cuda"
        checks["reference"] = {
            "ok": exact if need_exact else agreement >= CUDA_MIN_AGREEMENT,
            "agreement": round(agreement, 4), "exact": exact, "leading_frames_equal": leads,
            "required": "exact" if need_exact else f">= {CUDA_MIN_AGREEMENT}"}
    return {"dtype": dtype_name, "seconds": round(time.perf_counter() - t0, 2), "checks": checks,
            "ok": all(c["ok"] for c in checks.values())}


def run_selftest(device: str = "auto", model: str = "tiny",
                 dtypes: list[str] | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    names = dtypes or (["bf16", "fp8"] if dev.type == "cuda" else ["fp32", "fp8"])
    runs = []
    for name in names:
        try:
            runs.append(check_dtype(model, name, dev))
        except Exception as exc:  # a crash is a failed check, reported with the rest
            runs.append({"dtype": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    info: dict[str, Any] = {"device": str(dev), "model": model, "torch": torch.__version__}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return {**info, "runs": runs, "ok": all(r["ok"] for r in runs)}
