"""The memory plan: per-slot state measured on the meta device equals what a real backend allocates; the
engine refuses a num_slots that does not fit, before loading, with the numbers; the CLI prints the parts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

import torch

from admin_cli.main import cli
from engine.config import EngineSettings
from engine.moshi.backend import MoshiBackend
from engine.moshi.bench import state_bytes
from engine.moshi.loader import load_model
from engine.moshi.plan import PlanError, check_fits, parse_bytes, plan_memory
from engine.moshi.shapes import get_shape
from engine.moshi.tiny import TINY_LM_CONFIG, TINY_MIMI_CONFIG, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=8)


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_planned_state_per_slot_is_what_a_backend_allocates(tiny_dir: Path, kv: str) -> None:
    measured = []
    for slots in (1, 2):
        loaded = load_model(tiny_dir)
        backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, slots, kv_fp8=kv == "fp8")
        try:
            measured.append(state_bytes(backend))
        finally:
            backend.close()
    plan = plan_memory(TINY_LM_CONFIG, TINY_MIMI_CONFIG, 1 << 30, dtype="fp32", kv_dtype=kv)
    assert plan.state_bytes_per_slot == measured[1] - measured[0]
    weights = sum(t.numel() * t.element_size() for t in loaded.lm.state_dict().values()) + \
        sum(t.numel() * 4 for t in loaded.mimi.parameters())
    assert plan.weight_bytes == weights


def test_fp8_kv_cache_is_a_quarter_of_fp32_plus_scales() -> None:
    full = plan_memory(TINY_LM_CONFIG, TINY_MIMI_CONFIG, 1 << 30, dtype="fp32")
    fp8 = plan_memory(TINY_LM_CONFIG, TINY_MIMI_CONFIG, 1 << 30, dtype="fp32", kv_dtype="fp8")
    # 1 byte + a float32 scale per head_dim (32 here) values, against 4 bytes; the depformer's small
    # cache stays fp32 (measured 0.31 of the full size)
    assert fp8.kv_bytes_per_slot < 0.33 * full.kv_bytes_per_slot


def test_moshi_7b_fits_64_slots_on_an_h100_and_128_on_an_h200_with_fp8() -> None:
    shape = get_shape("moshi-7b")
    h100 = plan_memory(shape.lm_config, None, parse_bytes("80GiB"), dtype="fp8", kv_dtype="fp8",
                       max_adapters=4)
    h200 = plan_memory(shape.lm_config, None, parse_bytes("143771MiB"), dtype="fp8", kv_dtype="fp8",
                       max_adapters=4)
    bf16 = plan_memory(shape.lm_config, None, parse_bytes("80GiB"), dtype="bf16", max_adapters=4)
    assert h100.slots >= 64 and h200.slots >= 128 and bf16.slots < 64
    assert 1.4 * 2**30 < bf16.kv_bytes_per_slot < 1.6 * 2**30  # moshi's ~1.5 GB per call in bf16


def test_a_num_slots_that_does_not_fit_is_refused_with_the_numbers() -> None:
    shape = get_shape("moshi-7b")
    settings = EngineSettings(num_slots=128, dtype="bf16", device="cuda")
    with pytest.raises(PlanError) as exc:
        check_fits(shape.lm_config, None, settings, torch.device("cuda"), total_bytes=parse_bytes("80GiB"))
    message = str(exc.value)
    assert "num_slots=128 does not fit" in message and "GiB per slot" in message and "at most" in message
    ok = EngineSettings(num_slots=8, dtype="fp8", kv_dtype="fp8", device="cuda")
    plan = check_fits(shape.lm_config, None, ok, torch.device("cuda"), total_bytes=parse_bytes("80GiB"))
    assert plan is not None and plan.slots >= 64
    # Host memory is not planned:
    assert check_fits(shape.lm_config, None, settings, torch.device("cpu")) is None


def test_plan_cli_json(tmp_path: Path) -> None:
    (tmp_path / "aziza.toml").write_text("")
    result = CliRunner().invoke(cli, ["engine", "plan", "--gpu-memory", "80GiB", "--shape", "moshi-7b",
                                      "--dtype", "fp8", "--kv-dtype", "fp8", "--json"],
                                env={"AZIZA_CONFIG": str(tmp_path / "aziza.toml")})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("weight_bytes", "state_bytes_per_slot", "activation_bytes_per_slot", "adapter_bytes",
                "prefix_cache_bytes", "reserve_bytes", "slots"):
        assert isinstance(data[key], int) and data[key] >= 0, key
    assert data["slots"] >= 64
    bad = CliRunner().invoke(cli, ["engine", "plan", "--gpu-memory", "lots", "--shape", "moshi-7b"],
                             env={"AZIZA_CONFIG": str(tmp_path / "aziza.toml")})
    assert bad.exit_code == 2 and "is not a size" in bad.output
