"""LoRA adapters per persona, many in one batched step (docs/adapters.md has the file format).

Serving (the S-LoRA / Punica idea, in plain tensor ops): every targeted linear of the LM is wrapped in a
:class:`MultiLoRALinear` holding *pages*: ``max_adapters`` slots of ``max_rank`` rows each, stacked
(``lora_a`` [pages·R, in], ``lora_b`` [out, pages·R], the adapter's scaling folded into ``lora_b``). Each
batch row selects at most one page through a shared 0/1 mask [B, pages·R], so one step computes

    y = W x + lora_b · (mask ⊙ (lora_a · x))

for calls with different adapters and calls with none (an all-zero mask row adds exactly zero). Loading an
adapter copies its tensors into a free page in place: static shapes, CUDA graphs stay valid. When no slot
uses any page the low-rank path is skipped altogether (``AdapterBank.enabled``), so adapter-free batches
pay nothing; the backend keeps one set of CUDA graphs per mode.

The adapter file format is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``[base_model.model.]<module>.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r], scaling
``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``), plus an ``aziza`` block in the config naming the
base model it was trained on (see :func:`base_identity`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.moshi.vocab import TOKENIZER_FILE, VocabExtension

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "aziza-lora/1"
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message is one line naming the reason."""


# -- base model identity ----------------------------------------------------------------------------------


def architecture_id(lm_config: dict[str, Any]) -> str:
    """A short hash of the LM's architecture (its config without file names): same shapes, same id."""
    keys = {k: v for k, v in lm_config.items()
            if not k.endswith("_name") and k not in ("model_id", "model_type", "lm_gen_config")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def base_identity(lm_config: dict[str, Any], lm_sha256: str | None) -> dict[str, Any]:
    """What an adapter records of its base: the architecture id and, when known, the LM weights' sha256."""
    return {"architecture": architecture_id(lm_config), "lm_sha256": lm_sha256}


# -- reading and checking an adapter ---------------------------------------------------------------------


@dataclass
class Adapter:
    """One adapter in host memory: per module, A [r, in] and B·scaling [out, r] (the file's dtype)."""

    adapter_id: str
    rank: int
    scaling: float
    base: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    load_ms: float = 0.0
    extension: VocabExtension | None = None  # new text tokens (docs/adapters.md)

    @property
    def nbytes(self) -> int:
        ext = self.extension.nbytes if self.extension is not None else 0
        return ext + sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                         for a, b in self.weights.values())


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{directory}: no {CONFIG_FILE}") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{path}: 'r' (the rank) must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    if not isinstance(config.get("aziza"), dict):
        raise AdapterError(f"{path}: no 'aziza' block naming the base model (docs/adapters.md)")
    return config


