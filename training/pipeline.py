"""The pipeline's steps as functions of a config, shared by ``aziza-admin train …`` and the demo.

    tokenizer  (learn new pieces from the manifest's train transcripts)  -> <run_dir>/tokenizer/
    dataset    (manifest -> Mimi codes + aligned text, shards)            -> <dataset_dir>/
    run        (LoRA + new rows, checkpoints, best by validation loss)    -> <run_dir>/checkpoints/, best.json
    export     (the best checkpoint's adapter files)                      -> any directory
    eval       (WER/CER per language against the targets)                 -> <run_dir>/eval/
    engine_check (the adapter in the engine's MoshiBackend for a persona: load time, changed tokens)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import tokenizer_ext
from training.tokenizer_ext import VocabExtension

if TYPE_CHECKING:
    from training.config import Config
    from training.dataset import BuildReport, Sample
    from training.trainer import RunResult

VOCAB_FILE = "vocab.json"


class PipelineError(RuntimeError):
    pass


def learn_tokenizer(config: Config) -> VocabExtension | None:
    """New pieces from the train rows' transcripts (Uzbek apostrophes made canonical first)."""
    from engine.moshi.loader import ModelError, model_files
    from training.manifest import read_manifest
    from training.textnorm import canonical_uz_apostrophes

    if not config.tokenizer.extend:
        return None
    skipped: dict[str, int] = {}
    rows = read_manifest(config.path(config.data.manifest), list(config.data.languages), True, skipped)
    corpus = [canonical_uz_apostrophes(r.transcript) if r.language == "uz" else r.transcript
              for r, _ in rows if r.split != "val"]
    try:
        files = model_files(config.model_ref)
    except ModelError as exc:
        raise PipelineError(f"model {config.model!r}: {exc}") from None
    out = config.tokenizer_path
    ext = tokenizer_ext.extend_tokenizer(files.tokenizer, corpus, out, int(files.config["text_card"]),
                                         config.tokenizer.new_pieces, config.tokenizer.character_coverage,
                                         max_added=config.tokenizer.max_added)
    (out / VOCAB_FILE).write_text(json.dumps(asdict(ext), ensure_ascii=False, indent=1) + "\n")
    return ext


def read_vocab(config: Config) -> VocabExtension | None:
    if not config.tokenizer.extend:
        return None
    path = config.tokenizer_path / VOCAB_FILE
    try:
        return VocabExtension(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no tokenizer extension yet (run `aziza-admin train tokenizer`, or set "
                            "tokenizer.extend: false)") from None


def build_dataset(config: Config, skip_bad: bool = False, progress: bool = True) -> BuildReport:
    from training.dataset import build_from_config

    return build_from_config(config, read_vocab(config), skip_bad=skip_bad, progress=progress)


def load_splits(config: Config) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    from training.dataset import load_split, read_index

    index = read_index(config.dataset_path)
    vocab = read_vocab(config)
    if (vocab.sha256 if vocab else None) != index.get("tokenizer_sha256"):
        raise PipelineError(f"{config.dataset_path}: built with another tokenizer than "
                            f"{config.tokenizer_path} (rebuild it: aziza-admin train dataset)")
    return load_split(config.dataset_path, "train"), load_split(config.dataset_path, "val"), index


def train(config: Config, resume: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] | None = None) -> RunResult:
    from training.model import prepare
    from training.trainer import Trainer

    train_set, val_set, _ = load_splits(config)
    vocab = read_vocab(config)
    tm = prepare(config, added=vocab.added if vocab else 0, seed=config.seed)
    tok = config.tokenizer_path / tokenizer_ext.TOKENIZER_FILE if vocab else None
    trainer = Trainer(config, tm, train_set, val_set, vocab, tok)
    return trainer.run(resume=resume, stop_after=stop_after, log=log)


def export(config: Config, out: Path, lora_only: bool = False, checkpoint: Path | None = None) -> Path:
    from training.export import copy_adapter
    from training.trainer import best_checkpoint

    return copy_adapter(checkpoint or best_checkpoint(config.run_path), out, lora_only=lora_only)


