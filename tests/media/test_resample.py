"""Streaming resampling: chunking invariance, exact lengths, round-trip fidelity."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bridge.media.assets import load_speech_8k
from bridge.media.resample import StreamResampler


def _stream(rs: StreamResampler, audio: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, pos = [], 0
    for size in sizes:
        out.append(rs.process(audio[pos : pos + size]))
        pos += size
    out.append(rs.process(audio[pos:]))
    out.append(rs.flush())
    return np.concatenate(out)


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 24000), (24000, 8000), (16000, 24000)])
def test_random_chunking_equals_one_shot(in_rate: int, out_rate: int) -> None:
    rng = random.Random(in_rate + out_rate)
    audio = np.random.default_rng(1).standard_normal(in_rate).astype(np.float32) * 0.2
    one_shot = _stream(StreamResampler(in_rate, out_rate), audio, [])
    sizes = [rng.randint(0, 700) for _ in range(60)]
    chunked = _stream(StreamResampler(in_rate, out_rate), audio, sizes)
    assert len(one_shot) == len(chunked) == len(audio) * out_rate // in_rate
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4)


def test_sine_keeps_frequency_and_level() -> None:
    t = np.arange(8000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    up = _stream(StreamResampler(8000, 24000), tone, [160] * 49)
    assert len(up) == 24000
    spectrum = np.abs(np.fft.rfft(up[2400:-2400] * np.hanning(len(up) - 4800)))
    peak_hz = np.argmax(spectrum) * 24000 / (len(up) - 4800)
    assert abs(peak_hz - 1000) < 5
    assert abs(np.sqrt(np.mean(up[2400:-2400] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


def test_round_trip_8k_24k_8k_snr() -> None:
    speech = load_speech_8k()
    up, down = StreamResampler(8000, 24000), StreamResampler(24000, 8000)
    out = [down.process(up.process(speech[i : i + 160])) for i in range(0, len(speech), 160)]
    out += [down.process(up.flush()), down.flush()]
    back = np.concatenate(out) * 32768.0
    assert len(back) == len(speech)  # soxr compensates its delay: output is time-aligned
    ref = speech.astype(np.float64)
    snr = 10 * np.log10(np.sum(ref**2) / np.sum((back - ref) ** 2))
    print(f"8k->24k->8k round trip SNR: {snr:.1f} dB")
    assert snr > 30


def test_int16_input_is_scaled_and_bad_input_rejected() -> None:
    rs = StreamResampler(8000, 8000)
    assert rs.process(np.array([16384, -32768], dtype=np.int16)).tolist() == [0.5, -1.0]
    with pytest.raises(ValueError):
        rs.process(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        rs.process(np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError):
        StreamResampler(0, 8000)


def test_delay_samples_reports_what_is_held_back() -> None:
    rs = StreamResampler(8000, 24000)
    got = sum(len(rs.process(np.zeros(160, dtype=np.float32))) for _ in range(50))
    assert rs.delay_samples == pytest.approx(50 * 480 - got)
    assert 0 < rs.delay_samples < 24000 * 0.1  # soxr holds some output back, bounded
    rs.flush()
    assert rs.delay_samples == pytest.approx(0.0)
