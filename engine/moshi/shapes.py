"""Named model shapes, and random-weight models built at those shapes in memory (no download, no disk).

``random:moshi-7b`` is Kyutai's Moshiko architecture (LM dim 4096 × 32 layers, depformer 1024 × 6, real Mimi)
with random weights: what the GPU benchmark times and what the memory planner sizes. ``tiny`` is the test
model of ``engine.moshi.tiny``. Random weights give meaningless tokens but the exact kernels, shapes and
memory of the real checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

if TYPE_CHECKING:
    import torch

    from engine.moshi.loader import LoadedModel

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelShape:
    name: str
    lm_config: dict[str, Any]
    mimi_config: dict[str, Any] | None  # None: moshi's own (the real Mimi)


def _moshi_7b() -> dict[str, Any]:
    from moshi.models import loaders

    return dict(loaders._lm_kwargs)


def _personaplex_7b() -> dict[str, Any]:
    # PersonaPlex: Moshi 7B with 16 depformer steps (the user stream's 8 codebooks are predicted too).
    cfg = _moshi_7b()
    cfg.update(dep_q=16, delays=[0] + [0, 1, 1, 1, 1, 1, 1, 1] * 2)
    return cfg


def get_shape(name: str) -> ModelShape:
    from engine.moshi.tiny import TINY_LM_CONFIG, TINY_MIMI_CONFIG

    if name == "tiny":
        return ModelShape("tiny", dict(TINY_LM_CONFIG), dict(TINY_MIMI_CONFIG))
    if name == "moshi-7b":
        return ModelShape("moshi-7b", _moshi_7b(), None)
    if name == "personaplex-7b":
        return ModelShape("personaplex-7b", _personaplex_7b(), None)
    raise ValueError(f"unknown model shape {name!r} (tiny, moshi-7b, personaplex-7b)")


SHAPE_NAMES = ("tiny", "moshi-7b", "personaplex-7b")


def is_random_ref(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def build_random_model(shape_name: str, device: torch.device | str, dtype: torch.dtype,
                       seed: int = 0) -> LoadedModel:
    """LM + Mimi of ``shape_name`` with random weights, built directly on ``device`` (seconds at 7B)."""
    import torch
    from moshi.models import loaders

    from engine.moshi.loader import LoadedModel, ModelFiles, num_codebooks
    from engine.moshi.tiny import randomize_codebooks

    shape = get_shape(shape_name)
    device = torch.device(device)
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=shape.lm_config, device=device, dtype=dtype)
    lm.eval()
    mimi = loaders.get_mimi(None, mimi_config=shape.mimi_config, device=device,
                            num_codebooks=num_codebooks(shape.lm_config))
    randomize_codebooks(mimi, torch)
    mimi.eval()
    files = ModelFiles(directory=Path(f"{RANDOM_PREFIX}{shape_name}"),
                       config=shape.lm_config, lm_weights=None, mimi_weights=None,  # type: ignore[arg-type]
                       tokenizer=None, mimi_config=shape.mimi_config)  # type: ignore[arg-type]
    return LoadedModel(lm=lm, mimi=mimi, tokenizer=None, files=files)
