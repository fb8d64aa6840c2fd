"""Evaluation (``aziza-admin train eval``): WER/CER of the model's speech on the held-out samples.

For each validation sample the adapted model runs the sample frame by frame, as the engine would: the
persona prompt (text and agent audio forced, as the prompt builder does), then the caller's audio as input
and the reference transcript forced on the text stream (one token per 80 ms frame, the layout it was trained
on) while the model generates the agent's audio. Mimi decodes that audio, the judge transcribes it, and WER
/ CER against the transcript (both normalised per language, ``training.textnorm``) are computed with jiwer.
So the number measures how intelligibly the model speaks the language's text; it is not a measure of what
the model would choose to say. The judge's own floor (its WER on the source recordings) is reported beside.

The adapter is applied by merging ``W + scaling·B·A`` into a copy of the base (what the engine's batched
LoRA computes, by its anchor test) and installing the extension's rows; the tokenizer is the adapter's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.dataset import SAMPLE_RATE, Sample
from training.export import read_adapter_files
from training.judge import Judge
from training.textnorm import normalize

if TYPE_CHECKING:
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from training.config import Config


@dataclass
class SampleResult:
    sample_id: str
    reference: str
    hypothesis: str
    wer: float
    cer: float
    floor_hypothesis: str | None = None


@dataclass
class LanguageReport:
    language: str
    samples: int
    wer: float
    cer: float
    target: float
    passed: bool
    judge: str
    judge_floor_wer: float | None
    results: list[SampleResult] = field(default_factory=list)


def error_rates(references: list[str], hypotheses: list[str], language: str) -> tuple[float, float]:
    """Corpus WER and CER (jiwer: total edits / total reference words or characters), normalised text."""
    import jiwer

    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    if not refs or any(not r for r in refs):
        raise ValueError("every reference must have words after normalisation")
    return float(jiwer.wer(refs, hyps)), float(jiwer.cer(refs, hyps))


def load_adapted(config: Config, adapter_dir: Path | None, added: int = 0) -> tuple[LMModel, MimiModel, Any]:
    """The base model (compute dtype, no quantization) with the adapter merged and its extension rows.
    Without an extension but with a dataset that has ``added`` new tokens, the rows training starts from
    (mean-initialised) are installed, so the base can be scored on the same text."""
    from engine.moshi.loader import load_model
    from engine.moshi.lora import scaling_of
    from training import tokenizer_ext
    from training.model import extension_of, install_extension, mean_extension, resolve_device

    device = resolve_device(config.train.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    loaded = load_model(config.model_ref, device=device, dtype=dtype)
    lm, tokenizer = loaded.lm, loaded.tokenizer
    if adapter_dir is not None:
        files = read_adapter_files(adapter_dir)
        scaling = scaling_of(files.config)
        with torch.no_grad():
            for name, (a, b) in files.weights.items():
                weight = lm.get_submodule(name).weight
                assert isinstance(weight, torch.Tensor)
                weight += (scaling * (b.float() @ a.float())).to(weight.dtype).to(weight.device)
        if files.extension is not None:
            install_extension(lm, files.extension, trainable=False)
            assert files.tokenizer is not None
            tokenizer = tokenizer_ext.load(files.tokenizer)
    if added and extension_of(lm) is None:
        install_extension(lm, mean_extension(lm, added), trainable=False)
    lm.eval()
    loaded.mimi.eval()
    return lm, loaded.mimi, tokenizer


@torch.no_grad()
def speak(lm: LMModel, mimi: MimiModel, sample: Sample, temp: float, seed: int) -> np.ndarray:
    """The agent's speech for ``sample``'s conversation frames, text forced, 24 kHz float32."""
    from moshi.models.lm import LMGen

    from engine.moshi.persona import agent_replace_tokens

    device = lm.device
    torch.manual_seed(seed)
    codes = torch.from_numpy(sample.codes.astype(np.int64)).to(device)
    T, dep_q = sample.frames, lm.dep_q
    delays = list(lm.delays[1: dep_q + 1])
    forced = {"token": 0}

    def force_text(logits: torch.Tensor) -> None:
        token = forced["token"]
        logits.fill_(float("-inf"))
        logits[..., token] = 0.0

    gen = LMGen(lm, use_sampling=temp > 0, temp=max(temp, 1e-3), temp_text=0.0, top_k=250,
                on_text_logits_hook=force_text)
    agent_prompt = codes[1: 1 + dep_q][None]
    out_frames: list[torch.Tensor] = []
    max_delay = gen.max_delay
    with gen.streaming(1):
        for t in range(T + max_delay):
            i = min(t, T - 1)
            forced["token"] = int(codes[0, i]) if t < T else int(lm.text_padding_token_id)
            replace = agent_replace_tokens(agent_prompt, t, delays) if t < sample.prompt_frames else None
            out = gen.step(codes[1 + dep_q:, i: i + 1][None], depformer_replace_tokens=replace)
            if out is not None:
                out_frames.append(out[0, 1:, 0])
    audio = torch.stack(out_frames, dim=1)[:, sample.prompt_frames: T]  # [dep_q, frames]
    pcm = mimi.decode(audio.clamp(min=0)[None])
    return pcm[0, 0].float().cpu().numpy()


def source_speech(sample: Sample) -> np.ndarray:
    """The recording's track of the speaker the transcript belongs to, at 24 kHz."""
    from training.manifest import ManifestRow, load_audio

    row = ManifestRow(line=0, sample_id=sample.sample_id, audio=Path(sample.audio), language=sample.language,
                      transcript=sample.transcript, role=sample.role, agent_channel=sample.agent_channel,
                      split=sample.split, words=None)
    agent, caller = load_audio(row, SAMPLE_RATE)
    return np.asarray(caller if sample.role == "caller" else agent)


