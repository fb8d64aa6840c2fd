"""FP8 (e4m3) KV cache for the temporal transformer: half the bytes of bf16, so twice the calls per GPU.

Keys and values are stored as float8_e4m3fn with one float32 scale per (head, position) — each head's
vector at each position is scaled by its own absolute maximum, so a loud head cannot crush a quiet one.
Attention reads them dequantized to the compute dtype. The ring buffer logic (write positions, exec mask,
the positions attention masks with) is moshi's own ``RingKVCache``: this class hands it the quantized bytes
(viewed as uint8) and keeps the scales beside them.

Installed per attention module (``use_fp8_kv``): only the temporal transformer's, whose cache is the big
one (3000 positions × 32 layers at 7B); the depformer's 8-step caches stay in the compute dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from moshi.modules import transformer as moshi_transformer
from moshi.modules.transformer import KVCacheResult, RingKVCache, StreamingMultiheadAttention
from torch import nn

E4M3_MAX = 448.0


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, T, D] -> e4m3 bytes (uint8 view) and float32 scales [B, H, T, 1]."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale


class Fp8RingKVCache(RingKVCache):
    """``RingKVCache`` with e4m3 storage; ``dtype`` is the compute dtype attention gets back."""

    def __init__(self, batch_size: int, num_heads: int, dim_per_head: int, capacity: int,
                 respect_exec_mask: bool = True, device: torch.device | str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> None:
        device = torch.device(device)
        super().__init__(batch_size, num_heads, dim_per_head, capacity, respect_exec_mask, device=device,
                         dtype=torch.uint8)
        self.compute_dtype = dtype
        self.scale = torch.ones((2, batch_size, num_heads, capacity, 1), device=device, dtype=torch.float32)

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        B, H, T, _ = k.shape
        steps = torch.arange(T, device=self.end_offset.device, dtype=self.end_offset.dtype)
        where = ((steps + self.end_offset.view(-1, 1)) % self.capacity).view(-1, 1, T, 1).expand(B, H, T, 1)
        kq, ks = quantize_heads(k)
        vq, vs = quantize_heads(v)
        self.scale[0].scatter_(2, where, ks)
        self.scale[1].scatter_(2, where, vs)
        stored = super().complete(kq, vq, exec_mask)
        dtype = self.compute_dtype
        keys = stored.keys.view(torch.float8_e4m3fn).to(dtype) * self.scale[0].to(dtype)
        values = stored.values.view(torch.float8_e4m3fn).to(dtype) * self.scale[1].to(dtype)
        return KVCacheResult(keys, values, stored.positions)


@contextlib.contextmanager
def _ring_class(cls: Any) -> Iterator[None]:
    saved = moshi_transformer.RingKVCache
    moshi_transformer.RingKVCache = cls  # type: ignore[misc]  # read by _init_streaming_state at call time
    try:
        yield
    finally:
        moshi_transformer.RingKVCache = saved  # type: ignore[misc]


class Fp8KVAttention(StreamingMultiheadAttention):
    """moshi's attention whose streaming state gets an :class:`Fp8RingKVCache` (never a bf16 one first:
    at 128 slots that would not fit)."""

    def _init_streaming_state(self, batch_size: int) -> Any:
        with _ring_class(Fp8RingKVCache):
            return super()._init_streaming_state(batch_size)


def use_fp8_kv(lm: nn.Module) -> int:
    """Give every self-attention of ``lm.transformer`` an FP8 KV cache (before streaming starts)."""
    count = 0
    for module in lm.get_submodule("transformer").modules():
        if type(module) is StreamingMultiheadAttention and not module.cross_attention:
            module.__class__ = Fp8KVAttention
            count += 1
    return count
