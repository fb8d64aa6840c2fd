"""The whole chain on a tiny model (``aziza-admin train demo --out DIR --json``), then what it left behind:
dataset layout, adapter format and engine loading, reports; resume reproducing the loss curve; checkpoints
that survive a failed write; out of memory with the batch size that fits."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")
pytest.importorskip("peft")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from admin_cli.main import cli
from engine.moshi.loader import load_model
from engine.moshi.lora import (
    AdapterError,
    base_identity,
    check_adapter,
    linear_shapes,
    read_adapter,
    text_shapes,
)
from engine.moshi.persona import build_plan, encode_frames
from engine.protocol import PersonaParams
from training import pipeline
from training.config import Config, load_config
from training.dataset import Encoder, load_split
from training.evaluate import source_speech
from training.losses import LossSums
from training.model import prepare
from training.trainer import STATE_FILE, Trainer, TrainError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The demo chain, built once per test run: the xdist workers share it (each built its own, ~25 s of CPU
    apiece, the suite's longest setup). The tests only read it; what they write goes to their tmp_path."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # (the run's, shared by workers)
    out, done = root / "train-demo", root / "train-demo.json"
    with open(root / "train-demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds it; the others wait, then read it
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # (a worker whose build failed left it half made)
            out.mkdir()
            result = CliRunner().invoke(cli, ["train", "demo", "--out", str(out), "--json"])
            assert result.exit_code == 0, result.output
            done.write_text(result.output.strip().splitlines()[-1])
    return out, json.loads(done.read_text())


def test_demo_runs_the_chain_and_reports_its_numbers(demo: tuple[Path, dict[str, Any]]) -> None:
    _, data = demo
    for key in ("val_loss_first", "val_loss_last", "adapter_path", "adapter_load_ms", "wer"):
        assert key in data, key
    assert data["val_loss_last"] < data["val_loss_first"]  # the validation loss decreases
    assert data["steps"] == 30 and data["best_step"] is not None
    assert set(data["wer"]) == {"ru", "uz"} and all(w >= 0 for w in data["wer"].values())
    assert data["wer_target"] == {"ru": 0.15, "uz": 0.20}
    # the adapter changes the engine's tokens
    assert data["tokens_changed"] > 0 and data["tokens_compared"] > 0
    assert data["engine_warnings"] == []
    assert data["adapter_load_ms"] > 0
    assert data["dataset"]["counts"] == {"train": {"ru": 8, "uz": 8}, "val": {"ru": 2, "uz": 2}}
    assert data["vocab"]["base"] == 128 and data["vocab"]["added"] > 0
    # the template judge is exact on the source recordings: the pipeline measures, the model is what fails
    assert data["judge_floor_wer"] == {"ru": 0.0, "uz": 0.0}
    report = json.loads(Path(data["report"]).read_text())
    assert set(report["languages"]) == {"ru", "uz"}
    for lang in ("ru", "uz"):
        md = (Path(data["report"]).parent / f"report-{lang}.md").read_text()
        assert "| WER |" in md and ("PASS" in md or "FAIL" in md)


def test_samples_have_the_engines_prompt_and_mimi_codes(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    config = load_config(out / "train_config.yaml")
    samples = load_split(config.dataset_path, "train")
    loaded = load_model(config.model_ref)
    sample = samples[0]
    plan = build_plan(PersonaParams(text_prompt=config.data.persona_prompt), loaded.tokenizer, 3, None)
    # the prompt's text frames are the engine's (the demo prompt is spelled by the base tokenizer)
    assert sample.prompt_frames == plan.frames
    assert sample.codes[0, : plan.frames].tolist() == plan.text_tokens.tolist()
    assert sample.codes.shape[0] == 17 and sample.codes.dtype == np.int16
    text = sample.codes[0, plan.frames:]
    assert (text != 3).sum() > 0 and (text > 128).any()  # words, with new (extension) token ids
    # the builder's non-streaming Mimi encode equals the engine's frame-by-frame streaming encode
    pcm = source_speech(sample)[: 1920 * 10]
    with torch.no_grad(), loaded.mimi.streaming(1):
        streamed = encode_frames(loaded.mimi, pcm.reshape(10, 1920), torch.device("cpu"))
    assert np.array_equal(Encoder(loaded.mimi, torch.device("cpu"))(pcm), streamed[0].numpy())


def test_exported_adapter_is_the_engines_format(demo: tuple[Path, dict[str, Any]]) -> None:
    out, data = demo
    config = load_config(out / "train_config.yaml")
    loaded = load_model(config.model_ref)
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    full, lora_only = Path(data["adapter_path"]), Path(data["adapter_lora_only_path"])
    cfg = json.loads((full / "adapter_config.json").read_text())
    assert cfg["aziza"]["vocab"] == {"base": 128, "added": data["vocab"]["added"]}
    assert cfg["aziza"]["architecture"] == base["architecture"]
    assert cfg["aziza"]["lm_sha256"] == base["lm_sha256"]
    tensors = load_file(str(full / "adapter_model.safetensors"))
    added = data["vocab"]["added"]
    assert tensors["base_model.model.text_emb.extension"].shape == (added, 128)
    assert tensors["base_model.model.text_linear.extension"].shape == (added, 128)
    assert (full / "tokenizer.model").is_file()
    # The engine serves the full adapter, new tokens included (the demo's engine check used it); an engine
    # configured for fewer new tokens refuses it with one line; the LoRA-only export passes every check.
    full_adapter = read_adapter(full, "full")
    assert full_adapter.extension is not None and full_adapter.extension.added == added
    assert data["engine_refuses_extension"] is None and data["engine_adapter"] == str(full)
    check_adapter(full_adapter, linear_shapes(loaded.lm), base, ["transformer.*"], max_rank=32,
                  text=text_shapes(loaded.lm, added))
    with pytest.raises(AdapterError, match="at most"):
        check_adapter(full_adapter, linear_shapes(loaded.lm), base, ["transformer.*"], max_rank=32,
                      text=text_shapes(loaded.lm, added - 1))
    adapter = read_adapter(lora_only, "lora")
    check_adapter(adapter, linear_shapes(loaded.lm), base, ["transformer.*"], max_rank=32)
    assert sorted(adapter.weights) == cfg["target_modules"]
    assert all(".self_attn." in m or ".gating." in m for m in adapter.weights)


def _config(out: Path, run_dir: Path, **train: Any) -> Config:
    """The demo's config in a fresh run_dir holding the demo's tokenizer and dataset."""
    if not run_dir.exists():
        for part in ("tokenizer", "dataset"):
            shutil.copytree(out / "run" / part, run_dir / part)
    overrides = {"run_dir": str(run_dir), "train.max_steps": 6, "train.eval_every": 3,
                 "train.checkpoint_every": 3, "train.keep_checkpoints": 5}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_config(out / "train_config.yaml", overrides)


def _trainer(config: Config) -> Trainer:
    train_set, val_set, _ = pipeline.load_splits(config)
    vocab = pipeline.read_vocab(config)
    tm = prepare(config, added=vocab.added if vocab else 0, seed=config.seed)
    tok = config.tokenizer_path / "tokenizer.model"
    return Trainer(config, tm, train_set, val_set, vocab, tok)


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_reproduces_the_loss_curve(demo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = demo
    straight = _trainer(_config(out, tmp_path / "a")).run()
    first = _trainer(_config(out, tmp_path / "b")).run(stop_after=3)
    assert first.steps == 3
    resumed = _trainer(_config(out, tmp_path / "b")).run(resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    want = {h.step: h for h in straight.history}
    got = {h.step: h for h in resumed.history}
    assert sorted(got) == sorted(want) == [0, 1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        loss, expected = got[step].loss, want[step].loss
        assert loss is not None and expected is not None
        assert abs(loss - expected) <= 1e-6, (step, loss, expected)
    for step in (0, 3, 6):
        assert abs(got[step].val_loss - want[step].val_loss) <= 1e-6  # type: ignore[operator]
    assert resumed.best_step == straight.best_step
    # a checkpoint run_dir is not silently reused
    with pytest.raises(TrainError, match="already holds checkpoints"):
        _trainer(_config(out, tmp_path / "b")).run()


def test_a_failed_checkpoint_write_leaves_earlier_ones_intact(
        demo: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = demo
    trainer = _trainer(_config(out, tmp_path / "run"))
    trainer.run(stop_after=3)
    ckpts = tmp_path / "run" / "checkpoints"
    before = _digests(ckpts)
    assert "step-000003/" + STATE_FILE in before

    def disk_full(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        trainer.run(resume=True)
    assert _digests(ckpts) == before  # step-000003 untouched, no half-written step-000006
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000003"]
    monkeypatch.undo()
    resumed = _trainer(_config(out, tmp_path / "run")).run(resume=True)  # and it resumes from it
    assert resumed.resumed_from == 3 and resumed.steps == 6


def test_out_of_memory_names_the_batch_size_that_fits(demo: tuple[Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    out, _ = demo
    trainer = _trainer(_config(out, tmp_path / "run", batch_size=4))
    trainer.run(stop_after=3)
    before = _digests(tmp_path / "run" / "checkpoints")
    real = trainer.batch_loss
    tried: list[int] = []

    def device_fits_two(samples: list[Any]) -> LossSums:  # a device with room for two samples' activations
        tried.append(len(samples))
        if len(samples) > 2 and trainer.tm.lm.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(samples)

    trainer.batch_loss = device_fits_two
    with pytest.raises(TrainError) as err:
        trainer.run(resume=True)
    message = str(err.value)
    assert "out of CPU memory at step 4 with train.batch_size=4" in message
    assert "train.batch_size=2 fits" in message and "train.grad_accum=2" in message and "\n" not in message
    assert tried == [4, 2]  # the failed step, then the probe that fit
    assert _digests(tmp_path / "run" / "checkpoints") == before


def test_cli_export_and_eval(demo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = demo
    config_path = str(out / "train_config.yaml")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "export", "--config", config_path, "--out", str(tmp_path / "a"),
                                 "--lora-only"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
    result = runner.invoke(cli, ["train", "export", "--config", config_path, "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "exists and is not empty" in result.output
    result = runner.invoke(cli, ["train", "eval", "--config", config_path, "--base", "--json",
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["adapter"] is None and set(report["languages"]) == {"ru", "uz"}
    assert (tmp_path / "eval" / "report-ru.md").is_file()