def scaling_of(config: dict[str, Any]) -> float:
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter(directory: Path, adapter_id: str) -> Adapter:
    """Load an adapter's tensors (float32, host). Raises AdapterError with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    config = read_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable safetensors ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extension_rows: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if name.endswith(".extension"):
            extension_rows[name.removesuffix(".extension")] = tensor
            continue
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
            if name.endswith(f".{part}.default.weight"):  # PEFT's in-memory naming
                pairs.setdefault(name[: -len(f".{part}.default.weight")], {})[part] = tensor
                break
        else:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
    rank, scaling = config["r"], scaling_of(config)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {module} has {sorted(pair)} but needs lora_A and lora_B")
        # Kept in the file's dtype (a 7B rank-16 adapter is 34 M values: converting costs more than reading).
        a, b = pair["lora_A"], pair["lora_B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{path}: {module} is not floating point")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: {module} has A {list(a.shape)} / B {list(b.shape)}, "
                               f"not rank {rank}")
        if not (_all_finite(a) and _all_finite(b)):
            raise AdapterError(f"{path}: {module} holds NaN/Inf")
        scaled = b if scaling == 1.0 else (b.float() * scaling).to(b.dtype)
        weights[module] = (a.contiguous(), scaled.contiguous())
    if not weights:
        raise AdapterError(f"{path}: no LoRA tensors")
    extension = _read_extension(directory, config, extension_rows) if extension_rows else None
    return Adapter(adapter_id=adapter_id, rank=rank, scaling=scaling, base=dict(config["aziza"]),
                   weights=weights, load_ms=(time.perf_counter() - t0) * 1e3, extension=extension)


_EXTENSION_PARTS = ("text_emb", "text_linear", "depformer_text_emb")


def _read_extension(directory: Path, config: dict[str, Any], rows: dict[str, torch.Tensor]) -> VocabExtension:
    if set(rows) != set(_EXTENSION_PARTS):
        raise AdapterError(f"{directory}: a vocabulary extension needs {', '.join(_EXTENSION_PARTS)} rows, "
                           f"got {sorted(rows)}")
    vocab = config["aziza"].get("vocab")
    if not isinstance(vocab, dict) or not isinstance(vocab.get("base"), int) or \
            not isinstance(vocab.get("added"), int):
        raise AdapterError(f"{directory}: a vocabulary extension needs aziza.vocab {{base, added}}")
    tokenizer = directory / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise AdapterError(f"{directory}: a vocabulary extension needs its {TOKENIZER_FILE}")
    added = vocab["added"]
    for name, tensor in rows.items():
        if tensor.dim() != 2 or tensor.shape[0] != added or not tensor.is_floating_point():
            raise AdapterError(f"{directory}: {name}.extension has shape {list(tensor.shape)}, "
                               f"expected [{added}, dim]")
        if not _all_finite(tensor):
            raise AdapterError(f"{directory}: {name}.extension holds NaN/Inf")
    return VocabExtension(text_emb=rows["text_emb"], text_linear=rows["text_linear"],
                          depformer_text_emb=rows["depformer_text_emb"], tokenizer=tokenizer,
                          base=vocab["base"])


def _all_finite(t: torch.Tensor) -> bool:
    # A float32 sum is NaN/Inf iff an element is (for any real weights): 6x cheaper than isfinite on bf16.
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def check_adapter(adapter: Adapter, module_shapes: dict[str, tuple[int, int]], base: dict[str, Any],
                  targets: list[str], max_rank: int, text: TextShapes | None = None) -> None:
    """Refuse (AdapterError, one line) an adapter whose base, modules, shapes or rank do not fit, or whose
    vocabulary extension the engine cannot serve (``text``: the LM's text shapes and the engine's limit)."""
    want_arch, got_arch = base.get("architecture"), adapter.base.get("architecture")
    if got_arch != want_arch:
        raise AdapterError(f"adapter {adapter.adapter_id!r} was trained on architecture {got_arch}, "
                           f"this model is {want_arch}")
    want_sha, got_sha = base.get("lm_sha256"), adapter.base.get("lm_sha256")
    if want_sha and got_sha and want_sha != got_sha:
        raise AdapterError(f"adapter {adapter.adapter_id!r} was trained on base weights {got_sha[:12]}…, "
                           f"this model's are {want_sha[:12]}…")
    if adapter.rank > max_rank:
        raise AdapterError(f"adapter {adapter.adapter_id!r} has rank {adapter.rank}; this engine serves "
                           f"rank <= {max_rank} (engine.lora_max_rank)")
    for module, (a, b) in adapter.weights.items():
        if module not in module_shapes:
            raise AdapterError(f"adapter {adapter.adapter_id!r}: {module} is not a linear layer of this "
                               "model")
        if not any(fnmatch.fnmatchcase(module, pattern) for pattern in targets):
            raise AdapterError(f"adapter {adapter.adapter_id!r}: {module} is outside the modules this engine "
                               f"adapts ({', '.join(targets)}: engine.lora_targets)")
        out_f, in_f = module_shapes[module]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise AdapterError(f"adapter {adapter.adapter_id!r}: {module} is {in_f}->{out_f} in this model, "
                               f"the adapter's is {a.shape[1]}->{b.shape[0]}")
    ext = adapter.extension
    if ext is not None:
        name = adapter.adapter_id
        if text is None or text.max_added == 0:
            raise AdapterError(f"adapter {name!r} adds {ext.added} text tokens; this engine serves none "
                               "(engine.lora_max_added_tokens = 0)")
        if ext.added > text.max_added:
            raise AdapterError(f"adapter {name!r} adds {ext.added} text tokens; this engine serves at most "
                               f"{text.max_added} (engine.lora_max_added_tokens)")
        if ext.base != text.text_card:
            raise AdapterError(f"adapter {name!r}: its vocabulary extends a base of {ext.base} tokens, this "
                               f"model's has {text.text_card}")
        if ext.text_emb.shape[1] != text.dim or ext.text_linear.shape[1] != text.dim or \
                ext.depformer_text_emb.shape[1] != text.depformer_dim:
            raise AdapterError(f"adapter {name!r}: its new token rows do not have this model's widths "
                               f"({text.dim}, {text.depformer_dim})")


@dataclass(frozen=True)
class TextShapes:
    text_card: int
    dim: int
    depformer_dim: int
    max_added: int  # engine.lora_max_added_tokens


def text_shapes(lm: nn.Module, max_added: int) -> TextShapes:
    dep_weight = lm.get_submodule("depformer_text_emb").get_parameter("weight")
    return TextShapes(text_card=int(getattr(lm, "text_card")), dim=int(getattr(lm, "dim")),  # noqa: B009
                      depformer_dim=int(dep_weight.shape[1]), max_added=max_added)


def is_linear(module: nn.Module) -> bool:
    """A plain linear layer, or the FP8 one that replaces it (``engine.moshi.fp8``); not a LoRA wrapper."""
    from engine.moshi.fp8 import Fp8Linear

    return isinstance(module, nn.Linear | Fp8Linear) and not isinstance(module, MultiLoRALinear)


def linear_shapes(lm: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of the LM, by module name (works on the meta device)."""
    return {name: (m.out_features, m.in_features) for name, m in lm.named_modules()
            if isinstance(m, MultiLoRALinear) or is_linear(m)}


