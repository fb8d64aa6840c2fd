"""The dataset manifest: one JSON object per line, one recording each.

    {"id": "call-0001", "audio": "calls/0001.wav", "language": "ru", "transcript": "Здравствуйте, ..."}

- ``audio``: a file soundfile reads (WAV, FLAC, OGG...), relative to the manifest's directory. Two channels:
  an agent/caller call recording, the agent on ``agent_channel`` (default 0). One channel: ``role`` says whose
  voice it is (``agent``, the default, or ``caller``).
- ``transcript``: what the agent says (Moshi's text stream is the agent's); for a caller-only row, what the
  caller says (kept for reports; the agent's text stream stays padding).
- ``language``: ``ru`` or ``uz`` (one of the config's ``data.languages``).
- optional ``split`` (``train`` | ``val``), ``words`` (``[{"word", "start", "end"}]`` in seconds, for the
  ``manifest`` aligner).

:func:`check_row` refuses a bad row with one line naming the manifest line and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.align import WordSpan

ROW_KEYS = {"id", "audio", "language", "transcript", "role", "agent_channel", "split", "words"}
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class ManifestError(ValueError):
    """A manifest row that cannot be used; one line: ``manifest.jsonl:7: reason``."""

    def __init__(self, message: str, reason: str = "bad row") -> None:
        super().__init__(message)
        self.reason = reason  # the counted skip reason when rows are skipped instead of stopping


@dataclass(frozen=True)
class ManifestRow:
    line: int
    sample_id: str
    audio: Path
    language: str
    transcript: str
    role: str  # agent | caller (mono files); stereo files carry both
    agent_channel: int
    split: str | None
    words: tuple[WordSpan, ...] | None


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def parse_row(path: Path, number: int, line: str, languages: list[str]) -> ManifestRow:
    """One row, checked for everything but the audio's contents (see :func:`check_audio`)."""
    where = f"{path.name}:{number}"

    def bad(reason: str, why: str) -> ManifestError:
        return ManifestError(f"{where}: {why}", reason)

    try:
        row: Any = json.loads(line)
    except ValueError as exc:
        raise bad("not JSON", f"not a JSON object ({exc})") from None
    if not isinstance(row, dict):
        raise bad("not JSON", "not a JSON object")
    unknown = sorted(set(row) - ROW_KEYS)
    if unknown:
        raise bad("unknown key", f"unknown key {unknown[0]!r} (keys: {', '.join(sorted(ROW_KEYS))})")
    for key in ("id", "audio", "language", "transcript"):
        if key not in row:
            raise bad(f"missing {key}", f"missing {key!r}")
    sample_id = row["id"]
    if not isinstance(sample_id, str) or not _ID.match(sample_id):
        raise bad("bad id", f"id {sample_id!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    language = row["language"]
    if language not in languages:
        raise bad("wrong language", f"language {language!r} is not one of {', '.join(languages)} "
                                    "(data.languages)")
    transcript = row["transcript"]
    if not isinstance(transcript, str) or not transcript.strip():
        raise bad("empty transcript", f"empty transcript for {sample_id!r}")
    role = row.get("role", "agent")
    if role not in ("agent", "caller"):
        raise bad("bad role", f"role {role!r} must be 'agent' or 'caller'")
    channel = row.get("agent_channel", 0)
    if channel not in (0, 1) or isinstance(channel, bool):
        raise bad("bad agent_channel", f"agent_channel {channel!r} must be 0 or 1")
    split = row.get("split")
    if split not in (None, "train", "val"):
        raise bad("bad split", f"split {split!r} must be 'train' or 'val'")
    audio = row["audio"]
    if not isinstance(audio, str) or not audio:
        raise bad("missing file", f"audio {audio!r} is not a file name")
    audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
    if not audio_path.is_file():
        raise bad("missing file", f"audio file {audio!r} does not exist")
    words = _words(row.get("words"), bad)
    return ManifestRow(line=number, sample_id=sample_id, audio=audio_path, language=language,
                       transcript=" ".join(transcript.split()), role=role, agent_channel=int(channel),
                       split=split, words=words)


def _words(value: Any, bad: Any) -> tuple[WordSpan, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("bad words", "words must be a list of {word, start, end}")
    spans = []
    for item in value:
        try:
            span = WordSpan(str(item["word"]), float(item["start"]), float(item["end"]))
        except (KeyError, TypeError, ValueError):
            raise bad("bad words", f"words: {item!r} is not {{word, start, end}}") from None
        if not span.word.strip() or span.start < 0 or span.end < span.start:
            raise bad("bad words", f"words: {item!r} has an empty word or end < start")
        spans.append(span)
    return tuple(spans)


@dataclass(frozen=True)
class AudioInfo:
    seconds: float
    channels: int
    sample_rate: int


def check_audio(row: ManifestRow, where: str) -> AudioInfo:
    """The file's header, read (cheap): unreadable or with more than two channels is refused."""
    import soundfile

    try:
        info = soundfile.info(str(row.audio))
    except (RuntimeError, OSError, soundfile.LibsndfileError) as exc:
        raise ManifestError(f"{where}: audio file {row.audio.name!r} is unreadable "
                            f"({str(exc).splitlines()[0][:120]})", "unreadable file") from None
    if info.channels not in (1, 2) or info.frames <= 0 or info.samplerate <= 0:
        raise ManifestError(f"{where}: audio file {row.audio.name!r} has {info.channels} channels and "
                            f"{info.frames} frames (need 1 or 2 channels, some audio)", "unreadable file")
    return AudioInfo(seconds=info.frames / info.samplerate, channels=info.channels,
                     sample_rate=info.samplerate)


def read_manifest(path: Path, languages: list[str], skip_bad: bool,
                  skipped: dict[str, int]) -> list[tuple[ManifestRow, AudioInfo]]:
    """Every usable row. A bad row stops the run (ManifestError, one line) unless ``skip_bad``, when it is
    counted in ``skipped`` by reason instead."""
    rows: list[tuple[ManifestRow, AudioInfo]] = []
    seen: set[str] = set()
    for number, line in read_lines(path):
        try:
            row = parse_row(path, number, line, languages)
            if row.sample_id in seen:
                raise ManifestError(f"{path.name}:{number}: duplicate id {row.sample_id!r}", "duplicate id")
            rows.append((row, check_audio(row, f"{path.name}:{number}")))
            seen.add(row.sample_id)
        except ManifestError as exc:
            if not skip_bad:
                raise
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
    if not rows:
        raise ManifestError(f"{path}: no usable rows")
    return rows


def load_audio(row: ManifestRow, sample_rate: int) -> tuple[Any, Any]:
    """(agent, caller) float32 mono tracks at ``sample_rate``; the missing one of a mono file is silence."""
    import numpy as np
    import soundfile
    import soxr

    try:
        data, rate = soundfile.read(str(row.audio), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as exc:
        raise ManifestError(f"{row.audio.name}: unreadable ({str(exc).splitlines()[0][:120]})",
                            "unreadable file") from None
    if rate != sample_rate:
        data = soxr.resample(data, rate, sample_rate).astype(np.float32)
    silence = np.zeros(data.shape[0], dtype=np.float32)
    if data.shape[1] == 2:
        return data[:, row.agent_channel].copy(), data[:, 1 - row.agent_channel].copy()
    mono = data[:, 0].copy()
    return (mono, silence) if row.role == "agent" else (silence, mono)
