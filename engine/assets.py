"""Persona assets by id, under the engine's own data dir: clients name them, never pass paths.

    data_dir/voices/<voice_prompt_id>        a WAV (what `aziza-admin persona create --voice-prompt` stores)
    data_dir/adapters/<adapter_id>/          a LoRA adapter (docs/adapters.md)

An id is one path component (``engine.protocol.ASSET_ID``), checked again here so that no caller can reach
outside these folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.protocol import ASSET_ID

DEFAULT_DATA_DIR = Path("/var/lib/aziza")
VOICES = "voices"
ADAPTERS = "adapters"


class AssetError(LookupError):
    """The id is malformed, or names nothing under the data dir."""


@dataclass(frozen=True)
class AssetStore:
    data_dir: Path

    def _resolve(self, folder: str, asset_id: str) -> Path:
        if not isinstance(asset_id, str) or not ASSET_ID.match(asset_id):
            raise AssetError(f"{asset_id!r} is not an asset id")
        base = (self.data_dir / folder).resolve()
        path = (base / asset_id).resolve()
        if path.parent != base:  # a symlink pointing elsewhere
            raise AssetError(f"{folder}/{asset_id} resolves outside {base}")
        return path

    def voice(self, voice_id: str) -> Path:
        path = self._resolve(VOICES, voice_id)
        if not path.is_file():
            raise AssetError(f"voice prompt {voice_id!r}: no file {path}")
        return path

    def adapter(self, adapter_id: str) -> Path:
        path = self._resolve(ADAPTERS, adapter_id)
        if not path.is_dir():
            raise AssetError(f"adapter {adapter_id!r}: no directory {path}")
        return path

    def adapter_dir(self, adapter_id: str) -> Path:
        """Where an adapter with this id lives (or will be installed); not checked for existence."""
        return self._resolve(ADAPTERS, adapter_id)
