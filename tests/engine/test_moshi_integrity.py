"""Weights integrity: a bad file stops the engine with one line naming the file and the tensor.

The case that used to load: 64 KiB of one tensor's bytes overwritten, header intact. With a manifest the
per-tensor hashes name it; without one, the NaN/Inf scan does when the bytes are not finite. Sizes are
checked against the file's own header always (truncated or padded files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

from engine.moshi.loader import (
    MANIFEST_FILE,
    ModelError,
    load_model,
    safetensors_layout,
    verify_model,
)
from engine.moshi.tiny import LM_FILE, MIMI_FILE, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TENSOR = "text_emb.weight"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=13)


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def overwrite(path: Path, tensor: str, data: bytes) -> None:
    """Overwrite the first bytes of ``tensor``'s data in place (header untouched)."""
    _, ranges = safetensors_layout(path)
    lo, hi = ranges[tensor]
    assert hi - lo >= len(data)
    with path.open("r+b") as fh:
        fh.seek(lo)
        fh.write(data)


def test_overwritten_tensor_bytes_are_named_with_a_manifest(tiny_copy: Path) -> None:
    overwrite(tiny_copy / LM_FILE, TENSOR, bytes(range(256)) * 256)  # 64 KiB of finite garbage
    with pytest.raises(ModelError) as exc:
        load_model(tiny_copy)
    message = str(exc.value)
    assert f"{LM_FILE}: tensor {TENSOR} does not match the manifest" in message and "\n" not in message


def test_nan_bytes_are_named_without_a_manifest(tiny_copy: Path) -> None:
    (tiny_copy / MANIFEST_FILE).unlink()
    overwrite(tiny_copy / LM_FILE, TENSOR, b"\xff\xff\xc0\x7f" * (1 << 14))  # float32 NaN, 64 KiB
    assert verify_model(tiny_copy).ok  # shapes and sizes are fine: only the contents are bad
    with pytest.raises(ModelError, match=rf"{LM_FILE}: tensor {TENSOR} holds 16,384 NaN/Inf values"):
        load_model(tiny_copy)


@pytest.mark.parametrize("change", ["truncate", "pad"])
def test_size_is_checked_against_the_header_always(tiny_copy: Path, change: str) -> None:
    (tiny_copy / MANIFEST_FILE).unlink()
    path = tiny_copy / MIMI_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-100] if change == "truncate" else data + b"\0" * 100)
    with pytest.raises(ModelError, match=rf"{MIMI_FILE}: [\d,]+ bytes but its header describes"):
        load_model(tiny_copy)


def test_manifest_sizes_are_checked(tiny_copy: Path) -> None:
    import json

    manifest = json.loads((tiny_copy / MANIFEST_FILE).read_text())
    manifest["files"][LM_FILE]["size"] += 1
    (tiny_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"the manifest says"):
        load_model(tiny_copy)


def test_a_corrupt_model_stops_the_engine_with_one_line(tiny_copy: Path, tmp_path: Path) -> None:
    overwrite(tiny_copy / LM_FILE, TENSOR, b"\x00" * (64 << 10))
    (tmp_path / "aziza.toml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "engine.server", "--backend", "moshi", "--model", str(tiny_copy), "--device",
         "cpu", "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "AZIZA_CONFIG": str(tmp_path / "aziza.toml")})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aziza-engine: cannot start the moshi backend:") and TENSOR in lines[0]
