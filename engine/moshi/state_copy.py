"""Copy one batch row of moshi streaming state into another state (the prefix cache's core).

moshi keeps every per-stream quantity in ``State`` dataclasses whose tensors have the batch first (conv
history, offsets, the LMGen token cache) or, for ``RingKVCache``, second. Copying row 0 of a B=1 state into
row ``slot`` of the batch state gives that slot exactly the stream the B=1 run produced. CPU-side counters
(``offset_cpu``) are shared by all rows and are not per-stream state, so they are left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from moshi.modules.transformer import RingKVCache

StateDict = dict[str, Any]  # module path -> moshi State, as returned by get_streaming_state()


class StateShapeError(RuntimeError):
    pass


def copy_state_row(src: StateDict, dst: StateDict, slot: int, src_row: int = 0) -> int:
    """Copy row ``src_row`` of every state in ``src`` into row ``slot`` of ``dst``; returns tensors copied."""
    if set(src) != set(dst):
        raise StateShapeError(f"state trees differ: {sorted(set(src) ^ set(dst))[:3]}")
    copied = 0
    with torch.no_grad():
        for name, dst_state in dst.items():
            copied += _copy_one(src[name], dst_state, slot, src_row, name)
    return copied


def _copy_one(src: Any, dst: Any, slot: int, src_row: int, name: str) -> int:
    copied = 0
    for f in dataclasses.fields(dst):
        d, s = getattr(dst, f.name), getattr(src, f.name)
        if isinstance(d, RingKVCache):
            if d.cache.shape[0:1] + d.cache.shape[2:] != s.cache.shape[0:1] + s.cache.shape[2:]:
                raise StateShapeError(f"{name}.{f.name}: KV cache shapes {d.cache.shape} / {s.cache.shape}")
            d.cache[:, slot] = s.cache[:, src_row]
            if d.end_offset.shape[0] == dst.batch_size:
                d.end_offset[slot] = s.end_offset[src_row]
            copied += 2
        elif isinstance(d, torch.Tensor) and _is_batched(d, dst.batch_size):
            fits = isinstance(s, torch.Tensor) and _is_batched(s, src.batch_size)
            fits = fits and s.shape[1:] == d.shape[1:]
            if not fits:
                raise StateShapeError(f"{name}.{f.name}: cannot copy {getattr(s, 'shape', s)} into {d.shape}")
            d[slot] = s[src_row]
            copied += 1
    dst.exec_mask[slot] = True
    return copied


def _is_batched(t: torch.Tensor, batch_size: int) -> bool:
    return t.dim() >= 1 and t.shape[0] == batch_size