def _device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = next(iter(base.buffers()), None)
    if tensor is None:
        tensor = next(base.parameters())
    dtype = getattr(base, "compute_dtype", None) or tensor.dtype
    return tensor.device, dtype


def write_adapter(directory: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                  alpha: float, base: dict[str, Any], **extra: Any) -> Path:
    """Write an adapter in this format (PEFT file layout + the ``aziza`` block). ``weights``: module ->
    (A [r, in], B [out, r]) unscaled. Used by tests and by ``training/``'s export."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(weights),
              "bias": "none", "aziza": {"format": FORMAT, **base}, **extra}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return directory


# -- serving -------------------------------------------------------------------------------------------


class MultiLoRALinear(nn.Module):
    """A linear layer (plain or FP8) plus ``pages`` low-rank adapters, selected per batch row.

    Deliberately not an ``nn.Linear``: moshi's gating multiplies by ``linear_in.weight`` directly when its
    layers are ``nn.Linear``, which would skip the adapter; as any other module it is called."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, bank: AdapterBank) -> None:
        nn.Module.__init__(self)
        self.base = base
        self.in_features: int = int(base.in_features)  # type: ignore[arg-type]
        self.out_features: int = int(base.out_features)  # type: ignore[arg-type]
        device, dtype = _device_dtype(base)
        width = bank.pages * bank.max_rank
        self.register_buffer("lora_a", torch.zeros(width, self.in_features, device=device, dtype=dtype))
        self.register_buffer("lora_b", torch.zeros(self.out_features, width, device=device, dtype=dtype))
        self.bank = bank

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Any:
        return getattr(self.base, "bias", None)

    def extra_repr(self) -> str:
        return f"pages={self.lora_a.shape[0] // max(1, self.bank.max_rank)}, max_rank={self.bank.max_rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.bank.enabled:
            return y
        mask = self.bank.mask_for(x.shape[0])
        h = F.linear(x.to(self.lora_a.dtype), self.lora_a)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1]).to(h.dtype)
        return y + F.linear(h, self.lora_b).to(y.dtype)


class MultiLoRAAttentionLinear(MultiLoRALinear, nn.Linear):  # type: ignore[override]
    """For moshi's attention projections, which must be ``nn.Linear`` (the KV cache takes its dtype from
    ``in_proj.weight``) and are always called as modules."""


