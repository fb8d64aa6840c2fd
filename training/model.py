"""The model being fine-tuned: the engine's checkpoint, LoRA on the temporal transformer, grown text vocab.

- Loaded through ``engine.moshi.loader.load_model`` (verified, the same files the engine serves).
- CUDA: QLoRA. The transformer and depformer linears become bitsandbytes ``Linear4bit`` (NF4, double
  quantization, bf16 compute); embeddings and heads stay in the compute dtype. CPU (tests): an fp32 base.
- LoRA through ``peft`` (``inject_adapter_in_model``) on the resolved target modules; its A/B tensors are the
  adapter format's (docs/adapters.md), so export is a copy of tensors, not a conversion.
- Vocabulary extension: ``text_emb``, ``text_linear`` and ``depformer_text_emb`` are wrapped so new token
  ``i`` (text id ``text_card + 1 + i``) has its own trainable row, mean-initialised from the base rows.
- moshi's gating multiplies ``linear_in.weight`` directly when its layers are ``nn.Linear`` (true of bnb's
  Linear4bit too); every gating is switched to moshi's generic path, which calls the layers as modules, so
  LoRA and 4-bit layers are honoured.
"""

from __future__ import annotations

import fnmatch
import os
import re
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from engine.moshi.loader import ModelFiles
    from training.config import Config


class ModelSetupError(RuntimeError):
    """The model cannot be prepared for training (one line)."""


