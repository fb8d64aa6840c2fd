"""``aziza-admin train …``: the Russian/Uzbek fine-tuning pipeline (docs/training_guide.md).

Every command reads one ``train_config.yaml``; torch, peft and moshi are imported inside the commands. A
problem with the input (config, manifest, model, dataset, memory) is one line and exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")

CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=Path("train_config.yaml"), show_default=True,
                      help="The run's train_config.yaml.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")


def _known_errors() -> tuple[type[BaseException], ...]:
    from engine.moshi.loader import ModelError
    from training.align import AlignError
    from training.config import ConfigError
    from training.dataset import DatasetError
    from training.export import ExportError
    from training.judge import JudgeError
    from training.manifest import ManifestError
    from training.model import ModelSetupError
    from training.pipeline import PipelineError
    from training.tokenizer_ext import TokenizerError
    from training.trainer import TrainError

    return (ConfigError, ManifestError, DatasetError, TokenizerError, ModelSetupError, TrainError,
            ExportError, JudgeError, PipelineError, AlignError, ModelError)


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; the pipeline's own errors become one line (click prints ``Error: …``, exit 1)."""
    import os

    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    known = _known_errors()
    try:
        return fn()
    except known as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _config(path: Path, overrides: tuple[str, ...] = ()) -> Any:
    import yaml

    from training.config import ConfigError, load_config

    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.max_steps=100)")
        parsed[key] = yaml.safe_load(value)
    return load_config(path, parsed)


def _log(message: str) -> None:
    click.echo(message, err=True)


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str))
    else:
        click.echo(text)


@click.group()
def train() -> None:
    """Fine-tune the engine's model for Russian and Uzbek personas (LoRA/QLoRA), evaluate, export."""


@train.command("init-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default="kyutai/moshiko-pytorch-bf16", show_default=True,
              help="The engine's model: a weights directory or a cached Hugging Face repo id.")
def init_config(path: Path, model: str) -> None:
    """Write a train_config.yaml with every key, its default and a comment."""
    from training.config import default_config_text

    if path.exists():
        raise click.ClickException(f"{path} exists; not overwriting it")
    path.write_text(default_config_text(model))
    click.echo(f"wrote {path}")


@train.command("tokenizer")
@CONFIG
@JSON
def tokenizer_cmd(config_path: Path, as_json: bool) -> None:
    """Learn new SentencePiece pieces from the manifest's transcripts (tokenizer.extend)."""
    from dataclasses import asdict

    def run() -> None:
        from training.pipeline import learn_tokenizer

        config = _config(config_path)
        ext = learn_tokenizer(config)
        if ext is None:
            _emit({"extend": False}, as_json, "tokenizer.extend is false: nothing to learn")
            return
        data = {k: v for k, v in asdict(ext).items() if k != "pieces"}
        _emit({**data, "path": str(config.tokenizer_path)}, as_json,
              f"{ext.added} new pieces {ext.by_script} (base {ext.base}; {ext.skipped_covered} corpus "
              f"pieces the base already spells were not added) -> {config.tokenizer_path}")

    _guard(run)


@train.command("dataset")
@CONFIG
@click.option("--skip-bad", is_flag=True, help="Skip and count bad manifest rows instead of stopping.")
@JSON
def dataset_cmd(config_path: Path, skip_bad: bool, as_json: bool) -> None:
    """Build training samples (Mimi codes + aligned text + persona prompt) into shards."""
    from dataclasses import asdict

    def run() -> None:
        from training.pipeline import build_dataset

        config = _config(config_path)
        report = build_dataset(config, skip_bad=skip_bad, progress=not as_json and sys.stderr.isatty())
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none"
        _emit(asdict(report), as_json,
              f"{report.counts} in {len(report.shards)} shards, {report.frames} frames, "
              f"{report.seconds:.1f} s; skipped: {skipped} -> {report.directory}")

    _guard(run)


@train.command("run")
@CONFIG
@click.option("--resume", is_flag=True, help="Continue from the run's latest checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key for this run (e.g. train.max_steps=500); repeatable.")
@JSON
def run_cmd(config_path: Path, resume: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    """Fine-tune: LoRA (QLoRA on CUDA) + new token rows; checkpoints; best by validation loss."""

    def run() -> None:
        from training.pipeline import train as train_run

        config = _config(config_path, overrides)
        result = train_run(config, resume=resume, log=None if as_json else _log)
        _emit(result.as_dict(), as_json,
              f"{result.steps} steps in {result.seconds:.0f} s; val_loss {result.val_loss_first:.4f} -> "
              f"{result.val_loss_last:.4f}; best step {result.best_step} ({result.best_val_loss:.4f}) "
              f"{result.best_checkpoint}")

    _guard(run)


@train.command("export")
@CONFIG
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The adapter directory to write (docs/adapters.md).")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A checkpoint directory (default: the best by validation loss).")
@click.option("--lora-only", is_flag=True,
              help="Leave out the vocabulary extension (today's engine refuses it).")
