"""Installing a persona's LoRA adapter: checked against the engine's model, then copied under data_dir.

The check runs here, when the persona is created or updated, so a mismatch is refused with one line then
rather than discovered on a call: the base model (architecture and, when the model's manifest records it,
the LM weights' sha256), every module the adapter changes (a linear layer of this model, inside
``engine.lora_targets``), every shape, and the rank (<= ``engine.lora_max_rank``). The adapter is then
copied to ``data_dir/adapters/<persona>-<hash>/`` and the persona stores that id: the engine resolves it
under its own data dir (clients never pass paths).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click


def _base_for_checks() -> tuple[dict[str, tuple[int, int]], dict[str, object], list[str], int, Path, Any]:
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    import torch
    from moshi.models import loaders

    from engine.config import EngineConfigError, load_engine_config
    from engine.moshi.loader import ModelError, lm_sha256, model_files
    from engine.moshi.lora import base_identity, linear_shapes, text_shapes

    try:
        config = load_engine_config()
    except EngineConfigError as exc:
        raise click.ClickException(str(exc)) from None
    engine = config.engine
    if not engine.model:
        raise click.ClickException("engine.model is not set: the adapter's base model cannot be checked")
    try:
        files = model_files(engine.model)
    except ModelError as exc:
        raise click.ClickException(f"engine.model: {exc}") from None
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(files.config), device="meta", dtype=torch.bfloat16)
    return (linear_shapes(lm), base_identity(files.config, lm_sha256(files)), list(engine.lora_targets),
            engine.lora_max_rank, config.data_dir, text_shapes(lm, engine.lora_max_added_tokens))


def install_adapter(source: str, persona: str) -> str:
    """Check the adapter directory ``source`` and copy it under data_dir; returns its adapter id."""
    from engine.moshi.lora import CONFIG_FILE, WEIGHTS_FILE, AdapterError, check_adapter, read_adapter
    from engine.moshi.vocab import TOKENIZER_FILE

    path = Path(source)
    if not path.is_dir():
        raise click.ClickException(f"--lora {source}: not a directory (an adapter is a directory holding "
                                   f"{CONFIG_FILE} and {WEIGHTS_FILE}; docs/adapters.md)")
    shapes, base, targets, max_rank, data_dir, text = _base_for_checks()
    digest = hashlib.sha256((path / WEIGHTS_FILE).read_bytes() if (path / WEIGHTS_FILE).is_file() else b"")
    adapter_id = f"{persona}-{digest.hexdigest()[:12]}"
    try:
        adapter = read_adapter(path, adapter_id)
        check_adapter(adapter, shapes, base, targets, max_rank, text)
    except AdapterError as exc:
        raise click.ClickException(str(exc).replace(str(path) + ": ", f"--lora {source}: ")) from None
    target = data_dir / "adapters" / adapter_id
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{adapter_id}-", dir=target.parent))
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
            if (path / name).is_file():  # tokenizer.model: only with a vocabulary extension
                shutil.copy2(path / name, staging / name)
        staging.chmod(0o755)
        staging.rename(target)  # atomic: the engine never sees half an adapter
    return adapter_id


def forget_adapter(adapter_id: str | None, still_used: bool) -> None:
    """Remove an installed adapter no persona uses any more (only inside data_dir/adapters)."""
    if adapter_id is None or still_used:
        return
    from engine.assets import AssetError, AssetStore
    from engine.config import load_engine_config

    try:
        path = AssetStore(load_engine_config().data_dir).adapter_dir(adapter_id)
    except AssetError:
        return
    shutil.rmtree(path, ignore_errors=True)
