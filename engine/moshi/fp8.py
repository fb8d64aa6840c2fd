"""FP8 weights for the temporal transformer: float8_e4m3fn with one scale per output channel.

Two ways to run the same quantized weights:
  * ``scaled_mm``: activations quantized per row to e4m3 and ``torch._scaled_mm`` with row-wise scales
    (native on sm_89+ GPUs; this torch also runs it on CPU, slowly, so the path is testable here);
  * ``dequant``: weights dequantized to the compute dtype and a plain matmul (anything else).
The depformer and embeddings stay in the compute dtype (small, and sensitive: they pick the codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

E4M3_MAX = 448.0
Mode = Literal["auto", "scaled_mm", "dequant"]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> e4m3 weight and float32 scales (out,), so that w ≈ q * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def native_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored in FP8 with per-output-channel scales."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: Any

    def __init__(self, linear: nn.Linear, mode: Mode = "auto") -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is kept
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias
        self.mode: Mode = mode if mode != "auto" else (
            "scaled_mm" if native_fp8(linear.weight.device) else "dequant")

    def dequantized(self) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dequant":
            return F.linear(x, self.dequantized(), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        rows = x2.shape[0]
        pad = (-rows) % 16  # _scaled_mm wants dims divisible by 16 on GPU
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        xq = (x2 / x_scale).to(torch.float8_e4m3fn)
        out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
        scale_b = self.weight_scale[None, :].contiguous()
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=out_dtype)
        y = y[:rows]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Fp8AttentionLinear(Fp8Linear, nn.Linear):
    """For moshi's attention projections, which must be ``nn.Linear`` (the KV cache takes its dtype from
    ``in_proj.weight``): ``weight`` is the dequantized view, computed on access."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized()


@dataclass(frozen=True)
class LayerError:
    name: str
    weight_rel_error: float  # ||w - deq(q)|| / ||w||
    output_rel_error: float  # on random inputs, through the layer's own forward


def quantize_lm_fp8(lm: nn.Module, mode: Mode = "auto", measure: bool = False) -> list[LayerError]:
    """Replace every linear of ``lm.transformer`` (the temporal transformer) in place."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    errors: list[LayerError] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    transformer = lm.get_submodule("transformer")
    for parent_name, parent in list(transformer.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, Fp8Linear):
                continue
            # Attention projections live in ModuleLists named in_projs/out_projs of the attention module.
            in_attention = parent_name.endswith(("in_projs", "out_projs")) or isinstance(
                parent, StreamingMultiheadAttention)
            cls = Fp8AttentionLinear if in_attention else Fp8Linear
            new = cls(child, mode)
            if measure:
                w = child.weight.detach().float()
                x = torch.randn(8, child.in_features, generator=gen).to(child.weight)
                with torch.no_grad():
                    ref, got = child(x).float(), new(x).float()
                errors.append(LayerError(
                    name=f"{parent_name}.{child_name}",
                    weight_rel_error=float((w - new.dequantized().float()).norm() / w.norm()),
                    output_rel_error=float((ref - got).norm() / ref.norm())))
            setattr(parent, child_name, new)
    return errors
