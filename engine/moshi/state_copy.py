"""One batch row of moshi streaming state, taken out as plain tensors and put back into another row.

The persona prefix cache's core. moshi keeps per-stream quantities in ``State`` dataclasses whose tensors
have the batch first (conv history, offsets, the LMGen token cache) or, for ``RingKVCache``, second. A
snapshot keeps only tensors: no State objects, so no CUDA graphs and no full-size KV caches stay alive with
it. Of a ring KV cache it keeps the positions written so far (a 100-frame prompt keeps 100 of 3000), plus
the FP8 cache's scales. CPU-side counters (``offset_cpu``) are shared by all rows, not per-stream state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from moshi.modules.transformer import RingKVCache

StateDict = dict[str, Any]  # module path -> moshi State, as returned by get_streaming_state()


class StateShapeError(RuntimeError):
    pass


@dataclass
class _Ring:
    cache: torch.Tensor  # [2, H, n, D]: positions 0..n-1 of the row
    scale: torch.Tensor | None  # [2, H, n, 1] for the FP8 cache
    end_offset: torch.Tensor  # 0-dim


@dataclass
class RowSnapshot:
    """Per (module path, field): a row tensor or a ring cache's written part."""

    tensors: dict[tuple[str, str], torch.Tensor | _Ring] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = 0
        for value in self.tensors.values():
            parts = [value.cache, value.scale, value.end_offset] if isinstance(value, _Ring) else [value]
            total += sum(t.numel() * t.element_size() for t in parts if t is not None)
        return total


def _is_batched(t: Any, batch_size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch_size


def snapshot_row(states: StateDict, row: int = 0) -> RowSnapshot:
    """Copy row ``row`` of every state in ``states`` (a dict of moshi State objects) into a snapshot."""
    snap = RowSnapshot()
    with torch.no_grad():
        for name, state in states.items():
            for f in dataclasses.fields(state):
                value = getattr(state, f.name)
                if isinstance(value, RingKVCache):
                    end = value.end_offset[row if value.end_offset.shape[0] > 1 else 0]
                    n = min(int(end), value.capacity)
                    scale = getattr(value, "scale", None)
                    snap.tensors[(name, f.name)] = _Ring(
                        cache=value.cache[:, row, :, :n].clone(),
                        scale=scale[:, row, :, :n].clone() if scale is not None else None,
                        end_offset=end.clone())
                elif _is_batched(value, state.batch_size):
                    snap.tensors[(name, f.name)] = value[row].clone()
    return snap


def load_row(snap: RowSnapshot, dst: StateDict, slot: int) -> int:
    """Write ``snap`` into row ``slot`` of ``dst`` (in place: CUDA graphs stay valid); returns tensors set."""
    copied = 0
    with torch.no_grad():
        for (name, attr), value in snap.tensors.items():
            state = dst.get(name)
            if state is None:
                raise StateShapeError(f"{name}: not in the batch state")
            target = getattr(state, attr)
            if isinstance(value, _Ring):
                if not isinstance(target, RingKVCache):
                    raise StateShapeError(f"{name}.{attr}: the batch state has no KV cache there")
                n = value.cache.shape[2]
                if (target.cache.shape[0:1] + target.cache.shape[2:3] + target.cache.shape[4:] !=
                        value.cache.shape[0:2] + value.cache.shape[3:]) or n > target.capacity \
                        or target.cache.dtype != value.cache.dtype:
                    raise StateShapeError(f"{name}.{attr}: KV cache {tuple(value.cache.shape)} "
                                          f"{value.cache.dtype} does not fit {tuple(target.cache.shape)} "
                                          f"{target.cache.dtype}")
                target.cache[:, slot, :, :n] = value.cache
                target_scale = getattr(target, "scale", None)
                if (target_scale is None) != (value.scale is None):
                    raise StateShapeError(f"{name}.{attr}: FP8 and non-FP8 KV caches do not mix")
                if target_scale is not None and value.scale is not None:
                    target_scale[:, slot, :, :n] = value.scale
                if target.end_offset.shape[0] == state.batch_size:
                    target.end_offset[slot] = value.end_offset
                copied += 1
            elif _is_batched(target, state.batch_size) or not isinstance(target, torch.Tensor):
                if not isinstance(target, torch.Tensor) or target.shape[1:] != value.shape:
                    raise StateShapeError(f"{name}.{attr}: cannot copy {tuple(value.shape)} into "
                                          f"{tuple(getattr(target, 'shape', ()))}")
                target[slot] = value
                copied += 1
            # else: a tensor shared by all rows (e.g. LMGen's initial tokens), batched only in a B=1 source
            state.exec_mask[slot] = True
    return copied
