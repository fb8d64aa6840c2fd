"""Voice prompts: audio files checked before a persona may use them, then stored in the data dir.

Any audio file the one reader takes (``bridge.media.audio_file``: WAV of any bit depth,
WAVE_FORMAT_EXTENSIBLE, FLAC, OGG...) with any number of channels, at least 16 kHz and 1 to 30 seconds
long. It is stored as what the engine's persona prefill reads: 16-bit PCM mono WAV at 24 kHz. Each failure
names what is wrong and what is wanted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bridge.media.audio_file import AudioFileError, inspect_audio, read_pcm16, write_pcm16_wav
from bridge.state.models import InvalidInput

MIN_RATE_HZ = 16000
MIN_SECONDS = 1.0
MAX_SECONDS = 30.0
STORED_RATE_HZ = 24000  # the engine's rate: the prefill reads the stored file without resampling


@dataclass(frozen=True)
class VoiceInfo:
    format: str
    subtype: str
    channels: int
    sample_rate: int
    seconds: float


def inspect_voice_prompt(path: Path) -> VoiceInfo:
    """Check the audio file at ``path``; raises InvalidInput naming the first rule it breaks."""
    try:
        audio = inspect_audio(path)
    except AudioFileError as exc:
        raise InvalidInput(f"voice prompt {exc}") from None
    info = VoiceInfo(audio.format, audio.subtype, audio.channels, audio.sample_rate, audio.seconds)
    if info.sample_rate < MIN_RATE_HZ:
        raise InvalidInput(
            f"voice prompt {path}: sample rate {info.sample_rate} Hz; at least {MIN_RATE_HZ} Hz is required"
        )
    if not MIN_SECONDS <= info.seconds <= MAX_SECONDS:
        raise InvalidInput(
            f"voice prompt {path}: {info.seconds:.2f} s long; "
            f"{MIN_SECONDS:g} to {MAX_SECONDS:g} s is required"
        )
    return info


def store_voice_prompt(source: Path, data_dir: Path, persona: str) -> Path:
    """Validate ``source``; store it as 16-bit mono WAV at 24 kHz in ``data_dir/voices/`` (atomically)."""
    inspect_voice_prompt(source)
    try:
        pcm = read_pcm16(source, rate=STORED_RATE_HZ)
    except AudioFileError as exc:
        raise InvalidInput(f"voice prompt {exc}") from None
    digest = hashlib.sha256(pcm.tobytes()).hexdigest()[:12]
    voices = data_dir / "voices"
    try:
        voices.mkdir(parents=True, exist_ok=True)
        target = voices / f"{persona}-{digest}.wav"
        fd, tmp = tempfile.mkstemp(dir=voices, prefix=".incoming-", suffix=".wav")
        os.close(fd)
        try:
            write_pcm16_wav(tmp, pcm, STORED_RATE_HZ)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InvalidInput(f"cannot store voice prompt in {voices}: {exc.strerror or exc}") from None
    return target
