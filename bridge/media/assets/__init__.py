"""Audio assets bundled with the bridge (test and demo material).

``speech_8k.wav``: ~3.7 s of English speech synthesised once with espeak-ng
("Hello, thank you for calling. How can I help you today?"), resampled by sox to 8 kHz mono 16-bit,
normalised to -3 dBFS. Tests and benchmarks load it; nothing needs espeak at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from bridge.media.audio_file import read_pcm16

SPEECH_8K_WAV: Path = Path(__file__).with_name("speech_8k.wav")


def load_speech_8k() -> npt.NDArray[np.int16]:
    """The bundled speech sample: 8 kHz mono int16."""
    return read_pcm16(SPEECH_8K_WAV, rate=8000)
