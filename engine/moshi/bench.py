"""Engine benchmark: per-tick time by batch size, real-time factor, memory per slot, batching efficiency.

Every slot holds a live call fed noise; each tick steps all B slots (encode + LM + decode), timed with
``perf_counter`` (``cuda.synchronize`` on GPU). Efficiency = B × (B=1 tick) / (B tick): 1.0 means batching
bought nothing, B means B calls cost one.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch

from engine.moshi.backend import MoshiBackend, resolve_device
from engine.moshi.loader import load_model
from engine.protocol import FRAME_MS, FRAME_SAMPLES, PersonaParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": None}


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
    device_peak_bytes: int | None  # CUDA only

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(model_dir: Path, slots: int, dtype_name: str, ticks: int, warmup: int, device: torch.device,
              single_tick_ms: float | None) -> BenchResult:
    compute = DTYPES[dtype_name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = load_model(model_dir, device=device, dtype=compute)
    if dtype_name == "fp8":
        from engine.moshi.fp8 import quantize_lm_fp8

        quantize_lm_fp8(loaded.lm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, slots)
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, (slots, FRAME_SAMPLES)).astype(np.float32)
    times: list[float] = []
    try:
        for slot in range(slots):
            backend.start_slot(slot, PersonaParams())
        frames = {slot: audio[slot] for slot in range(slots)}
        for i in range(warmup + ticks):
            _sync(device)
            t0 = time.perf_counter()
            backend.step(frames)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        per_slot = state_bytes(backend) // slots
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    finally:
        backend.close()
    p50 = statistics.median(times)
    base = single_tick_ms if single_tick_ms is not None else p50
    return BenchResult(slots=slots, dtype=dtype_name, device=str(device), ticks=ticks,
                       tick_p50_ms=round(p50, 3),
                       tick_p99_ms=round(_percentile(times, 99), 3), realtime_factor=round(FRAME_MS / p50, 3),
                       batching_efficiency=round(slots * base / p50, 3), state_bytes_per_slot=per_slot,
                       device_peak_bytes=peak)


def run_bench(model: str, slot_counts: list[int], dtype: str, ticks: int, warmup: int = 5,
              device: str = "auto") -> list[BenchResult]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if not slot_counts or min(slot_counts) < 1:
        raise ValueError("slot counts must be >= 1")
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="aziza-tiny-") as tmp:
        if model == "tiny":
            from engine.moshi.tiny import write_tiny_model

            model_dir = write_tiny_model(tmp)
        else:
            model_dir = Path(model)
        # B=1 first: the baseline for batching efficiency.
        single = bench_one(model_dir, 1, dtype, ticks, warmup, dev, None)
        results = [single] if 1 in slot_counts else []
        for b in sorted(set(slot_counts) - {1}):
            results.append(bench_one(model_dir, b, dtype, ticks, warmup, dev, single.tick_p50_ms))
    return results


def format_table(results: list[BenchResult]) -> str:
    head = (f"{'slots':>5} {'dtype':>5} {'p50 ms':>8} {'p99 ms':>8} {'RTF':>7} {'batch eff':>9} "
            f"{'state/slot':>11}")
    rows = [head]
    for r in results:
        rows.append(f"{r.slots:>5} {r.dtype:>5} {r.tick_p50_ms:>8.2f} {r.tick_p99_ms:>8.2f} "
                    f"{r.realtime_factor:>7.2f} {r.batching_efficiency:>9.2f} "
                    f"{r.state_bytes_per_slot / 2**20:>8.2f} MiB")
    return "\n".join(rows)
