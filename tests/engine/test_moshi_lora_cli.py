"""``aziza-admin persona create|update NAME --lora DIR``: checked against engine.model at creation (a
mismatch is refused with one line and stores nothing), installed under data_dir, served by id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

import torch

from admin_cli.main import cli
from engine.moshi.loader import load_model
from engine.moshi.lora import base_identity, linear_shapes, write_adapter
from engine.moshi.tiny import write_tiny_model
from tests.state.fixtures import migrated_fresh_database_url  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=2)


def adapter(tmp: Path, tiny_dir: Path, name: str, rank: int = 4, **base_change: object) -> Path:
    loaded = load_model(tiny_dir)
    base = {**base_identity(loaded.files.config, loaded.lm_sha256), **base_change}
    weights = {n: (torch.randn(rank, i), torch.randn(o, rank))
               for n, (o, i) in linear_shapes(loaded.lm).items() if n.startswith("transformer.")}
    return write_adapter(tmp / name, weights, rank=rank, alpha=rank, base=base)


@pytest.fixture
def admin(migrated_fresh_database_url: str, tmp_path: Path, tiny_dir: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    config = tmp_path / "aziza.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                      f'[engine]\nmodel = "{tiny_dir}"\nlora_max_rank = 8\n')
    env = {"AZIZA_DATABASE_URL": migrated_fresh_database_url, "AZIZA_CONFIG": str(config)}

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    return run


def test_adapter_is_checked_installed_and_stored_by_id(admin, tmp_path: Path, tiny_dir: Path) -> None:  # type: ignore[no-untyped-def]
    good = adapter(tmp_path, tiny_dir, "good")
    result = admin("persona", "create", "sales", "--language", "en", "--lora", str(good))
    assert result.exit_code == 0, result.output
    shown = admin("persona", "show", "sales", "--json")
    import json

    adapter_id = json.loads(shown.stdout)["lora_adapter"]
    assert adapter_id.startswith("sales-")
    installed = tmp_path / "data" / "adapters" / adapter_id
    assert (installed / "adapter_model.safetensors").is_file()
    assert (installed / "adapter_config.json").is_file()

    # Refusals: one line, nothing stored.
    cases = {
        "wrong-base": (adapter(tmp_path, tiny_dir, "wb", architecture="0" * 16), "architecture"),
        "wrong-weights": (adapter(tmp_path, tiny_dir, "ww", lm_sha256="e" * 64), "base weights"),
        "too-big-rank": (adapter(tmp_path, tiny_dir, "rk", rank=16), "rank 16"),
    }
    for name, (path, expected) in cases.items():
        bad = admin("persona", "create", name, "--language", "en", "--lora", str(path))
        assert bad.exit_code != 0
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], bad.stderr
        assert admin("persona", "show", name).exit_code != 0  # not created
    assert len(list((tmp_path / "data" / "adapters").iterdir())) == 1

    # Update to another adapter: the old one, now unused, is removed.
    other = adapter(tmp_path, tiny_dir, "other", rank=8)
    assert admin("persona", "update", "sales", "--lora", str(other)).exit_code == 0
    assert not installed.exists()
    assert admin("persona", "update", "sales", "--no-lora").exit_code == 0
    assert list((tmp_path / "data" / "adapters").iterdir()) == []


def test_persona_sampling_is_stored_and_reaches_the_engine(admin, migrated_fresh_database_url: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    import json

    from bridge.state import repo
    from bridge.state.routing import persona_params

    created = admin("persona", "create", "calm", "--language", "en", "--temp", "0.5", "--top-k", "100")
    assert created.exit_code == 0
    shown = json.loads(admin("persona", "show", "calm", "--json").stdout)
    assert shown["sampling"] == {"temp": 0.5, "top_k": 100}
    assert admin("persona", "update", "calm", "--temp-text", "0").exit_code == 0
    with repo.connect(migrated_fresh_database_url) as conn:
        params = persona_params(repo.get_persona(conn, "calm"))
    assert (params.temp, params.top_k, params.temp_text, params.top_k_text) == (0.5, 100, 0.0, None)
    bad = admin("persona", "update", "calm", "--top-k", "0")
    assert bad.exit_code == 2 and "1<=x<=4096" in bad.output.replace(" ", "")
    assert admin("persona", "update", "calm", "--engine-sampling").exit_code == 0
    with repo.connect(migrated_fresh_database_url) as conn:
        assert repo.get_persona(conn, "calm").sampling == {}
