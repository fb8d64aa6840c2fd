"""ASR judges: transcribe the model's speech for WER/CER (``eval.judge``).

- ``faster-whisper``: CTranslate2 Whisper from a model directory on disk (``eval.judge_model``);
- ``whisper``: transformers' Whisper from a model directory on disk;
- ``template``: a small closed-set judge for tests and smoke runs. It knows the evaluation sentences and
  their reference recordings, and answers with the sentence whose recording is nearest to the audio (log-mel
  features, dynamic time warping). On the references themselves it is exact; on other audio it names the
  nearest sentence, so a model that does not speak the sentence scores the WER between two sentences. It
  measures the pipeline, not open-vocabulary recognition: the guide says to use Whisper for real numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class JudgeError(RuntimeError):
    pass


class Judge(Protocol):
    name: str

    def transcribe(self, pcm: np.ndarray, sample_rate: int, language: str) -> str: ...


def _to_16k(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    import soxr

    pcm = pcm.astype(np.float32)
    return pcm if sample_rate == 16000 else soxr.resample(pcm, sample_rate, 16000).astype(np.float32)


def _mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(np.array(60.0)), hz_to_mel(np.array(sample_rate / 2 - 200)), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    fb = np.zeros((n_mels, bins.size))
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return fb


def log_mel(pcm: np.ndarray, sample_rate: int, n_mels: int = 40) -> np.ndarray:
    """[frames, n_mels] log-mel features, 25 ms windows every 20 ms, mean/variance normalised."""
    x = _to_16k(pcm, sample_rate)
    win, hop, n_fft = 400, 320, 512
    if x.size < win:
        x = np.pad(x, (0, win - x.size))
    n = 1 + (x.size - win) // hop
    frames = np.stack([x[i * hop: i * hop + win] for i in range(n)]) * np.hanning(win)
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2
    feats = np.log(power @ _mel_filters(n_mels, n_fft, 16000).T + 1e-8)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def dtw_distance(query: np.ndarray, ref: np.ndarray) -> float:
    """Mean frame distance along the best warping path; steps (1,0), (1,1), (1,2) so every query frame is
    used once and each row is one vectorised update."""
    cost = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    acc = np.full(ref.shape[0], np.inf)
    acc[0] = cost[0, 0]
    for i in range(1, query.shape[0]):
        prev = acc
        best = prev.copy()
        best[1:] = np.minimum(best[1:], prev[:-1])
        best[2:] = np.minimum(best[2:], prev[:-2])
        acc = cost[i] + best
    return float(acc[-1] / query.shape[0])


@dataclass
class TemplateJudge:
    """Closed set: (language, text, pcm at ``sample_rate``) references."""

    references: list[tuple[str, str, np.ndarray]]
    sample_rate: int = 24_000
    name: str = "template"

    def __post_init__(self) -> None:
        self._feats = [(lang, text, log_mel(pcm, self.sample_rate)) for lang, text, pcm in self.references]

    def transcribe(self, pcm: np.ndarray, sample_rate: int, language: str) -> str:
        query = log_mel(pcm, sample_rate)
        scored = [(dtw_distance(query, feats), text) for lang, text, feats in self._feats if lang == language]
        if not scored:
            raise JudgeError(f"template judge: no reference sentences in {language!r}")
        return min(scored)[1]


class FasterWhisperJudge:
    name = "faster-whisper"

    def __init__(self, model_dir: str, device: str = "auto") -> None:
        if not Path(model_dir).is_dir():
            raise JudgeError(f"eval.judge_model {model_dir!r}: no such directory (Whisper weights on disk)")
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise JudgeError("eval.judge = faster-whisper needs the faster-whisper package "
                             "(pip install '.[asr]')") from None
        self.model = WhisperModel(model_dir, device=device, compute_type="default")

    def transcribe(self, pcm: np.ndarray, sample_rate: int, language: str) -> str:
        segments, _ = self.model.transcribe(_to_16k(pcm, sample_rate), language=language, beam_size=5)
        return " ".join(seg.text.strip() for seg in segments)


class TransformersWhisperJudge:
    name = "whisper"

    def __init__(self, model_dir: str, device: str = "cpu") -> None:
        if not Path(model_dir).is_dir():
            raise JudgeError(f"eval.judge_model {model_dir!r}: no such directory (Whisper weights on disk)")
        try:
            from transformers import pipeline
        except ImportError:
            raise JudgeError("eval.judge = whisper needs the transformers package") from None
        try:
            self.pipe = pipeline("automatic-speech-recognition", model=model_dir, device=device,
                                 model_kwargs={"local_files_only": True})
        except (OSError, ValueError) as exc:
            raise JudgeError(f"eval.judge_model {model_dir!r}: not a Whisper model ({exc})") from None

    def transcribe(self, pcm: np.ndarray, sample_rate: int, language: str) -> str:
        out = self.pipe({"raw": _to_16k(pcm, sample_rate), "sampling_rate": 16000},
                        generate_kwargs={"language": language, "task": "transcribe"})
        return str(out["text"]).strip()


def make_judge(name: str, model_dir: str | None, references: list[tuple[str, str, np.ndarray]],
               sample_rate: int = 24_000) -> Judge:
    if name == "template":
        return TemplateJudge(references, sample_rate)
    if not model_dir:
        raise JudgeError(f"eval.judge = {name} needs eval.judge_model")
    if name == "faster-whisper":
        return FasterWhisperJudge(model_dir)
    if name == "whisper":
        return TransformersWhisperJudge(model_dir)
    raise JudgeError(f"unknown judge {name!r}")
