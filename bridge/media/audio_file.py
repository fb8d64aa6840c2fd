"""The one audio-file reader: libsndfile (``soundfile``) for the container and codec, soxr for the rate.

Reads WAV of any bit depth (8/16/24/32-bit integer, 32/64-bit float; WAVE_FORMAT_EXTENSIBLE included, which
Python's ``wave`` refuses as "unknown format: 65534"), FLAC, OGG/Vorbis and whatever else libsndfile reads.
Several channels are mixed down to mono; ``rate`` resamples. Every failure is an :class:`AudioFileError`
that names the file and what is wrong with it.

    info = inspect_audio(path)                       # format, channels, rate, length: header only
    audio, rate = read_audio(path, rate=24000)       # float32 mono in [-1, 1]
    pcm = read_pcm16(path, rate=8000)                # int16 mono
    write_pcm16_wav(path, pcm, rate)                 # 16-bit mono WAV, the canonical form
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile
import soxr


class AudioFileError(ValueError):
    """A file that is not readable audio (or not the audio wanted); the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    format: str  # libsndfile's container name: WAV, WAVEX, FLAC, OGG...
    subtype: str  # its sample encoding: PCM_16, PCM_24, FLOAT, VORBIS...
    channels: int
    sample_rate: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def inspect_audio(path: Path | str) -> AudioInfo:
    """The file's format, channels, rate and length, from its header."""
    if not Path(path).is_file():
        raise AudioFileError(f"{path}: no such file")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioFileError(f"{path}: not a readable audio file ({_reason(exc)})") from None
    return AudioInfo(info.format, info.subtype, info.channels, info.samplerate, info.frames)


def read_audio(path: Path | str, *, rate: int | None = None) -> tuple[npt.NDArray[np.float32], int]:
    """The file as mono float32 in [-1, 1] and its rate (``rate``, when given: resampled to it)."""
    if not Path(path).is_file():
        raise AudioFileError(f"{path}: no such file")
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioFileError(f"{path}: not a readable audio file ({_reason(exc)})") from None
    audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate is not None and rate != file_rate:
        audio = soxr.resample(audio, file_rate, rate, quality="HQ").astype(np.float32)
        file_rate = rate
    return np.ascontiguousarray(audio, dtype=np.float32), int(file_rate)


def read_pcm16(path: Path | str, *, rate: int | None = None) -> npt.NDArray[np.int16]:
    """The file as mono int16 (resampled to ``rate`` when given)."""
    audio, _ = read_audio(path, rate=rate)
    return np.clip(np.rint(audio * 32768.0), -32768, 32767).astype(np.int16)


def write_pcm16_wav(path: Path | str, pcm: npt.NDArray[np.int16], rate: int) -> None:
    """A 16-bit PCM mono WAV (plain WAVE_FORMAT_PCM, which every reader takes)."""
    soundfile.write(str(path), np.asarray(pcm, dtype=np.int16), rate, subtype="PCM_16", format="WAV")


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[-1] if ": " in text else text


__all__ = ["AudioFileError", "AudioInfo", "inspect_audio", "read_audio", "read_pcm16", "write_pcm16_wav"]
