"""Engine benchmark: per-tick time by batch size and dtype, real-time factor, memory, batching efficiency.

Every slot holds a live call fed noise, sampling with Moshi's defaults (each slot its own seed); each tick
steps all B slots (encode + LM + decode), timed with
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

from engine.moshi.backend import MOSHI_DEFAULTS, AdapterOptions, MoshiBackend, resolve_device
from engine.moshi.loader import LoadedModel, load_model
from engine.moshi.sampling import SamplingParams
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
    adapters: int = 0  # distinct LoRA adapters in the batch (every slot uses one when > 0)
    kv_dtype: str = "auto"
    adapter_load_ms: float | None = None  # cold start of a call with an adapter: read + check + install
    prefix_start_ms: float | None = None  # start of a call from the persona prefix cache (B=1 row only)
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
                # RingKVCache keeps its tensor in .cache (and the FP8 one its scales in .scale)
                for tensor in (value, getattr(value, "cache", None), getattr(value, "scale", None)):
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
def open_model(model: str, dtype_name: str, device: torch.device, kv_dtype: str = "auto"
               ) -> Iterator[LoadedModel]:
    """The model at ``dtype_name`` (fp8: bf16/fp32 compute with the temporal transformer in FP8), its KV
    cache in FP8 when ``kv_dtype`` is fp8."""
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
        if kv_dtype == "fp8":
            from engine.moshi.kv_fp8 import use_fp8_kv

            use_fp8_kv(loaded.lm)
        try:
            yield loaded
        finally:
            del loaded
            _free(device)


ADAPTER_RANK = 16


def write_random_adapters(loaded: LoadedModel, directory: Path, count: int, rank: int = ADAPTER_RANK,
                          targets: tuple[str, ...] = ("transformer.*",), scale: float = 0.01) -> list[str]:
    """``count`` random rank-``rank`` adapters for ``loaded``'s shapes, written in the served format under
    ``directory/adapters``; returns their ids."""
    import fnmatch

    from engine.moshi.lora import base_identity, linear_shapes, write_adapter

    base = base_identity(loaded.files.config, loaded.lm_sha256)
    shapes = {n: s for n, s in linear_shapes(loaded.lm).items()
              if any(fnmatch.fnmatchcase(n, p) for p in targets)}
    ids = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        weights = {n: (torch.randn(rank, inp, generator=gen) * scale,
                       torch.randn(out, rank, generator=gen) * scale) for n, (out, inp) in shapes.items()}
        write_adapter(directory / "adapters" / f"bench-{i}", weights, rank=rank, alpha=rank, base=base)
        ids.append(f"bench-{i}")
    return ids


def write_voice(directory: Path, seconds: float = 2.0) -> str:
    """A synthetic voice prompt (a chirp), stored as the admin CLI stores them; returns its id."""
    import wave

    (directory / "voices").mkdir(parents=True, exist_ok=True)
    t = np.arange(int(24_000 * seconds)) / 24_000
    pcm = (0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) * 32767).astype("<i2")
    with wave.open(str(directory / "voices" / "bench.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24_000)
        wav.writeframes(pcm.tobytes())
    return "bench.wav"


def bench_backend(loaded: LoadedModel, slots: int, dtype_name: str, ticks: int, warmup: int,
                  device: torch.device, single_tick_ms: float | None, *, kv_dtype: str = "auto",
                  adapters: list[str] | None = None, data_dir: Path | None = None,
                  sampling: SamplingParams = MOSHI_DEFAULTS) -> BenchResult:
    """Every slot a live call fed noise, sampling on; with ``adapters``, slot i uses adapter i % n (every
    row adapted: the worst case). Also times a cold adapter load and a start from the prefix cache."""
    from engine.assets import AssetStore
    from engine.moshi.lora import base_identity

    if device.type == "cuda":
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    assets = AssetStore(data_dir) if data_dir is not None else None
    options = None
    if adapters:
        options = AdapterOptions(pages=len(adapters), max_rank=ADAPTER_RANK,
                                 base=base_identity(loaded.files.config, loaded.lm_sha256))
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, slots, sampling=sampling, assets=assets,
                           adapters=options, kv_fp8=False)
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, (slots, FRAME_SAMPLES)).astype(np.float32)
    times: list[float] = []
    starts: list[float] = []
    adapter_ms: list[float] = []
    prefix_start_ms: float | None = None
    try:
        for slot in range(slots):
            persona = PersonaParams(adapter_id=adapters[slot % len(adapters)] if adapters else None)
            warnings = backend.start_slot(slot, persona, seed=slot)
            if warnings:
                raise RuntimeError(f"slot {slot}: {warnings[0]}")
            starts.append(backend.last_start_ms)
            if adapters and slot < len(adapters):
                adapter_ms.append(backend.last_start_ms)  # cold: read + check + copy into its page
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
        if assets is not None and slots == 1:
            persona = PersonaParams(voice_prompt_id=write_voice(assets.data_dir))
            backend.prepare_persona(persona)  # builds the prefix (B=1 side stream, eager)
            backend.start_slot(0, persona)
            _sync(device)
            prefix_start_ms = round(backend.last_start_ms, 3)
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
                       start_slot_ms=round(statistics.median(starts[1:] or starts), 3), phase_ms=phases,
                       adapters=len(adapters or []), kv_dtype=kv_dtype,
                       adapter_load_ms=round(max(adapter_ms), 3) if adapter_ms else None,
                       prefix_start_ms=prefix_start_ms)


def _error_row(slots: int, dtype_name: str, device: torch.device, exc: BaseException, kv_dtype: str,
               adapters: int) -> BenchResult:
    return BenchResult(slots=slots, dtype=dtype_name, device=str(device), ticks=0, tick_p50_ms=0.0,
                       tick_p99_ms=0.0, realtime_factor=0.0, batching_efficiency=0.0, state_bytes_per_slot=0,
                       device_peak_bytes=None, kv_dtype=kv_dtype, adapters=adapters,
                       error=f"{type(exc).__name__}: {str(exc)[:300]}")


def run_bench(model: str, slot_counts: list[int], dtypes: list[str] | str, ticks: int, warmup: int = 5,
              device: str = "auto", progress: Callable[[str], None] | None = None,
              kv_dtypes: list[str] | None = None,
              adapter_counts: list[int] | None = None) -> list[BenchResult]:
    """One row per (dtype, KV dtype, adapters, slot count). A slot count that fails (out of memory) gives a
    row with ``error`` and the larger counts of that combination are skipped; the others still run."""
    names = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    kvs = kv_dtypes or ["auto"]
    for kv in kvs:
        if kv not in ("auto", "fp8"):
            raise ValueError(f"kv dtype must be auto or fp8; got {kv!r}")
    counts = adapter_counts or [0]
    if min(counts) < 0:
        raise ValueError("adapter counts must be >= 0")
    if not slot_counts or min(slot_counts) < 1:
        raise ValueError("slot counts must be >= 1")
    dev = resolve_device(device)
    say = progress or (lambda _msg: None)
    results: list[BenchResult] = []
    for name in names:
        for kv in kvs:
            t0 = time.perf_counter()
            with open_model(model, name, dev, kv) as loaded, \
                    tempfile.TemporaryDirectory(prefix="aziza-bench-data-") as data:
                say(f"{model} {name} kv={kv}: model ready in {time.perf_counter() - t0:.1f} s")
                adapter_ids = write_random_adapters(loaded, Path(data), max(counts)) if max(counts) else []
                for count in counts:
                    single: float | None = None
                    for b in [1, *sorted(set(slot_counts) - {1})]:  # B=1 first: the efficiency baseline
                        try:
                            row = bench_backend(loaded, b, name, ticks, warmup, dev, single, kv_dtype=kv,
                                                adapters=adapter_ids[:count], data_dir=Path(data))
                        except (torch.OutOfMemoryError, RuntimeError) as exc:
                            _free(dev)
                            results.append(_error_row(b, name, dev, exc, kv, count))
                            say(f"{name} kv={kv} adapters={count} slots={b}: {results[-1].error}")
                            break
                        if b == 1:
                            single = row.tick_p50_ms
                        if b in slot_counts:
                            results.append(row)
                        say(f"{name} kv={kv} adapters={count} slots={b}: p50 {row.tick_p50_ms:.2f} ms "
                            f"p99 {row.tick_p99_ms:.2f} ms phases {row.phase_ms}")
    return results


def fp8_kv_agreement(model: str, device: str = "auto", ticks: int = 12) -> dict[str, Any]:
    """Teacher-forced token agreement of the FP8 KV cache against the compute-dtype cache (same weights)."""
    from engine.moshi.agreement import fp8_kv, teacher_forced_agreement

    dev = resolve_device(device)
    dtype = "bf16" if dev.type == "cuda" else "fp32"

    def load() -> LoadedModel:
        with open_model(model, dtype, dev) as loaded:
            return loaded

    result = teacher_forced_agreement(load, fp8_kv, ticks)
    return {"reference_kv": dtype, "tokens": round(result.tokens, 4), "text": round(result.text, 4),
            "text_logit_rel_error": round(result.text_logit_rel_error, 5), "ticks": result.ticks}


def summarize(results: list[BenchResult]) -> dict[str, Any]:
    """Side-by-side ratios of one run: FP8 vs bf16 throughput, adapters vs none, FP8 KV vs full KV."""
    ok = [r for r in results if r.error is None]
    by = {(r.dtype, r.kv_dtype, r.adapters, r.slots): r for r in ok}
    fp8: dict[str, float] = {}
    adapter_cost: dict[str, float] = {}
    kv_cost: dict[str, float] = {}
    for (dtype, kv, adapters, slots), r in by.items():
        other = by.get(("bf16", kv, adapters, slots))
        if dtype == "fp8" and other is not None and kv == "auto" and adapters == 0:
            fp8[str(slots)] = round(other.tick_p50_ms / r.tick_p50_ms, 3)
        plain = by.get((dtype, kv, 0, slots))
        if adapters > 0 and plain is not None:
            adapter_cost[f"{dtype}/{kv}/{adapters}/{slots}"] = round(r.tick_p50_ms / plain.tick_p50_ms, 3)
        full = by.get((dtype, "auto", adapters, slots))
        if kv == "fp8" and full is not None:
            kv_cost[f"{dtype}/{adapters}/{slots}"] = round(r.tick_p50_ms / full.tick_p50_ms, 3)
    loads = [r.adapter_load_ms for r in ok if r.adapter_load_ms is not None]
    starts = [r.prefix_start_ms for r in ok if r.prefix_start_ms is not None]
    return {"fp8_vs_bf16_throughput": fp8, "adapter_tick_ratio": adapter_cost, "fp8_kv_tick_ratio": kv_cost,
            "adapter_load_ms_max": max(loads) if loads else None,
            "prefix_start_ms_max": max(starts) if starts else None}


def format_table(results: list[BenchResult]) -> str:
    head = (f"{'slots':>5} {'dtype':>5} {'kv':>4} {'ad':>2} {'p50 ms':>8} {'p99 ms':>8} {'RTF':>7} "
            f"{'batch eff':>9} {'state/slot':>11} {'peak':>10}  phases (ms)")
    rows = [head]
    for r in results:
        if r.error:
            rows.append(f"{r.slots:>5} {r.dtype:>5} {r.kv_dtype:>4} {r.adapters:>2} error: {r.error}")
            continue
        peak = f"{r.device_peak_bytes / 2**30:7.2f} GiB" if r.device_peak_bytes else f"{'-':>10}"
        phases = " ".join(f"{k} {v:.2f}" for k, v in r.phase_ms.items())
        rows.append(f"{r.slots:>5} {r.dtype:>5} {r.kv_dtype:>4} {r.adapters:>2} {r.tick_p50_ms:>8.2f} "
                    f"{r.tick_p99_ms:>8.2f} {r.realtime_factor:>7.2f} {r.batching_efficiency:>9.2f} "
                    f"{r.state_bytes_per_slot / 2**20:>8.2f} MiB {peak}  {phases}")
    return "\n".join(rows)


def stderr_progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
