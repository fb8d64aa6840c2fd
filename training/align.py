"""Word timestamps for a transcript: where each word of the agent's text falls in its audio.

Pluggable (``data.aligner``):
- ``manifest``: the row's own ``words`` (from an external forced aligner, e.g. MFA or WhisperX);
- ``faster-whisper``: an ASR with word timestamps, when its weights are on disk; its words are matched to the
  transcript's (the transcript's spelling wins, Whisper's times are kept);
- ``uniform``: the fallback (tests, clean single-utterance TTS): the voiced region (frame energy) is split
  between the words in proportion to their length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class WordSpan:
    word: str
    start: float  # seconds
    end: float


class AlignError(ValueError):
    """The words cannot be placed in this audio; counted as a skip reason."""


class Aligner(Protocol):
    name: str

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, language: str,
              given: tuple[WordSpan, ...] | None) -> list[WordSpan]: ...


def voiced_region(audio: np.ndarray, sample_rate: int, floor_db: float = -35.0) -> tuple[float, float]:
    """First and last 20 ms frame whose RMS is within ``floor_db`` of the loudest frame, in seconds."""
    import numpy as np

    hop = max(1, sample_rate // 50)
    n = audio.size // hop
    if n == 0:
        raise AlignError("audio shorter than one 20 ms frame")
    rms = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1) + 1e-20)
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > floor_db)[0]
    if rms.max() < 1e-6 or loud.size == 0:
        raise AlignError("no voiced audio")
    return float(loud[0] * hop / sample_rate), float((loud[-1] + 1) * hop / sample_rate)


class UniformAligner:
    name = "uniform"

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, language: str,
              given: tuple[WordSpan, ...] | None) -> list[WordSpan]:
        words = transcript.split()
        if not words:
            raise AlignError("no words")
        start, end = voiced_region(audio, sample_rate)
        weights = [len(w) + 1 for w in words]  # +1: the gap after each word
        total = float(sum(weights))
        spans, t = [], start
        for word, weight in zip(words, weights, strict=True):
            step = (end - start) * weight / total
            spans.append(WordSpan(word, t, t + step * len(word) / weight))
            t += step
        return spans


class ManifestAligner:
    name = "manifest"

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, language: str,
              given: tuple[WordSpan, ...] | None) -> list[WordSpan]:
        if not given:
            raise AlignError("no word timestamps in the row (aligner = manifest)")
        seconds = audio.size / sample_rate
        if any(w.end > seconds + 0.1 for w in given):
            raise AlignError("word timestamps beyond the end of the audio")
        return sorted(given, key=lambda w: w.start)


class FasterWhisperAligner:
    """Word timestamps from faster-whisper (CTranslate2) on the agent track; weights from ``model_dir``."""

    name = "faster-whisper"

    def __init__(self, model_dir: str, device: str = "auto") -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise AlignError("aligner = faster-whisper needs the faster-whisper package "
                             "(pip install '.[asr]')") from None
        self.model = WhisperModel(model_dir, device=device, compute_type="default")

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, language: str,
              given: tuple[WordSpan, ...] | None) -> list[WordSpan]:
        import numpy as np
        import soxr

        pcm = soxr.resample(audio, sample_rate, 16000).astype(np.float32) if sample_rate != 16000 else audio
        segments, _ = self.model.transcribe(pcm, language=language, word_timestamps=True, beam_size=1)
        heard = [WordSpan(w.word.strip(), float(w.start), float(w.end))
                 for seg in segments for w in (seg.words or []) if w.word.strip()]
        return match_words(transcript.split(), heard)


def match_words(words: list[str], heard: list[WordSpan]) -> list[WordSpan]:
    """The transcript's words with the times of the recognised words they line up with (difflib's matching
    blocks over lower-cased words); words with no partner are placed between their matched neighbours."""
    import difflib

    if not heard:
        raise AlignError("the aligner heard no words")
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in words], b=[h.word.lower() for h in heard],
                                      autojunk=False)
    times: list[tuple[float, float] | None] = [None] * len(words)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            h = heard[block.b + k]
            times[block.a + k] = (h.start, h.end)
    known = [k for k, t in enumerate(times) if t is not None]
    if not known:
        raise AlignError("no transcript word matched the aligner's words")
    first, last = times[known[0]], times[known[-1]]
    assert first is not None and last is not None
    out = []
    for k, word in enumerate(words):
        t = times[k]
        if t is None:
            before = max((m for m in known if m < k), default=None)
            after = min((m for m in known if m > k), default=None)
            lo = times[before][1] if before is not None else first[0]  # type: ignore[index]
            hi = times[after][0] if after is not None else last[1]  # type: ignore[index]
            t = (lo, max(lo, hi))
        out.append(WordSpan(word, t[0], t[1]))
    return out


def make_aligner(name: str, model_dir: str | None = None) -> Aligner:
    if name == "uniform":
        return UniformAligner()
    if name == "manifest":
        return ManifestAligner()
    if name == "faster-whisper":
        if not model_dir:
            raise AlignError("aligner = faster-whisper needs data.aligner_model")
        return FasterWhisperAligner(model_dir)
    raise AlignError(f"unknown aligner {name!r}")
