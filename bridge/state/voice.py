"""Voice prompts: WAV files checked before a persona may use them, then copied into the data dir.

Rules (what the engine's persona prefill expects): RIFF/WAVE, 16-bit PCM, mono, at least 16 kHz,
1 to 30 seconds. Each failure names what is wrong and what is wanted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

from bridge.state.models import InvalidInput

MIN_RATE_HZ = 16000
MIN_SECONDS = 1.0
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class VoiceInfo:
    channels: int
    sample_rate: int
    sample_width_bytes: int
    seconds: float


def inspect_voice_prompt(path: Path) -> VoiceInfo:
    """Check the WAV at ``path``; raises InvalidInput naming the first rule it breaks."""
    if not path.is_file():
        raise InvalidInput(f"voice prompt {path}: no such file")
    try:
        with wave.open(str(path), "rb") as wav:
            info = VoiceInfo(
                wav.getnchannels(),
                wav.getframerate(),
                wav.getsampwidth(),
                wav.getnframes() / wav.getframerate() if wav.getframerate() else 0.0,
            )
    except (wave.Error, EOFError) as exc:
        raise InvalidInput(f"voice prompt {path}: not a 16-bit PCM WAV file ({exc})") from None
    if info.sample_width_bytes != 2:
        raise InvalidInput(
            f"voice prompt {path}: {info.sample_width_bytes * 8}-bit samples; 16-bit PCM is required"
        )
    if info.channels != 1:
        raise InvalidInput(f"voice prompt {path}: {info.channels} channels; mono is required")
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
    """Validate ``source`` and copy it to ``data_dir/voices/<persona>-<hash>.wav`` (atomically)."""
    inspect_voice_prompt(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    voices = data_dir / "voices"
    try:
        voices.mkdir(parents=True, exist_ok=True)
        target = voices / f"{persona}-{digest}.wav"
        fd, tmp = tempfile.mkstemp(dir=voices, prefix=".incoming-", suffix=".wav")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InvalidInput(f"cannot store voice prompt in {voices}: {exc.strerror or exc}") from None
    return target