def evaluate(config: Config, lm: LMModel, mimi: MimiModel, samples: list[Sample], judge: Judge,
             floor: bool = True) -> dict[str, LanguageReport]:
    """Per language: generate, transcribe, score against ``eval.wer_targets``."""
    reports: dict[str, LanguageReport] = {}
    agent_rows = [s for s in samples if s.role == "agent"]  # caller-only rows have no agent speech to judge
    for language in config.data.languages:
        chosen = sorted((s for s in agent_rows if s.language == language),
                        key=lambda s: s.sample_id)[: config.eval.max_samples]
        if not chosen:
            continue
        results = []
        for k, sample in enumerate(chosen):
            hyp = judge.transcribe(speak(lm, mimi, sample, config.eval.temp, config.seed + k), SAMPLE_RATE,
                                   language)
            floor_hyp = judge.transcribe(source_speech(sample), SAMPLE_RATE, language) if floor else None
            wer, cer = error_rates([sample.transcript], [hyp], language)
            results.append(SampleResult(sample.sample_id, sample.transcript, hyp, wer, cer, floor_hyp))
        wer, cer = error_rates([r.reference for r in results], [r.hypothesis for r in results], language)
        floor_wer = None
        if floor:
            floor_wer, _ = error_rates([r.reference for r in results],
                                       [r.floor_hypothesis or "" for r in results], language)
        target = config.eval.wer_targets.get(language, 1.0)
        reports[language] = LanguageReport(language=language, samples=len(results), wer=wer, cer=cer,
                                           target=target, passed=wer <= target, judge=judge.name,
                                           judge_floor_wer=floor_wer, results=results)
    return reports


def write_reports(reports: dict[str, LanguageReport], out_dir: Path, adapter: str | None) -> dict[str, Any]:
    """``report.json`` (all languages) and ``report-<lang>.md`` each; returns the JSON object."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"adapter": adapter, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "languages": {lang: asdict(r) for lang, r in reports.items()}}
    (out_dir / "report.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    for lang, r in reports.items():
        verdict = "PASS" if r.passed else "FAIL"
        floor = f"{r.judge_floor_wer:.1%}" if r.judge_floor_wer is not None else "not measured"
        lines = [f"# WER report: {lang}", "",
                 f"- adapter: `{adapter or 'none (base model)'}`",
                 f"- judge: {r.judge} (its WER on the source recordings: {floor})",
                 f"- samples: {r.samples}", "",
                 "| metric | value | target | verdict |", "|---|---|---|---|",
                 f"| WER | {r.wer:.1%} | <= {r.target:.0%} | {verdict} |",
                 f"| CER | {r.cer:.1%} | | |", "",
                 "| sample | WER | reference | judge heard |", "|---|---|---|---|"]
        lines += [f"| {s.sample_id} | {s.wer:.1%} | {s.reference} | {s.hypothesis} |" for s in r.results]
        (out_dir / f"report-{lang}.md").write_text("\n".join(lines) + "\n")
    return data
