"""The one audio-file reader: any bit depth, WAVE_FORMAT_EXTENSIBLE, FLAC, OGG; mono mix-down; resampling;
clear errors. And voice prompts through it: stored in the engine's form whatever came in."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bridge.media.audio_file import AudioFileError, inspect_audio, read_audio, read_pcm16
from bridge.state.models import InvalidInput
from bridge.state.voice import inspect_voice_prompt, store_voice_prompt


def _tone(rate: int, seconds: float, hz: float = 300.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def _format_tag(path: Path) -> int:
    """The WAV fmt chunk's format tag (1: PCM, 3: float, 0xFFFE: WAVE_FORMAT_EXTENSIBLE)."""
    data = path.read_bytes()
    pos = data.index(b"fmt ")
    return int(struct.unpack_from("<H", data, pos + 8)[0])


@pytest.mark.parametrize(
    ("name", "fmt", "subtype"),
    [
        ("pcm16.wav", "WAV", "PCM_16"),
        ("pcm24.wav", "WAV", "PCM_24"),
        ("pcm32.wav", "WAV", "PCM_32"),
        ("float.wav", "WAV", "FLOAT"),
        ("u8.wav", "WAV", "PCM_U8"),
        ("extensible.wav", "WAVEX", "PCM_16"),  # what sox writes: "unknown format: 65534" to Python's wave
        ("tone.flac", "FLAC", "PCM_16"),
        ("tone.ogg", "OGG", "VORBIS"),
    ],
)
def test_every_format_reads_as_the_same_tone(tmp_path: Path, name: str, fmt: str, subtype: str) -> None:
    path = tmp_path / name
    soundfile.write(str(path), _tone(16000, 3.0), 16000, format=fmt, subtype=subtype)
    if fmt == "WAVEX":
        assert _format_tag(path) == 0xFFFE
    info = inspect_audio(path)
    assert (info.channels, info.sample_rate) == (1, 16000) and info.seconds == pytest.approx(3.0, abs=0.01)
    audio, rate = read_audio(path)
    assert rate == 16000 and audio.dtype == np.float32
    lossy = fmt == "OGG" or subtype == "PCM_U8"
    n = min(len(audio), 48000)
    error = np.abs(audio[1000:n - 1000] - _tone(16000, 3.0)[1000:n - 1000]).max()
    assert error < (0.05 if lossy else 1e-3), error


def test_stereo_is_mixed_down_and_the_rate_converted(tmp_path: Path) -> None:
    path = tmp_path / "stereo44k.wav"
    soundfile.write(str(path), _tone(44100, 2.0, channels=2), 44100, subtype="PCM_24")
    audio, rate = read_audio(path, rate=24000)
    assert rate == 24000 and audio.ndim == 1 and len(audio) == pytest.approx(48000, abs=2)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * 24000 / len(audio) == pytest.approx(300.0, abs=1.0)  # still the 300 Hz tone
    pcm = read_pcm16(path, rate=8000)
    assert pcm.dtype == np.int16 and 15000 < np.abs(pcm).max() <= 16500  # 0.5 full scale


def test_unreadable_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="no such file"):
        read_audio(tmp_path / "absent.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" + bytes(range(256)))
    with pytest.raises(AudioFileError, match=r"garbage\.wav: not a readable audio file"):
        inspect_audio(garbage)
    with pytest.raises(AudioFileError, match="not a readable audio file"):
        read_audio(garbage)


def test_voice_prompts_of_any_format_are_stored_as_the_engine_reads_them(tmp_path: Path) -> None:
    sources = {
        "sox.wav": dict(format="WAVEX", subtype="PCM_16", samplerate=16000, channels=1),
        "studio.flac": dict(format="FLAC", subtype="PCM_24", samplerate=48000, channels=2),
        "phone.ogg": dict(format="OGG", subtype="VORBIS", samplerate=22050, channels=1),
    }
    for name, spec in sources.items():
        path = tmp_path / name
        rate, channels = int(spec["samplerate"]), int(spec["channels"])
        soundfile.write(str(path), _tone(rate, 2.0, channels=channels), rate,
                        format=str(spec["format"]), subtype=str(spec["subtype"]))
        assert inspect_voice_prompt(path).channels == channels
        stored = store_voice_prompt(path, tmp_path / "data", name.split(".")[0])
        kept = inspect_audio(stored)
        assert (kept.format, kept.subtype, kept.channels, kept.sample_rate) == ("WAV", "PCM_16", 1, 24000)
        assert kept.seconds == pytest.approx(2.0, abs=0.01)
        assert _format_tag(stored) == 1  # plain PCM: the engine's reader takes it
    narrow = tmp_path / "narrow.wav"
    soundfile.write(str(narrow), _tone(8000, 2.0), 8000)
    with pytest.raises(InvalidInput, match="8000 Hz; at least 16000 Hz"):
        inspect_voice_prompt(narrow)
