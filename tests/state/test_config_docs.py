"""docs/configuration.md names every configuration field with its env variable and default."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from bridge.config import Settings
from engine.config import EngineConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _fields() -> list[tuple[str, str, object]]:
    found = []
    fields = {**Settings.model_fields, **EngineConfig.model_fields}  # one file: the bridge's and the engine's
    for name, field in fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for inner, inner_field in sub.model_fields.items():
                found.append((inner, f"AZIZA_{name.upper()}__{inner.upper()}", inner_field.default))
        else:
            found.append((name, f"AZIZA_{name.upper()}", field.default))
    return found


def test_every_field_is_documented_with_its_env_var_and_default() -> None:
    rows = {
        line.split("|")[3].strip(" `"): line for line in DOC.read_text().splitlines() if line.count("|") >= 5
    }
    missing = [env for _, env, _ in _fields() if env not in rows]
    assert not missing, f"docs/configuration.md lacks {missing}"
    for name, env, default in _fields():
        row = rows[env]
        assert f"`{name}`" in row
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert str(default) in row, f"{env}: default {default!r} not in {row!r}"