class _Rows(nn.Module):
    """A trainable block of rows, a child module so the wrapped module's own weight stays its first
    parameter (moshi reads ``lm.dtype`` from ``text_emb``'s first parameter)."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(rows)


class ExtendedEmbedding(nn.Module):
    """A moshi ``ScaledEmbedding`` (ids ``0 .. n-1``, ``-1`` = zero) plus rows for ids ``n .. n+added-1``."""

    def __init__(self, base: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.extension = _Rows(rows)
        self.num_embeddings = int(base.num_embeddings) + rows.shape[0]  # type: ignore[arg-type]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = int(self.base.num_embeddings)  # type: ignore[arg-type]
        new = ids >= n
        y = self.base(torch.where(new, torch.zeros_like(ids), ids))
        rows = self.extension.weight
        ext = F.embedding((ids - n).clamp(0, rows.shape[0] - 1), rows).to(y.dtype)
        return torch.where(new[..., None], ext, y)


class ExtendedHead(nn.Module):
    """The text head over ``text_card`` base classes, then moshi's initial token (never predicted: -inf),
    then the new tokens' rows: output index = text id."""

    def __init__(self, base: nn.Linear, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.extension = _Rows(rows)
        self.in_features = base.in_features
        self.out_features = base.out_features + 1 + rows.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        initial = torch.full((*y.shape[:-1], 1), float("-inf"), dtype=y.dtype, device=y.device)
        ext = F.linear(x, self.extension.weight.to(x.dtype)).to(y.dtype)
        return torch.cat([y, initial, ext], dim=-1)


@dataclass
class Extension:
    """The new tokens' rows (what the adapter's vocabulary-extension block carries)."""

    text_emb: torch.Tensor  # [added, dim]
    text_linear: torch.Tensor  # [added, dim]
    depformer_text_emb: torch.Tensor  # [added, depformer_dim]

    @property
    def added(self) -> int:
        return int(self.text_emb.shape[0])


def mean_extension(lm: LMModel, added: int) -> Extension:
    """New rows initialised to the mean of the base's rows for the ``text_card`` real tokens."""
    text_card = int(lm.text_card)
    with torch.no_grad():
        ids = torch.arange(text_card, device=lm.device)
        emb = lm.text_emb(ids).float().mean(0)
        head = lm.text_linear.weight[:text_card].float().mean(0)
        assert lm.depformer_text_emb is not None
        dep = lm.depformer_text_emb(ids).float().mean(0)
    return Extension(text_emb=emb.expand(added, -1).clone(), text_linear=head.expand(added, -1).clone(),
                     depformer_text_emb=dep.expand(added, -1).clone())


def install_extension(lm: LMModel, ext: Extension, trainable: bool) -> None:
    """Wrap the LM's text embedding, head and depformer text embedding with the new rows (float32)."""
    device = lm.device
    rows = [t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(trainable)
            for t in (ext.text_emb, ext.text_linear, ext.depformer_text_emb)]
    lm.text_emb = ExtendedEmbedding(lm.text_emb, rows[0])  # type: ignore[assignment]
    lm.text_linear = ExtendedHead(lm.text_linear, rows[1])  # type: ignore[assignment]
    lm.depformer_text_emb = ExtendedEmbedding(lm.depformer_text_emb, rows[2])  # type: ignore[assignment]


def extension_of(lm: LMModel) -> Extension | None:
    emb, head, dep = lm.text_emb, lm.text_linear, lm.depformer_text_emb
    if not isinstance(emb, ExtendedEmbedding):
        return None
    assert isinstance(head, ExtendedHead) and isinstance(dep, ExtendedEmbedding)
    return Extension(text_emb=emb.extension.weight, text_linear=head.extension.weight,
                     depformer_text_emb=dep.extension.weight)


def _generic_gating(self: Any, x: torch.Tensor) -> torch.Tensor:
    from moshi.modules.gating import gating_forward_generic

    return gating_forward_generic(self.linear_in, self.linear_out, self.activation, x)


def call_gating_layers_as_modules(lm: nn.Module) -> int:
    from moshi.modules.gating import ActivationGating

    count = 0
    for module in lm.modules():
        if isinstance(module, ActivationGating):
            module.forward = types.MethodType(_generic_gating, module)  # type: ignore[method-assign]
            count += 1
    return count


def resolve_targets(lm: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers matching the config's globs (every one must match something)."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    names = [name for name, m in lm.named_modules() if isinstance(m, linear_types)]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModelSetupError(f"lora.targets: {pattern!r} matches no linear layer of this model")
        found.extend(h for h in hits if h not in found)
    return sorted(found)


def quantize_nf4(lm: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Replace the transformer's and depformer's linears by bitsandbytes NF4 ``Linear4bit`` on ``device``
    (QLoRA's base). Returns how many layers were quantized."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelSetupError("train.quantize = nf4 needs bitsandbytes (provisioning/install.sh --qlora)") \
            from None
    count = 0
    for prefix in ("transformer", "depformer"):
        root = lm.get_submodule(prefix)
        for _name, module in list(root.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(device))
                count += 1
    return count


@dataclass
class TrainModel:
    lm: LMModel
    mimi: MimiModel
    tokenizer: sentencepiece.SentencePieceProcessor
    files: ModelFiles
    lm_sha256: str | None
    targets: list[str]
    device: torch.device
    quantized: bool

    @property
    def text_card(self) -> int:
        return int(self.lm.text_card)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelSetupError(f"train.device = {name}: no CUDA device here")
    return device


def load_base(config: Config) -> tuple[Any, torch.device, torch.dtype, bool]:
    """The engine's model, verified; on CUDA with NF4 the LM is loaded on the host first, then quantized."""
    from engine.moshi.loader import ModelError, load_model

    device = resolve_device(config.train.device)
    quantize = config.train.quantize == "nf4" or (config.train.quantize == "auto" and device.type == "cuda")
    if quantize and device.type != "cuda":
        raise ModelSetupError("train.quantize = nf4 needs a CUDA device (bitsandbytes NF4); use none on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.train.compute_dtype]
    if device.type == "cpu":
        dtype = torch.float32
    try:
        loaded = load_model(config.model_ref, device="cpu" if quantize else device, dtype=dtype)
    except ModelError as exc:
        raise ModelSetupError(f"model {config.model!r}: {exc}") from None
    return loaded, device, dtype, quantize


def prepare(config: Config, added: int, seed: int) -> TrainModel:
    """Base (+ NF4 on CUDA), frozen; LoRA injected (seeded init); the extension's rows when ``added``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    loaded, device, dtype, quantize = load_base(config)
    lm = loaded.lm
    if quantize:
        quantize_nf4(lm, device, dtype)
        lm.to(device)  # embeddings, heads, norms: compute dtype on the GPU
    loaded.mimi.to(device)
    for p in list(lm.parameters()) + list(loaded.mimi.parameters()):
        p.requires_grad_(False)
    loaded.mimi.eval()
    call_gating_layers_as_modules(lm)
    targets = resolve_targets(lm, config.lora.targets)  # Linear4bit is an nn.Linear: same globs
    torch.manual_seed(seed)
    peft_config = PeftLoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,  # type: ignore[arg-type]
                                 lora_dropout=config.lora.dropout, bias="none",
                                 target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$")
    inject_adapter_in_model(peft_config, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    if added:
        install_extension(lm, mean_extension(lm, added), trainable=True)
    lm.transformer.checkpointing = config.train.gradient_checkpointing
    if lm.depformer is not None:
        lm.depformer.checkpointing = config.train.gradient_checkpointing
    return TrainModel(lm=lm, mimi=loaded.mimi, tokenizer=loaded.tokenizer, files=loaded.files,
                      lm_sha256=loaded.lm_sha256, targets=targets, device=device, quantized=quantize)


def lora_layers(lm: nn.Module, targets: list[str]) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """module name -> (A [r, in], B [out, r]) parameters of peft's layers (adapter "default")."""
    out = {}
    for name in targets:
        layer = lm.get_submodule(name)
        a = layer.lora_A["default"].weight  # type: ignore[index, union-attr]
        b = layer.lora_B["default"].weight  # type: ignore[index, union-attr]
        out[name] = (a, b)
    return out


def trainable_parameters(lm: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(LoRA parameters, extension rows): separate optimizer groups (rows may take another lr)."""
    lora: list[nn.Parameter] = []
    rows: list[nn.Parameter] = []
    for name, p in lm.named_parameters():
        if not p.requires_grad:
            continue
        (rows if ".extension." in name else lora).append(p)
    return lora, rows