def evaluate_run(config: Config, adapter: Path | None, out_dir: Path | None = None,
                 floor: bool = True) -> dict[str, Any]:
    from training.dataset import load_split
    from training.evaluate import evaluate, load_adapted, source_speech, write_reports
    from training.judge import make_judge

    val = load_split(config.dataset_path, "val")
    references: list[tuple[str, str, np.ndarray]] = []
    if config.eval.judge == "template":  # the closed set: every agent sentence of the corpus, not only val's
        corpus = load_split(config.dataset_path, "train") + val
        seen: set[tuple[str, str]] = set()
        for s in corpus:
            if s.role == "agent" and (s.language, s.transcript) not in seen:
                seen.add((s.language, s.transcript))
                references.append((s.language, s.transcript, source_speech(s)))
    judge = make_judge(config.eval.judge, config.eval.judge_model, references)
    vocab = read_vocab(config)
    lm, mimi, _tok = load_adapted(config, adapter, added=vocab.added if vocab else 0)
    reports = evaluate(config, lm, mimi, val, judge, floor=floor)
    return write_reports(reports, out_dir or config.run_path / "eval", str(adapter) if adapter else None)


@dataclass
class EngineCheck:
    adapter_id: str
    adapter_load_ms: float  # read + check by the engine's AdapterBank, first load (not cached)
    frames: int
    tokens_changed: int  # (frame, stream) tokens that differ from the same persona without the adapter
    tokens_total: int
    warnings: list[str]


def engine_check(config: Config, adapter_dir: Path, sample: Sample, frames: int = 24) -> EngineCheck:
    """The adapter installed as the engine installs it (``data_dir/adapters/<id>/``), served by
    ``MoshiBackend`` for a persona with the run's prompt; the same call without the adapter for contrast."""
    from engine.assets import AssetStore
    from engine.moshi.backend import AdapterOptions, MoshiBackend
    from engine.moshi.loader import load_model
    from engine.moshi.lora import base_identity, read_config
    from engine.protocol import FRAME_SAMPLES, PersonaParams
    from training.evaluate import source_speech

    adapter_config = read_config(adapter_dir)
    rank = int(adapter_config["r"])
    added = int((adapter_config["aziza"].get("vocab") or {}).get("added", 0))
    audio = source_speech(sample)
    n = min(frames, audio.size // FRAME_SAMPLES)
    pcm = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    with tempfile.TemporaryDirectory(prefix="aziza-engine-check-") as tmp:
        adapter_id = "training-check"
        shutil.copytree(adapter_dir, Path(tmp) / "adapters" / adapter_id)
        loaded = load_model(config.model_ref)
        backend = MoshiBackend(
            loaded.lm, loaded.mimi, loaded.tokenizer, num_slots=2, assets=AssetStore(Path(tmp)),
            adapters=AdapterOptions(pages=1, max_rank=max(rank, 1), targets=("transformer.*",),
                                    base=base_identity(loaded.files.config, loaded.lm_sha256),
                                    max_added=added))
        try:
            prompt = config.data.persona_prompt
            warnings = backend.start_slot(0, PersonaParams(name="trained", text_prompt=prompt,
                                                           adapter_id=adapter_id), seed=1)
            load_ms = backend.last_adapter_ms
            warnings += backend.start_slot(1, PersonaParams(name="base", text_prompt=prompt), seed=1)
            changed = total = 0
            for frame in pcm:
                backend.step({0: frame, 1: frame})
                a, b = backend.last_tokens[0], backend.last_tokens[1]
                valid = (a >= 0) & (b >= 0)
                changed += int((a[valid] != b[valid]).sum())
                total += int(valid.sum())
        finally:
            backend.close()
    return EngineCheck(adapter_id=adapter_id, adapter_load_ms=load_ms, frames=n, tokens_changed=changed,
                       tokens_total=total, warnings=warnings)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0
