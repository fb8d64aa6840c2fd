"""Memory and time of a QLoRA run, computed from the model's config (``aziza-admin train estimate``).

Parameter counts come from the LM built on the meta device (exact, no weights). The rest is arithmetic
whose assumptions are stated where they are made:
- NF4 base (bitsandbytes, double quantization): 0.5 byte per weight + 1/64 byte (8-bit absmax per 64-block)
  + 4/(64·256) byte (fp32 second-level constant per 256 blocks); embeddings, heads and norms in bf16;
- LoRA parameters and new-token rows in fp32 with fp32 gradients and two AdamW moments: 16 bytes each;
- activations with gradient checkpointing: each temporal layer keeps its bf16 input; one layer at a time is
  recomputed with its internals live (attention by SDPA without a T×T matrix); the depformer likewise over
  ``B·T`` sequences of ``dep_q`` steps; the text and audio logits in fp32 plus their gradients;
- CUDA context and allocator slack: a fixed 2 GiB;
- compute: per 80 ms frame 2·N FLOPs forward, 2·N backward (activation gradients only: the base is frozen)
  and 2·N for the checkpointed recompute, 6·N in all; throughput = peak bf16 × an assumed utilisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
GPUS = {"A100-80GB": 312e12, "H100-80GB-SXM": 989e12}  # dense bf16 peak FLOP/s


@dataclass
class Estimate:
    params_total: int
    params_quantized: int  # the transformer's and depformer's linears (NF4)
    params_other: int  # embeddings, heads, norms (bf16)
    params_lora: int
    params_new_rows: int
    gib_base: float
    gib_trainable: float  # LoRA + new rows with grads and AdamW state
    gib_activations: float
    gib_logits: float
    gib_overhead: float
    gib_total: float
    batch_size: int
    frames: int
    flops_per_frame: float
    hours_per_epoch: dict[str, float]  # per GPU, at the assumed utilisation
    audio_hours: float
    utilisation: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lm_config(name: str = "moshi-7b") -> dict[str, Any]:
    """moshi's 7B config (Moshiko/Moshika); ``personaplex-7b`` has 16 depformer steps."""
    from moshi.models import loaders

    config = dict(loaders._lm_kwargs)
    if name == "personaplex-7b":
        config["dep_q"] = 16
        config["depformer_weights_per_step_schedule"] = None
    return config


def estimate(config: dict[str, Any], rank: int = 16, targets: tuple[str, ...] | None = None,
             added: int = 4000, batch_size: int = 8, seconds: float = 60.0, audio_hours: float = 100.0,
             utilisation: float = 0.25) -> Estimate:
    import fnmatch

    import torch
    from moshi.models import loaders

    from training.config import DEFAULT_TARGETS

    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(config), device="meta", dtype=torch.bfloat16)
    targets = targets or DEFAULT_TARGETS
    quantized = lora = 0
    for name, module in lm.named_modules():
        if type(module) is torch.nn.Linear and name.startswith(("transformer.", "depformer.")):
            quantized += module.weight.numel()
            if any(fnmatch.fnmatchcase(name, p) for p in targets):
                lora += rank * (module.in_features + module.out_features)
    total = sum(p.numel() for p in lm.parameters())
    other = total - quantized
    dim, dep_dim, layers = int(config["dim"]), int(config["depformer_dim"]), int(config["num_layers"])
    dep_layers, dep_q, card = int(config["depformer_num_layers"]), int(config["dep_q"]), int(config["card"])
    text_card = int(config["text_card"])
    new_rows = added * (2 * dim + dep_dim)
    frames = round(seconds * 12.5)
    tokens = batch_size * frames
    hidden = int(config["hidden_scale"] * dim) * 2 // 3
    # checkpointed temporal transformer: saved inputs + one layer's internals (qkv, attn out, norms, gating)
    act = tokens * dim * 2 * layers + tokens * (10 * dim + 3 * hidden) * 2
    dep_hidden = int(config["depformer_dim_feedforward"]) * 2 // 3
    dep_tokens = tokens * dep_q
    act += dep_tokens * dep_dim * 2 * dep_layers + dep_tokens * (10 * dep_dim + 3 * dep_hidden) * 2
    logits = tokens * ((text_card + 1 + added) + dep_q * card) * 4 * 2
    base = quantized * NF4_BYTES + other * 2
    trainable = (lora + new_rows) * 16
    overhead = 2 * GIB
    total_bytes = base + trainable + act + logits + overhead
    flops = 6.0 * total
    frames_per_epoch = audio_hours * 3600 * 12.5
    hours = {gpu: frames_per_epoch * flops / (peak * utilisation) / 3600 for gpu, peak in GPUS.items()}
    return Estimate(params_total=total, params_quantized=quantized, params_other=other, params_lora=lora,
                    params_new_rows=new_rows, gib_base=base / GIB, gib_trainable=trainable / GIB,
                    gib_activations=act / GIB, gib_logits=logits / GIB, gib_overhead=overhead / GIB,
                    gib_total=total_bytes / GIB, batch_size=batch_size, frames=frames, flops_per_frame=flops,
                    hours_per_epoch=hours, audio_hours=audio_hours, utilisation=utilisation)


def largest_batch(config: dict[str, Any], budget_gib: float = 80.0, **kwargs: Any) -> int:
    """The largest batch size whose estimate fits ``budget_gib`` (0 if none)."""
    best = 0
    for bs in (1, 2, 4, 8, 16, 32, 64, 128):
        if estimate(config, batch_size=bs, **kwargs).gib_total <= budget_gib:
            best = bs
    return best
