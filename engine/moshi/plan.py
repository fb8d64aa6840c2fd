"""Device memory plan: how many call slots fit, computed before any weight is loaded.

    weights                 parameters at the serving dtype (FP8: the temporal transformer's linears at 1
                            byte + a float32 scale per output channel; the rest at the compute dtype; Mimi
                            float32)
    state per slot          every streaming-state tensor (KV caches, conv history, token cache), measured
                            by instantiating the streaming state on PyTorch's meta device at B=1 and B=2:
                            exact, and it costs no memory
    activations per slot    the largest transient of a tick: one layer's attention (scores, and with an
                            FP8 cache its keys/values dequantized) plus Mimi's conv activations; counted
                            once per CUDA-graph set (each keeps its own pool) plus the eager warm-up
    fixed                   LoRA pages, the persona prefix cache (assumed prompts of PREFIX_FRAMES), and
                            engine.memory_reserve_mb (CUDA context, cuBLAS workspaces, fragmentation)

``slots`` = what fits after the fixed parts. The engine refuses a ``num_slots`` above it, before loading.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

if TYPE_CHECKING:
    import torch

    from engine.config import EngineSettings

PREFIX_FRAMES = 250  # a 20 s persona prompt
MIMI_ACTIVATION_BYTES = 4 << 20  # per slot, measured order of magnitude of SEANet at 24 kHz (80 ms)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
          "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class PlanError(ValueError):
    """``num_slots`` does not fit the device; the message carries the numbers."""


def parse_bytes(text: str) -> int:
    """'80GiB', '141 GB', '1.5T', '123456' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 80GiB, 141GB, 1.5TiB)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class MemoryPlan:
    device_bytes: int
    dtype: str
    kv_dtype: str
    weight_bytes: int
    state_bytes_per_slot: int
    kv_bytes_per_slot: int
    activation_bytes_per_slot: int
    adapter_bytes: int
    prefix_cache_bytes: int
    reserve_bytes: int
    graph_sets: int
    slots: int

    @property
    def per_slot_bytes(self) -> int:
        return self.state_bytes_per_slot + self.activation_bytes_per_slot

    @property
    def fixed_bytes(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.prefix_cache_bytes + self.reserve_bytes

    def bytes_for(self, num_slots: int) -> int:
        return self.fixed_bytes + num_slots * self.per_slot_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_slot_bytes": self.per_slot_bytes, "fixed_bytes": self.fixed_bytes}


def _numel(t: torch.Tensor) -> int:
    return int(t.numel())


def _tensor_bytes(obj: Any) -> int:
    import torch

    total = 0
    for value in vars(obj).values():
        for tensor in (value, getattr(value, "cache", None), getattr(value, "scale", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _state_bytes(lm: Any, mimi: Any, batch: int) -> tuple[int, int]:
    """(all streaming state, KV caches alone) at ``batch`` rows, on the meta device."""
    from moshi.models.lm import LMGen
    from moshi.modules.transformer import RingKVCache

    gen = LMGen(lm, use_sampling=False, support_out_of_sync=True)
    total = kv = 0
    with mimi.streaming(batch), gen.streaming(batch):
        for module in (mimi, gen, lm):
            for state in module.get_streaming_state().values():
                total += _tensor_bytes(state)
                for value in vars(state).values():
                    if isinstance(value, RingKVCache):
                        kv += _tensor_bytes(value)
    return total, kv


def plan_memory(lm_config: dict[str, Any], mimi_config: dict[str, Any] | None, device_bytes: int, *,
                dtype: str = "bf16", kv_dtype: str = "auto", max_adapters: int = 0, lora_max_rank: int = 32,
                lora_targets: tuple[str, ...] | list[str] = ("transformer.*",), max_prefixes: int = 8,
                reserve_bytes: int = 2 << 30, max_top_k: int = 250, lora_max_added: int = 0) -> MemoryPlan:
    import torch
    from moshi.models import loaders
    from torch import nn

    from engine.moshi.loader import num_codebooks

    compute = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, torch.bfloat16)
    kv = kv_dtype if kv_dtype != "auto" else ("fp32" if compute == torch.float32 else "bf16")
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_config), device="meta", dtype=compute)
    with torch.device("meta"):
        mimi = loaders.get_mimi(None, mimi_config=mimi_config, device="meta",
                                num_codebooks=num_codebooks(lm_config))
    elt = torch.finfo(compute).bits // 8
    weights = 0
    fp8_names = set()
    if dtype == "fp8":
        for name, module in lm.get_submodule("transformer").named_modules():
            if isinstance(module, nn.Linear):
                fp8_names.add(f"transformer.{name}.weight")
                weights += _numel(module.weight) + 4 * module.out_features
    for name, tensor in list(lm.named_parameters()) + list(lm.named_buffers()):
        if name not in fp8_names:
            weights += _numel(tensor) * (elt if tensor.is_floating_point() else tensor.element_size())
    weights += sum(_numel(t) * 4 for t in mimi.parameters())
    if kv == "fp8":
        from engine.moshi.kv_fp8 import use_fp8_kv

        use_fp8_kv(lm)
    elif (kv == "fp32" and compute != torch.float32) or (kv in ("bf16", "fp16") and compute == torch.float32):
        raise ValueError(f"kv_dtype {kv} needs dtype {kv} (the KV cache follows the compute dtype)")
    one, kv_one = _state_bytes(lm, mimi, 1)
    two, kv_two = _state_bytes(lm, mimi, 2)
    per_slot_state, per_slot_kv = two - one, kv_two - kv_one
    heads, context, dim = lm_config["num_heads"], lm_config["context"], lm_config["dim"]
    head_dim = dim // heads
    attention = heads * context * 4 + context * 9  # fp32 scores, positions (int64) and mask (bool)
    if kv == "fp8":
        attention += 2 * heads * context * head_dim * elt  # keys and values dequantized, one layer at a time
    dep_q = lm_config["dep_q"]
    sampling = 4 * (1 + dep_q) * max_top_k * 3  # noise, probabilities, top-k values
    activation = attention + MIMI_ACTIVATION_BYTES + sampling
    graph_sets = 2 if max_adapters > 0 else 1
    activation_total = activation * (graph_sets + 1)
    adapter = 0
    if max_adapters > 0:
        for name, module in lm.named_modules():
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in lora_targets):
                adapter += max_adapters * lora_max_rank * (module.in_features + module.out_features) * elt
        # Pages of new text tokens: embedding, head and depformer embedding rows.
        adapter += max_adapters * lora_max_added * (2 * lm_config["dim"] + lm_config["depformer_dim"]) * elt
    # A prefix keeps the prompt's KV positions of each layer: per_slot_kv scaled to PREFIX_FRAMES.
    prefix = max_prefixes * per_slot_kv * min(PREFIX_FRAMES, context) // context
    fixed = weights + adapter + prefix + reserve_bytes
    per_slot = per_slot_state + activation_total
    slots = max(0, (device_bytes - fixed) // per_slot)
    return MemoryPlan(device_bytes=device_bytes, dtype=dtype, kv_dtype=kv, weight_bytes=weights,
                      state_bytes_per_slot=per_slot_state, kv_bytes_per_slot=per_slot_kv,
                      activation_bytes_per_slot=activation_total, adapter_bytes=adapter,
                      prefix_cache_bytes=prefix, reserve_bytes=reserve_bytes, graph_sets=graph_sets,
                      slots=int(slots))


def plan_for(settings: EngineSettings, lm_config: dict[str, Any], mimi_config: dict[str, Any] | None,
             device_bytes: int) -> MemoryPlan:
    return plan_memory(lm_config, mimi_config, device_bytes, dtype=_serving_dtype(settings),
                       kv_dtype=settings.kv_dtype, max_adapters=settings.max_adapters,
                       lora_max_rank=settings.lora_max_rank, lora_targets=settings.lora_targets,
                       max_prefixes=settings.max_prefixes, reserve_bytes=settings.memory_reserve_mb << 20,
                       max_top_k=settings.max_top_k, lora_max_added=settings.lora_max_added_tokens)


def _serving_dtype(settings: EngineSettings) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bf16" if settings.device != "cpu" else "fp32"


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device; None elsewhere (host memory is not planned)."""
    import torch

    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def check_fits(lm_config: dict[str, Any], mimi_config: dict[str, Any] | None, settings: EngineSettings,
               device: torch.device, total_bytes: int | None = None) -> MemoryPlan | None:
    """Refuse (PlanError, with the numbers) a ``num_slots`` the device cannot hold. CPU: not planned.
    ``total_bytes`` overrides the device's memory (tests)."""
    total = total_bytes if total_bytes is not None else device_memory(device)
    if total is None:
        return None
    plan = plan_for(settings, lm_config, mimi_config, total)
    if settings.num_slots > plan.slots:
        gib = 2**30
        raise PlanError(
            f"num_slots={settings.num_slots} does not fit {device} ({total / gib:.1f} GiB): weights "
            f"{plan.weight_bytes / gib:.2f} GiB + fixed "
            f"{(plan.fixed_bytes - plan.weight_bytes) / gib:.2f} GiB "
            f"+ {plan.per_slot_bytes / gib:.3f} GiB per slot -> at most {plan.slots} slots "
            f"(dtype {plan.dtype}, kv_dtype {plan.kv_dtype}; `aziza-admin engine plan` shows the parts)")
    return plan