@dataclass
class _Page:
    adapter_id: str | None = None
    users: set[int] = field(default_factory=set)  # slots using it
    last_used: float = 0.0


class AdapterBank:
    """The adapters resident on the device (pages) and which slot uses which; a host LRU of loaded
    adapters bounded in bytes. Not thread-safe: the backend calls it from its one worker thread."""

    def __init__(self, lm: nn.Module, num_slots: int, pages: int, max_rank: int, targets: list[str],
                 base: dict[str, Any], cache_bytes: int, max_added: int = 0) -> None:
        from engine.moshi import vocab

        self.pages, self.max_rank, self.targets, self.base = pages, max_rank, list(targets), base
        self.num_slots = num_slots
        self.cache_bytes = cache_bytes
        device = next(lm.parameters()).device
        width = pages * max_rank
        self.mask = torch.zeros(num_slots, width, device=device)
        self.side_mask = torch.zeros(1, width, device=device)  # the B=1 stream building persona prefixes
        self.enabled = False
        self._side = False  # a B=1 prefix build is running: its rows read side_mask
        self._pages = [_Page() for _ in range(pages)]
        self._slot_page: dict[int, int] = {}
        self._host: OrderedDict[str, Adapter] = OrderedDict()
        self.failed: dict[str, str] = {}  # adapter id -> why it could not be used (for /health)
        self.modules: dict[str, MultiLoRALinear] = {}
        self._root = lm
        self.shapes = linear_shapes(lm)
        # New text tokens: the row's page and which of its max_added ids it has (all False: none).
        self.max_added = max_added if pages > 0 else 0
        self.text = text_shapes(lm, self.max_added)
        self.vocab_page = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.vocab_valid = torch.zeros(num_slots, max(1, self.max_added), dtype=torch.bool, device=device)
        self.side_vocab_page = torch.zeros(1, dtype=torch.long, device=device)
        self.side_vocab_valid = torch.zeros(1, max(1, self.max_added), dtype=torch.bool, device=device)
        self.vocab_layers = vocab.install(lm, self, self.max_added) if self.max_added > 0 else None
        if pages > 0:
            for name, module in list(lm.named_modules()):
                for child_name, child in list(module.named_children()):
                    full = f"{name}.{child_name}" if name else child_name
                    if is_linear(child) and any(fnmatch.fnmatchcase(full, p) for p in targets):
                        attention = name.endswith(("in_projs", "out_projs"))
                        cls = MultiLoRAAttentionLinear if attention else MultiLoRALinear
                        wrapped = cls(child, self)
                        setattr(module, child_name, wrapped)
                        self.modules[full] = wrapped

    def close(self) -> None:
        """Put the original layers back (the model can serve another backend)."""
        from engine.moshi import vocab

        if self.vocab_layers is not None:
            vocab.uninstall(self._root, self.vocab_layers)
            self.vocab_layers = None
        for full, wrapped in self.modules.items():
            parent_name, _, child_name = full.rpartition(".")
            parent = self._root.get_submodule(parent_name) if parent_name else self._root
            setattr(parent, child_name, wrapped.base)
        self.modules.clear()
        self.enabled = False

    def mask_for(self, rows: int) -> torch.Tensor:
        return self.side_mask if self._side else self.mask

    def vocab_page_for(self, rows: int) -> torch.Tensor:
        return self.side_vocab_page if self._side else self.vocab_page

    def vocab_valid_for(self, rows: int) -> torch.Tensor:
        return self.side_vocab_valid if self._side else self.vocab_valid

    # -- host cache ---------------------------------------------------------------------------------------

    def load(self, adapter_id: str, directory: Path) -> Adapter:
        """From the host cache, or read and check it (AdapterError)."""
        cached = self._host.get(adapter_id)
        if cached is not None:
            self._host.move_to_end(adapter_id)
            return cached
        adapter = read_adapter(directory, adapter_id)
        check_adapter(adapter, self.shapes, self.base, self.targets, self.max_rank, self.text)
        self._host[adapter_id] = adapter
        total = sum(a.nbytes for a in self._host.values())
        while total > self.cache_bytes and len(self._host) > 1:
            _, old = self._host.popitem(last=False)
            total -= old.nbytes
        return adapter

    # -- pages --------------------------------------------------------------------------------------------

    def page_of(self, adapter_id: str) -> int | None:
        for i, page in enumerate(self._pages):
            if page.adapter_id == adapter_id:
                return i
        return None

    def _install(self, adapter: Adapter) -> int:
        if self.pages == 0:
            raise AdapterError("this engine serves no adapters (engine.max_adapters = 0)")
        page = self.page_of(adapter.adapter_id)
        if page is not None:
            return page
        free = [i for i, p in enumerate(self._pages) if not p.users]
        if not free:
            raise AdapterError(f"all {self.pages} adapter pages are in use by live calls "
                               f"(engine.max_adapters)")
        page = min(free, key=lambda i: (self._pages[i].adapter_id is not None, self._pages[i].last_used))
        lo = page * self.max_rank
        with torch.no_grad():
            for name, module in self.modules.items():
                module.lora_a[lo: lo + self.max_rank].zero_()
                module.lora_b[:, lo: lo + self.max_rank].zero_()
                pair = adapter.weights.get(name)
                if pair is not None:
                    a, b = pair
                    module.lora_a[lo: lo + adapter.rank].copy_(a, non_blocking=True)
                    module.lora_b[:, lo: lo + adapter.rank].copy_(b, non_blocking=True)
            if self.vocab_layers is not None:
                ext = adapter.extension
                new = (ext.text_emb, ext.text_linear, ext.depformer_text_emb) if ext else (None, None, None)
                for layer, rows in zip(self.vocab_layers, new, strict=True):
                    table = layer.get_buffer("rows")
                    table[page].zero_()
                    if rows is not None:
                        table[page, : rows.shape[0]].copy_(rows, non_blocking=True)
        self._pages[page] = _Page(adapter_id=adapter.adapter_id)
        return page

    def assign(self, slot: int, adapter: Adapter | None) -> None:
        """Slot ``slot`` now uses ``adapter`` (None: the base weights)."""
        self.release(slot)
        with torch.no_grad():
            self.mask[slot].zero_()
            if adapter is not None:
                page = self._install(adapter)
                self._pages[page].users.add(slot)
                self._pages[page].last_used = time.monotonic()
                self._slot_page[slot] = page
                lo = page * self.max_rank
                self.mask[slot, lo: lo + self.max_rank] = 1.0
                self._set_vocab(self.vocab_page, self.vocab_valid, slot, page, adapter)
        self.enabled = bool(self._slot_page)

    def release(self, slot: int) -> None:
        page = self._slot_page.pop(slot, None)
        if page is not None:
            self._pages[page].users.discard(slot)
            with torch.no_grad():
                self.mask[slot].zero_()
                self.vocab_valid[slot].zero_()
        self.enabled = bool(self._slot_page)

    def use_for_side_stream(self, adapter: Adapter | None) -> None:
        """The B=1 prefix build of a persona: its adapter (installed in a page) or none."""
        with torch.no_grad():
            self.side_mask.zero_()
            self.side_vocab_valid.zero_()
            if adapter is not None:
                page = self._install(adapter)
                lo = page * self.max_rank
                self.side_mask[0, lo: lo + self.max_rank] = 1.0
                self._set_vocab(self.side_vocab_page, self.side_vocab_valid, 0, page, adapter)
        self._side = True
        self.enabled = adapter is not None

    def end_side_stream(self) -> None:
        with torch.no_grad():
            self.side_mask.zero_()
        self._side = False
        self.enabled = bool(self._slot_page)

    @staticmethod
    def _set_vocab(pages: torch.Tensor, valid: torch.Tensor, row: int, page: int, adapter: Adapter) -> None:
        pages[row] = page
        valid[row].zero_()
        if adapter.extension is not None:
            valid[row, : adapter.extension.added] = True

    def status(self) -> dict[str, Any]:
        return {"pages": self.pages, "resident": [p.adapter_id for p in self._pages if p.adapter_id],
                "in_use": sorted({self._pages[p].adapter_id for p in self._slot_page.values()
                                  if self._pages[p].adapter_id}),
                "host_cached": list(self._host), "failed": dict(self.failed)}
