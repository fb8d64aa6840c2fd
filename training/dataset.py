"""Dataset builder: manifest rows -> training samples in shards (``aziza-admin train dataset``).

A sample is the LM's input layout, ``codes`` int16 ``[1 + 2·8, frames]``:
- row 0: the agent's text, one token per 80 ms frame (``training.interleave``), model ids (the extended
  tokenizer's new pieces mapped after moshi's initial token);
- rows 1-8: the agent's audio, Mimi codes from the engine's own Mimi;
- rows 9-16: the caller's audio, Mimi codes.
The persona's prompt is prepended exactly as the engine's prompt builder lays it out
(``engine.moshi.persona.build_plan``: 0.5 s silence, ``<system> text <system>`` one token per frame, 0.5 s
silence, audio of the prompt frames Mimi-encoded as one stream with the recording); its frames carry no
loss (``prompt_frames``).

Every sample is validated; each bad one is skipped with a counted reason (``index.json``). A bad manifest
row stops the build with one line unless ``skip_bad`` (then it is counted too). The dataset directory is
written beside the old one and swapped in at the end: an interrupted build leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.align import Aligner, AlignError, make_aligner
from training.interleave import FRAME_RATE, text_stream
from training.manifest import ManifestError, ManifestRow, load_audio, read_manifest
from training.textnorm import canonical_uz_apostrophes

if TYPE_CHECKING:
    import sentencepiece
    import torch

    from training.config import Config
    from training.tokenizer_ext import VocabExtension

INDEX_FILE = "index.json"
FORMAT = "aziza-dataset/1"
SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920


class DatasetError(RuntimeError):
    pass


@dataclass
class Sample:
    sample_id: str
    language: str
    split: str
    codes: np.ndarray  # int16 [17, frames]
    prompt_frames: int
    transcript: str
    audio: str  # the source file (reports, the eval judge's reference)
    role: str
    agent_channel: int

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])

    def meta(self) -> dict[str, Any]:
        return {"id": self.sample_id, "language": self.language, "split": self.split,
                "prompt_frames": self.prompt_frames, "transcript": self.transcript, "audio": self.audio,
                "role": self.role, "agent_channel": self.agent_channel}


@dataclass
class BuildReport:
    directory: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> language -> samples
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    frames: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_text_shift_frames: int = 0


def is_val(sample_id: str, fraction: float) -> bool:
    """A stable split by id: the first 8 bytes of sha256(id) as a fraction of 2^64."""
    digest = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


class Encoder:
    """Mimi codes of a mono 24 kHz track, in whole 80 ms frames (non-streaming encode: equal to the
    engine's frame-by-frame streaming encode, checked in tests)."""

    def __init__(self, mimi: Any, device: torch.device) -> None:
        self.mimi, self.device = mimi, device

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        import torch

        frames = -(-pcm.size // FRAME_SAMPLES)
        padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
        padded[: pcm.size] = pcm
        with torch.no_grad():
            codes = self.mimi.encode(torch.from_numpy(padded).to(self.device).view(1, 1, -1))
        return codes[0].to("cpu").numpy().astype(np.int16)


@dataclass
class Builder:
    """Turns rows into samples; the model pieces it needs are injected (tests give a tiny model)."""

    encode: Callable[[np.ndarray], np.ndarray]
    tokenizer: sentencepiece.SentencePieceProcessor  # the extended one when extending
    to_model_id: Callable[[int], int]
    pad_id: int
    epad_id: int
    aligner: Aligner
    persona_prompt: str
    min_seconds: float
    max_seconds: float
    min_rms: float
    _prompt: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def prompt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user pcm, agent pcm, text ids) of the persona prompt, as the engine builds it."""
        if self._prompt is None:
            from engine.moshi.persona import build_plan
            from engine.protocol import PersonaParams

            persona = PersonaParams(text_prompt=self.persona_prompt)
            plan = build_plan(persona, self.tokenizer, self.pad_id, None)
            text = np.array([self.to_model_id(int(t)) for t in plan.text_tokens], dtype=np.int64)
            self._prompt = (plan.user_pcm.reshape(-1), plan.agent_pcm.reshape(-1), text)
        return self._prompt

    def encode_word(self, word: str) -> list[int]:
        return [self.to_model_id(int(i)) for i in self.tokenizer.encode(word)]

    def build(self, row: ManifestRow, split: str) -> Sample:
        """One sample, or ManifestError whose ``reason`` is the counted skip reason."""
        agent, caller = load_audio(row, SAMPLE_RATE)
        seconds = agent.size / SAMPLE_RATE
        if seconds < self.min_seconds:
            raise ManifestError(f"{row.sample_id}: {seconds:.2f} s is shorter than data.min_seconds",
                                "too short")
        if seconds > self.max_seconds:
            raise ManifestError(f"{row.sample_id}: {seconds:.1f} s is longer than data.max_seconds",
                                "too long")
        speaker = caller if row.role == "caller" else agent
        if float(np.sqrt(np.mean(speaker.astype(np.float64) ** 2))) < self.min_rms:
            raise ManifestError(f"{row.sample_id}: the {row.role}'s audio is silent", "silent audio")
        transcript = canonical_uz_apostrophes(row.transcript) if row.language == "uz" else row.transcript
        frames = -(-agent.size // FRAME_SAMPLES)
        pad, epad = self.pad_id, self.epad_id
        if row.role == "caller":
            text = np.full(frames, pad, dtype=np.int64)  # the agent says nothing in a caller-only row
        else:
            try:
                spans = self.aligner.align(agent, SAMPLE_RATE, transcript, row.language, row.words)
            except AlignError as exc:
                raise ManifestError(f"{row.sample_id}: alignment failed ({exc})",
                                    "alignment failed") from None
            stream = text_stream(spans, frames, self.encode_word, pad, epad, FRAME_RATE)
            if stream.overflow:
                raise ManifestError(f"{row.sample_id}: {stream.overflow} text tokens do not fit in "
                                    f"{frames} frames", "text does not fit its audio")
            if not (stream.tokens != pad).any():
                raise ManifestError(f"{row.sample_id}: the transcript has no tokens", "no text tokens")
            text = stream.tokens
        user_prompt, agent_prompt, text_prompt = self.prompt()
        agent_codes = self.encode(np.concatenate([agent_prompt, _whole_frames(agent)]))
        user_codes = self.encode(np.concatenate([user_prompt, _whole_frames(caller)]))
        text_all = np.concatenate([text_prompt, text])
        n = text_all.size
        if agent_codes.shape[1] != n or user_codes.shape[1] != n:
            raise ManifestError(f"{row.sample_id}: Mimi gave {agent_codes.shape[1]} frames for {n}",
                                "frame count mismatch")
        codes = np.concatenate([text_all[None].astype(np.int16), agent_codes, user_codes], axis=0)
        return Sample(sample_id=row.sample_id, language=row.language, split=split, codes=codes,
                      prompt_frames=int(text_prompt.size), transcript=transcript, audio=str(row.audio),
                      role=row.role, agent_channel=row.agent_channel)


def _whole_frames(pcm: np.ndarray) -> np.ndarray:
    frames = -(-pcm.size // FRAME_SAMPLES)
    out = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    out[: pcm.size] = pcm
    return out


def write_shard(path: Path, samples: list[Sample]) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {f"s{i}": torch.from_numpy(s.codes.copy()) for i, s in enumerate(samples)}
    save_file(tensors, str(path), metadata={"samples": json.dumps([s.meta() for s in samples],
                                                                  ensure_ascii=False)})


def read_shard(path: Path) -> list[Sample]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = json.loads((handle.metadata() or {})["samples"])
        out = []
        for i, m in enumerate(meta):
            out.append(Sample(sample_id=m["id"], language=m["language"], split=m["split"],
                              codes=handle.get_tensor(f"s{i}"), prompt_frames=int(m["prompt_frames"]),
                              transcript=m["transcript"], audio=m["audio"], role=m["role"],
                              agent_channel=int(m["agent_channel"])))
    return out


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{directory}: no dataset ({INDEX_FILE} missing; run "
                           "`aziza-admin train dataset`)") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an {FORMAT} dataset")
    return dict(index)


def load_split(directory: Path, split: str) -> list[Sample]:
    index = read_index(directory)
    out: list[Sample] = []
    for name in index["shards"]:
        if name.startswith(f"{split}-"):
            out.extend(read_shard(directory / name))
    return out


def build_dataset(rows: list[ManifestRow], builder: Builder, out_dir: Path, val_fraction: float,
                  shard_samples: int, skipped: dict[str, int], info: dict[str, Any],
                  progress: bool = True) -> BuildReport:
    """Build every row into shards under ``out_dir`` (swapped in atomically at the end)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    report = BuildReport(directory=str(out_dir), skipped=dict(skipped))
    pending: dict[str, list[Sample]] = {"train": [], "val": []}
    shard_no = {"train": 0, "val": 0}

    def flush(split: str) -> None:
        if pending[split]:
            name = f"{split}-{shard_no[split]:05d}.safetensors"
            write_shard(staging / name, pending[split])
            report.shards.append(name)
            shard_no[split] += 1
            pending[split] = []

    try:
        for row in tqdm(rows, desc="samples", unit="row", disable=not progress, file=None):
            split = row.split or ("val" if is_val(row.sample_id, val_fraction) else "train")
            try:
                sample = builder.build(row, split)
            except ManifestError as exc:
                report.skipped[exc.reason] = report.skipped.get(exc.reason, 0) + 1
                continue
            pending[split].append(sample)
            by_lang = report.counts.setdefault(split, {})
            by_lang[sample.language] = by_lang.get(sample.language, 0) + 1
            report.frames += sample.frames
            if len(pending[split]) >= shard_samples:
                flush(split)
        flush("train")
        flush("val")
        report.seconds = time.perf_counter() - t0
        index = {"format": FORMAT, **info, **asdict(report)}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _swap_in(staging: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def model_pieces(config: Config) -> tuple[Any, Any, int, int, Any]:
    """(Mimi on the device, base tokenizer, pad id, end-of-padding id, model files): what the builder needs of
    the model, without loading the LM's weights (sizes and shapes are verified; the run verifies hashes)."""
    import sentencepiece as spm
    import torch
    from moshi.models import loaders

    from engine.moshi.loader import ModelError, model_files, num_codebooks, verify_model
    from training.model import resolve_device

    try:
        report = verify_model(config.model_ref, check_hashes=False)
        if not report.ok:
            raise ModelError("; ".join(report.problems[:3]))
        files = model_files(config.model_ref)
    except ModelError as exc:
        raise DatasetError(f"model {config.model!r}: {exc}") from None
    device = resolve_device(config.train.device)
    meta_lm = loaders.get_moshi_lm(None, lm_kwargs=dict(files.config), device="meta", dtype=torch.float32)
    mimi = loaders.get_mimi(files.mimi_weights, files.mimi_config, device=device,
                            num_codebooks=num_codebooks(files.config))
    mimi.eval()
    tokenizer = spm.SentencePieceProcessor(model_file=str(files.tokenizer))
    return (Encoder(mimi, device), tokenizer, int(meta_lm.text_padding_token_id),
            int(meta_lm.end_of_text_padding_id), files)


def build_from_config(config: Config, ext: VocabExtension | None, skip_bad: bool = False,
                      progress: bool = True) -> BuildReport:
    """``aziza-admin train dataset``: the manifest through the engine's Mimi into ``config.dataset_path``."""
    from engine.moshi.loader import lm_sha256
    from engine.moshi.lora import base_identity
    from training import tokenizer_ext

    skipped: dict[str, int] = {}
    manifest = config.path(config.data.manifest)
    rows = [row for row, _info in read_manifest(manifest, list(config.data.languages), skip_bad, skipped)]
    encoder, tokenizer, pad, epad, files = model_pieces(config)
    to_model_id: Callable[[int], int] = int
    if ext is not None:
        tokenizer = tokenizer_ext.load(config.tokenizer_path / tokenizer_ext.TOKENIZER_FILE)
        to_model_id = ext.model_id
    try:
        aligner = make_aligner(config.data.aligner, config.data.aligner_model)
    except AlignError as exc:
        raise DatasetError(f"data.aligner: {exc}") from None
    builder = Builder(encode=encoder, tokenizer=tokenizer, to_model_id=to_model_id, pad_id=pad, epad_id=epad,
                      aligner=aligner, persona_prompt=config.data.persona_prompt,
                      min_seconds=config.data.min_seconds, max_seconds=config.data.max_seconds,
                      min_rms=config.data.min_rms)
    info = {"base": base_identity(files.config, lm_sha256(files)),
            "vocab": ext.as_block() if ext else None, "tokenizer_sha256": ext.sha256 if ext else None,
            "persona_prompt": config.data.persona_prompt, "aligner": config.data.aligner,
            "manifest": str(config.path(config.data.manifest))}
    return build_dataset(rows, builder, config.dataset_path, config.data.val_fraction,
                         config.data.shard_samples, skipped, info, progress)
