"""Audio assets bundled with the bridge (test and demo material).

``speech_8k.wav``: ~3.7 s of English speech synthesised once with espeak-ng
("Hello, thank you for calling. How can I help you today?"), resampled by sox to 8 kHz mono 16-bit,
normalised to -3 dBFS. Tests and benchmarks load it; nothing needs espeak at run time.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

SPEECH_8K_WAV: Path = Path(__file__).with_name("speech_8k.wav")


def load_wav_int16(path: Path, expected_rate: int | None = None) -> npt.NDArray[np.int16]:
    """A mono 16-bit PCM WAV as an int16 array (raises ValueError for any other format)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            got = f"{wav.getnchannels()} channel(s) x {wav.getsampwidth()} byte(s)"
            raise ValueError(f"{path}: need mono 16-bit PCM, got {got}")
        if expected_rate is not None and wav.getframerate() != expected_rate:
            raise ValueError(f"{path}: sample rate {wav.getframerate()}, expected {expected_rate}")
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.int16)


def load_speech_8k() -> npt.NDArray[np.int16]:
    """The bundled speech sample: 8 kHz mono int16."""
    return load_wav_int16(SPEECH_8K_WAV, expected_rate=8000)