def export_cmd(config_path: Path, out: Path, checkpoint: Path | None, lora_only: bool) -> None:
    """Copy the best checkpoint's adapter files: `aziza-admin persona create NAME --lora OUT` takes them."""

    def run() -> None:
        from training.pipeline import export

        config = _config(config_path)
        path = export(config, out, lora_only=lora_only, checkpoint=checkpoint)
        click.echo(f"adapter -> {path}")

    _guard(run)


@train.command("eval")
@CONFIG
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Adapter directory (default: the best checkpoint); --base for none.")
@click.option("--base", "base_only", is_flag=True, help="Evaluate the base model without an adapter.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report directory (default <run_dir>/eval).")
@JSON
def eval_cmd(config_path: Path, adapter: Path | None, base_only: bool, out: Path | None,
             as_json: bool) -> None:
    """WER/CER per language on the held-out samples; report.json + report-<lang>.md; pass/fail vs targets."""

    def run() -> None:
        from training.pipeline import evaluate_run
        from training.trainer import best_checkpoint

        config = _config(config_path)
        chosen = None if base_only else (adapter or best_checkpoint(config.run_path))
        data = evaluate_run(config, chosen, out)
        lines = [f"{lang}: WER {r['wer']:.1%} (target <= {r['target']:.0%}: "
                 f"{'PASS' if r['passed'] else 'FAIL'}), CER {r['cer']:.1%}, {r['samples']} samples, "
                 f"judge {r['judge']}"
                 for lang, r in data["languages"].items()]
        _emit(data, as_json, "\n".join(lines) or "no agent samples in the validation split")

    _guard(run)


@train.command("estimate")
@click.option("--model", "model_name", type=click.Choice(["moshi-7b", "personaplex-7b"]), default="moshi-7b",
              show_default=True)
@click.option("--rank", default=16, show_default=True)
@click.option("--added", default=4000, show_default=True, help="New text tokens.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seconds", default=60.0, show_default=True, help="Sample length.")
@click.option("--audio-hours", default=100.0, show_default=True, help="Audio per epoch.")
@click.option("--utilisation", default=0.25, show_default=True, help="Assumed fraction of peak bf16 FLOP/s.")
@JSON
def estimate_cmd(model_name: str, rank: int, added: int, batch_size: int, seconds: float, audio_hours: float,
                 utilisation: float, as_json: bool) -> None:
    """Memory on one GPU and time per epoch of a QLoRA run, computed from the model's config."""
    from training.estimate import estimate, largest_batch, lm_config

    config = lm_config(model_name)
    e = estimate(config, rank=rank, added=added, batch_size=batch_size, seconds=seconds,
                 audio_hours=audio_hours, utilisation=utilisation)
    fits = largest_batch(config, 80.0, rank=rank, added=added, seconds=seconds)
    data = {**e.as_dict(), "largest_batch_80gib": fits}
    hours = ", ".join(f"{gpu} {h:.2f} h" for gpu, h in e.hours_per_epoch.items())
    _emit(data, as_json, f"{model_name}: {e.params_total / 1e9:.2f} B parameters; batch {batch_size} x "
                         f"{seconds:.0f} s: {e.gib_total:.1f} GiB (base {e.gib_base:.1f}, trainable "
                         f"{e.gib_trainable:.1f}, activations {e.gib_activations:.1f}, logits "
                         f"{e.gib_logits:.1f}, overhead {e.gib_overhead:.1f}); largest batch in 80 GiB: "
                         f"{fits}; {audio_hours:.0f} h of audio per epoch: {hours} at {utilisation:.0%} "
                         "utilisation")


@train.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Working directory (created): tiny model, speech, run, adapter, reports.")
@click.option("--steps", default=30, show_default=True)
@JSON
def demo_cmd(out: Path, steps: int, as_json: bool) -> None:
    """The whole chain on a tiny random model (CPU, about a minute): espeak-ng ru/uz speech -> dataset ->
    tokenizer extension -> training -> adapter in the engine -> WER report."""

    def run() -> None:
        from training.demo import DemoError, run_demo

        try:
            data = run_demo(out, steps=steps, log=None if as_json else _log)
        except DemoError as exc:
            raise click.ClickException(str(exc)) from None
        wer = ", ".join(f"{k} {v:.1%}" for k, v in data["wer"].items())
        _emit(data, as_json,
              f"val_loss {data['val_loss_first']:.4f} -> {data['val_loss_last']:.4f}; adapter "
              f"{data['adapter_path']} loaded by the engine in {data['adapter_load_ms']:.1f} ms, "
              f"{data['tokens_changed']}/{data['tokens_compared']} tokens changed; WER {wer} "
              f"(judge {data['judge']}); report {data['report']}")

    _guard(run)
