"""The adapter the engine loads (docs/adapters.md), written straight from the trained tensors.

Every checkpoint directory *is* an adapter in that format (plus ``trainer_state.pt``), so ``train export``
copies files: no conversion step. ``engine.moshi.lora.write_adapter`` writes the LoRA part and the config;
a vocabulary extension adds its rows to the same safetensors file, ``tokenizer.model`` beside it and
``aziza.vocab`` in the config. ``lora_only`` writes the variant without the extension, for an engine that
does not serve new tokens yet.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.moshi.lora import CONFIG_FILE, WEIGHTS_FILE, write_adapter
from training.model import Extension

PREFIX = "base_model.model."
EXTENSION_KEYS = {  # safetensors key -> Extension field
    f"{PREFIX}text_emb.extension": "text_emb",
    f"{PREFIX}text_linear.extension": "text_linear",
    # The depformer embeds the text token too; the engine needs its rows as well (docs/adapters.md).
    f"{PREFIX}depformer_text_emb.extension": "depformer_text_emb",
}
TOKENIZER_FILE = "tokenizer.model"


class ExportError(RuntimeError):
    pass


@dataclass
class AdapterFiles:
    config: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B) unscaled, as stored
    extension: Extension | None
    tokenizer: Path | None


def write_adapter_files(directory: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                        alpha: float, base: dict[str, Any], extension: Extension | None,
                        vocab: dict[str, int] | None, tokenizer: Path | None,
                        lora_dropout: float = 0.0) -> Path:
    """Write (into an existing or new ``directory``) the adapter files; float32 tensors."""
    from safetensors.torch import load_file, save_file

    weights32 = {k: (a.detach().float().cpu(), b.detach().float().cpu()) for k, (a, b) in weights.items()}
    block = dict(base)
    if extension is not None:
        if vocab is None or tokenizer is None:
            raise ExportError("a vocabulary extension needs its vocab block and tokenizer.model")
        block["vocab"] = dict(vocab)
    write_adapter(directory, weights32, rank=rank, alpha=alpha, base=block, use_rslora=False,
                  lora_dropout=lora_dropout)
    if extension is not None:
        assert tokenizer is not None
        path = directory / WEIGHTS_FILE
        tensors = load_file(str(path))
        for key, name in EXTENSION_KEYS.items():
            tensors[key] = getattr(extension, name).detach().float().cpu().contiguous()
        save_file(tensors, str(path))
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    return directory


def read_adapter_files(directory: Path) -> AdapterFiles:
    """The unscaled tensors as stored (resume, evaluation); the engine reads them with its own reader."""
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{directory}: not a readable adapter ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    ext: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in EXTENSION_KEYS:
            ext[EXTENSION_KEYS[key]] = tensor
            continue
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name[: -len(f".{part}.weight")], {})[part] = tensor
    weights = {m: (p["lora_A"], p["lora_B"]) for m, p in sorted(pairs.items())}
    extension = Extension(**ext) if ext else None
    if extension is not None and set(ext) != set(EXTENSION_KEYS.values()):
        raise ExportError(f"{directory}: incomplete vocabulary extension ({sorted(ext)})")
    tok = directory / TOKENIZER_FILE
    return AdapterFiles(config=config, weights=weights, extension=extension,
                        tokenizer=tok if tok.is_file() else None)


def copy_adapter(src: Path, dst: Path, lora_only: bool = False) -> Path:
    """``train export``: the checkpoint's adapter files into ``dst`` (created atomically). ``lora_only``
    drops the vocabulary extension (tensors, tokenizer, ``aziza.vocab``) for today's engine."""
    from safetensors.torch import load_file, save_file

    if dst.exists() and any(dst.iterdir()):
        raise ExportError(f"{dst}: exists and is not empty")
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        config = json.loads((src / CONFIG_FILE).read_text())
        if lora_only:
            tensors = {k: v for k, v in load_file(str(src / WEIGHTS_FILE)).items() if k not in EXTENSION_KEYS}
            save_file(tensors, str(staging / WEIGHTS_FILE))
            config.get("aziza", {}).pop("vocab", None)
        else:
            shutil.copyfile(src / WEIGHTS_FILE, staging / WEIGHTS_FILE)
            if (src / TOKENIZER_FILE).is_file():
                shutil.copyfile(src / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
