"""Engine benchmark: per-tick time by batch size and dtype, real-time factor, memory, batching efficiency.

Every slot holds a live call fed noise; each tick steps all B slots (encode + LM + decode), timed with
``perf_counter`` (``cuda.synchronize`` on GPU). Efficiency = B × (B=1 tick) / (B tick): 1.0 means batching
bought nothing, B means B calls cost one. A few extra ticks run with per-phase timing (encode, LM, decode;
each phase synchronized, so those ticks are not in the p50/p99).

Models: ``tiny`` (written to a temp dir and loaded through the real loader), ``random:<shape>`` (built in
memory at a named shape, e.g. ``random:moshi-7b``: no download), or a weights directory.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch

from engine.moshi.backend import MoshiBackend, resolve_device
from engine.moshi.loader import LoadedModel, load_model
from engine.protocol import FRAME_MS, FRAME_SAMPLES, PersonaParams

DTYPES = ("fp32", "bf16", "fp8")
_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHASE_TICKS = 5


@dataclass(frozen=True)
class BenchResult:
    slots: int
    dtype: str
    device: str
    ticks: int
    tick_p50_ms: float
    tick_p99_ms: float
    realtime_factor: float  # 80 ms / p50 tick: > 1 keeps up with real time
    batching_efficiency: float
    state_bytes_per_slot: int  # streaming state (KV caches, conv history, token cache) / slot
    device_peak_bytes: int | None  # CUDA only: weights + state + graphs + activations
    weight_bytes: int = 0
    start_slot_ms: float = 0.0  # reset of one slot (no persona)
    phase_ms: dict[str, float] = field(default_factory=dict)  # p50 of encode / lm / decode
    adapters: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def state_bytes(backend: MoshiBackend) -> int:
    total = 0
    for module in (backend.mimi, backend.lm_gen, backend.lm):
        for state in module.get_streaming_state().values():
            for value in vars(state).values():
                tensor = getattr(value, "cache", value)  # RingKVCache keeps its tensor in .cache
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(loaded: LoadedModel) -> int:
    total = 0
    for module in (loaded.lm, loaded.mimi):
        seen: set[int] = set()
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def open_model(model: str, dtype_name: str, device: torch.device) -> Iterator[LoadedModel]:
    """The model at ``dtype_name`` (fp8: bf16/fp32 compute with the temporal transformer in FP8)."""
    compute = _COMPUTE.get(dtype_name) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory(prefix="aziza-tiny-") as tmp:
        from engine.moshi.shapes import RANDOM_PREFIX, build_random_model, is_random_ref

        if is_random_ref(model):
            loaded = build_random_model(model[len(RANDOM_PREFIX):], device, compute)
        else:
            if model == "tiny":
                from engine.moshi.tiny import write_tiny_model

                model_dir = write_tiny_model(tmp)
            else:
                model_dir = Path(model)
            loaded = load_model(model_dir, device=device, dtype=compute)
        if dtype_name == "fp8":
            from engine.moshi.fp8 import quantize_lm_fp8

            quantize_lm_fp8(loaded.lm)
        try:
            yield loaded
        finally:
            del loaded
            _free(device)


def bench_backend(loaded: LoadedModel, slots: int, dtype_name: str, ticks: int, warmup: int,
                  device: torch.device, single_tick_ms: float | None) -> BenchResult:
    if device.type == "cuda":
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, slots)
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, (slots, FRAME_SAMPLES)).astype(np.float32)
    times: list[float] = []
    starts: list[float] = []
    try:
        for slot in range(slots):
            backend.start_slot(slot, PersonaParams())
            starts.append(backend.last_start_ms)
        frames = {slot: audio[slot] for slot in range(slots)}
        for i in range(warmup + ticks):
            _sync(device)
            t0 = time.perf_counter()
            backend.step(frames)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        backend.phase_ms = {}
        for _ in range(PHASE_TICKS):
            backend.step(frames)
        phases = {k: round(statistics.median(v), 3) for k, v in backend.phase_ms.items()}
        backend.phase_ms = None
        per_slot = state_bytes(backend) // slots
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    finally:
        backend.close()
        del backend
        _free(device)
    p50 = statistics.median(times)
    base = single_tick_ms if single_tick_ms is not None else p50
    return BenchResult(slots=slots, dtype=dtype_name, device=str(device), ticks=ticks,
                       tick_p50_ms=round(p50, 3), tick_p99_ms=round(_percentile(times, 99), 3),
                       realtime_factor=round(FRAME_MS / p50, 3),
                       batching_efficiency=round(slots * base / p50, 3), state_bytes_per_slot=per_slot,
                       device_peak_bytes=peak, weight_bytes=weight_bytes(loaded),
                       start_slot_ms=round(statistics.median(starts[1:] or starts), 3), phase_ms=phases)


def _error_row(slots: int, dtype_name: str, device: torch.device, exc: BaseException) -> BenchResult:
    return BenchResult(slots=slots, dtype=dtype_name, device=str(device), ticks=0, tick_p50_ms=0.0,
                       tick_p99_ms=0.0, realtime_factor=0.0, batching_efficiency=0.0, state_bytes_per_slot=0,
                       device_peak_bytes=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")


def run_bench(model: str, slot_counts: list[int], dtypes: list[str] | str, ticks: int, warmup: int = 5,
              device: str = "auto", progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """One row per (dtype, slot count). A slot count that fails (out of memory) gives a row with
    ``error`` and the larger counts of that dtype are skipped; the other dtypes still run."""
    names = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if not slot_counts or min(slot_counts) < 1:
        raise ValueError("slot counts must be >= 1")
    dev = resolve_device(device)
    say = progress or (lambda _msg: None)
    results: list[BenchResult] = []
    for name in names:
        t0 = time.perf_counter()
        with open_model(model, name, dev) as loaded:
            say(f"{model} {name}: model ready in {time.perf_counter() - t0:.1f} s")
            single: float | None = None
            for b in [1, *sorted(set(slot_counts) - {1})]:  # B=1 first: the efficiency baseline
                try:
                    row = bench_backend(loaded, b, name, ticks, warmup, dev, single)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    _free(dev)
                    results.append(_error_row(b, name, dev, exc))
                    say(f"{name} slots={b}: {results[-1].error}")
                    break
                if b == 1:
                    single = row.tick_p50_ms
                if b in slot_counts:
                    results.append(row)
                say(f"{name} slots={b}: p50 {row.tick_p50_ms:.2f} ms p99 {row.tick_p99_ms:.2f} ms "
                    f"phases {row.phase_ms}")
    return results


def summarize(results: list[BenchResult]) -> dict[str, Any]:
    """Side-by-side ratios of one run: FP8 vs bf16 throughput at each slot count both measured."""
    by = {(r.dtype, r.slots): r for r in results if r.error is None}
    ratios = {}
    for (dtype, slots), r in by.items():
        other = by.get(("bf16", slots))
        if dtype == "fp8" and other is not None:
            ratios[str(slots)] = round(other.tick_p50_ms / r.tick_p50_ms, 3)
    return {"fp8_vs_bf16_throughput": ratios}


def format_table(results: list[BenchResult]) -> str:
    head = (f"{'slots':>5} {'dtype':>5} {'p50 ms':>8} {'p99 ms':>8} {'RTF':>7} {'batch eff':>9} "
            f"{'state/slot':>11} {'peak':>10}  phases (ms)")
    rows = [head]
    for r in results:
        if r.error:
            rows.append(f"{r.slots:>5} {r.dtype:>5} error: {r.error}")
            continue
        peak = f"{r.device_peak_bytes / 2**30:7.2f} GiB" if r.device_peak_bytes else f"{'-':>10}"
        phases = " ".join(f"{k} {v:.2f}" for k, v in r.phase_ms.items())
        rows.append(f"{r.slots:>5} {r.dtype:>5} {r.tick_p50_ms:>8.2f} {r.tick_p99_ms:>8.2f} "
                    f"{r.realtime_factor:>7.2f} {r.batching_efficiency:>9.2f} "
                    f"{r.state_bytes_per_slot / 2**20:>8.2f} MiB {peak}  {phases}")
    return "\n".join(rows)


def stderr_progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
