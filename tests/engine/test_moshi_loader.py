"""Tiny model writer + loader through one path; verify names bad tensors; OOM and bad frames fail clearly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from admin_cli.main import cli
from engine.backend import BackendError, BatchBackend
from engine.moshi.backend import BadFrameError, MoshiBackend
from engine.moshi.loader import ModelError, load_model, verify_model
from engine.moshi.tiny import LM_FILE, MIMI_FILE, TOKENIZER_FILE, write_tiny_model
from engine.protocol import FRAME_SAMPLES, PersonaParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def test_written_weights_load_back_identical(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir)
    saved = load_file(str(tiny_dir / LM_FILE))
    state = loaded.lm.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert loaded.tokenizer.piece_to_id("<system>") > 3
    assert verify_model(tiny_dir).ok


def test_same_seed_same_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", seed=3)
    a, b = load_file(str(tiny_dir / LM_FILE)), load_file(str(again / LM_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_mismatched_tensors_are_named(tiny_copy: Path) -> None:
    state = load_file(str(tiny_copy / LM_FILE))
    del state["text_emb.weight"]
    state["transformer.layers.0.gating.linear_in.weight"] = torch.zeros(3, 3)
    save_file(state, str(tiny_copy / LM_FILE))
    report = verify_model(tiny_copy, check_hashes=False)
    text = "\n".join(report.problems)
    assert "missing tensor text_emb.weight" in text
    assert "transformer.layers.0.gating.linear_in.weight has shape [3, 3]" in text
    with pytest.raises(ModelError, match=r"text_emb\.weight"):
        load_model(tiny_copy)
    result = CliRunner().invoke(cli, ["model", "verify", str(tiny_copy), "--no-hash"])
    assert result.exit_code == 1
    assert "missing tensor text_emb.weight" in result.output


def test_garbage_files_and_hash_mismatch(tiny_copy: Path) -> None:
    (tiny_copy / MIMI_FILE).write_bytes(b"\x00garbage" * 10)
    with (tiny_copy / TOKENIZER_FILE).open("ab") as fh:
        fh.write(b"x")
    problems = "\n".join(verify_model(tiny_copy).problems)
    assert "mimi.safetensors: unreadable safetensors file" in problems
    assert "tokenizer.model: sha256" in problems
    (tiny_copy / LM_FILE).unlink()
    with pytest.raises(ModelError, match=r"missing file 'model\.safetensors'"):
        verify_model(tiny_copy)
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        verify_model(tiny_copy)


def test_out_of_memory_names_the_bytes_needed(tiny_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"out of memory loading .*needs [\d,]+ bytes"):
        load_model(tiny_dir, memory_limit_bytes=1_000_000)


def test_unknown_model_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="no such directory"):
        verify_model(str(tmp_path / "nope" / "deeper"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="aziza-admin model pull"):
        verify_model("someone/not-downloaded")


def test_pull_from_an_unreachable_hub_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "admin_cli.main", "model", "pull", "kyutai/x", "--dir",
                           str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot download kyutai/x" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_frames_and_slots_are_backend_errors_and_change_nothing(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, 2)
    rng = np.random.default_rng(0)
    good = [rng.normal(0, 0.1, FRAME_SAMPLES).astype(np.float32) for _ in range(4)]
    assert isinstance(backend, BatchBackend)
    try:
        backend.start_slot(0, PersonaParams())
        backend.step({0: good[0]})
        bad_inputs = [
            {0: good[1], 1: np.zeros(FRAME_SAMPLES - 1, np.float32)},  # wrong size (e.g. 16 kHz framing)
            {0: good[1], 1: np.full(FRAME_SAMPLES, np.nan, np.float32)},
            {0: good[1], 5: good[2]},  # no such slot
        ]
        for frames in bad_inputs:
            with pytest.raises(BadFrameError) as info:
                backend.step(frames)
            assert info.value.slots and 0 not in info.value.slots
        with pytest.raises(BackendError, match="out of range"):
            backend.start_slot(7, PersonaParams())
        backend.step({0: good[1]})
        after = backend.last_tokens[0].copy()
    finally:
        backend.close()
    # The failed steps did not advance slot 0: a clean run gives the same tokens.
    clean = MoshiBackend(*(lambda m: (m.lm, m.mimi, m.tokenizer))(load_model(tiny_dir)), 2)
    try:
        clean.start_slot(0, PersonaParams())
        clean.step({0: good[0]})
        clean.step({0: good[1]})
        np.testing.assert_array_equal(clean.last_tokens[0], after)
    finally:
        clean.close()


def test_bench_cli_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "bench", "engine", "--slots", "1,2", "--ticks", "2", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["slots"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tick_p50_ms"] > 0 and r["tick_p99_ms"] >= r["tick_p50_ms"]
        assert r["realtime_factor"] == pytest.approx(80 / r["tick_p50_ms"], rel=1e-2)
        assert r["state_bytes_per_slot"] > 0
    assert rows[0]["batching_efficiency"] == 1.0
    bad = CliRunner().invoke(cli, ["bench", "engine", "--slots", "0,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output


def test_model_list_shows_installed_dirs(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZIZA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    empty = CliRunner().invoke(cli, ["model", "list"])
    assert empty.exit_code == 0 and "no models" in empty.output
    shutil.copytree(tiny_dir, tmp_path / "data" / "models" / "tiny-test")
    listed = CliRunner().invoke(cli, ["model", "list"])
    assert listed.exit_code == 0 and "tiny-test" in listed.output
    ok = CliRunner().invoke(cli, ["model", "verify", str(tmp_path / "data" / "models" / "tiny-test")])
    assert ok.exit_code == 0 and "3 files hashed: OK" in ok.output
