"""G.711 / L16 codecs and packet-loss concealment."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.media.assets import load_speech_8k
from bridge.media.codecs import (
    ULAW_SILENCE_20MS,
    CodecError,
    UnsupportedPayloadType,
    alaw_decode,
    alaw_encode,
    codec_for_payload_type,
    float32_to_pcm16,
    pcm16_to_float32,
    slin16_decode,
    slin16_encode,
    ulaw_decode,
    ulaw_encode,
)
from bridge.media.rtp import PT_PCMU


def test_ulaw_known_values() -> None:
    # ITU-T G.711 µ-law: 0xFF and 0x7F are ±0, 0x80 is +32124, 0x00 is -32124.
    assert ulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00])).tolist() == [0, 0, 32124, -32124]
    assert ulaw_encode(np.array([0, 32767, -32768], dtype=np.int16)) == bytes([0xFF, 0x80, 0x00])
    assert ulaw_decode(ULAW_SILENCE_20MS).tolist() == [0] * 160


def test_alaw_known_values() -> None:
    assert alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [8, -8, 32256, -32256]
    assert alaw_encode(np.array([8, -8], dtype=np.int16)) == bytes([0xD5, 0x55])


def test_slin16_is_big_endian() -> None:
    pcm = np.array([1, -2, 0x1234], dtype=np.int16)
    assert slin16_encode(pcm) == b"\x00\x01\xff\xfe\x12\x34"
    assert slin16_decode(b"\x00\x01\xff\xfe\x12\x34").tolist() == [1, -2, 0x1234]
    with pytest.raises(CodecError):
        slin16_decode(b"\x00\x01\x02")


@given(st.binary(max_size=400))
def test_g711_decode_encode_is_identity_on_codes(data: bytes) -> None:
    # Every code except µ-law's negative zero (0x7F -> 0 -> 0xFF) survives decode+encode.
    assert ulaw_encode(ulaw_decode(data)) == data.replace(b"\x7f", b"\xff")
    assert alaw_encode(alaw_decode(data)) == data


def test_encoders_reject_wrong_arrays() -> None:
    with pytest.raises(CodecError):
        ulaw_encode(np.zeros(10, dtype=np.float32))
    with pytest.raises(CodecError):
        slin16_encode(np.zeros((2, 2), dtype=np.int16))


def test_ulaw_speech_snr() -> None:
    speech = load_speech_8k()
    decoded = ulaw_decode(ulaw_encode(speech)).astype(np.float64)
    noise = decoded - speech
    snr = 10 * np.log10(np.sum(speech.astype(np.float64) ** 2) / np.sum(noise**2))
    assert 30 < snr < 45  # G.711 gives ~38 dB on speech


def test_float_conversion_clips_instead_of_wrapping() -> None:
    out = float32_to_pcm16(np.array([1.5, -1.5, 0.5, 0.0], dtype=np.float32))
    assert out.tolist() == [32767, -32768, 16384, 0]
    pcm = np.array([-32768, 0, 32767], dtype=np.int16)
    assert float32_to_pcm16(pcm16_to_float32(pcm)).tolist() == pcm.tolist()


def test_codec_lookup() -> None:
    assert codec_for_payload_type(0).name == "ulaw"
    assert codec_for_payload_type(8).name == "alaw"
    slin = codec_for_payload_type(118)
    assert (slin.name, slin.sample_rate, slin.samples_per_20ms) == ("slin16", 16000, 320)
    assert codec_for_payload_type(96, slin16_payload_type=96).name == "slin16"
    with pytest.raises(UnsupportedPayloadType) as info:
        codec_for_payload_type(9)
    assert info.value.payload_type == 9


def test_concealment_continues_then_fades_to_silence() -> None:
    codec = codec_for_payload_type(0)
    t = np.arange(800) / 8000
    tone = (8000 * np.sin(2 * np.pi * 200 * t)).astype(np.int16)  # 200 Hz: 5 ms pitch period
    for chunk in tone.reshape(5, 160):
        codec.decode(ulaw_encode(chunk))
    concealed = [codec.conceal() for _ in range(4)]
    rms = [float(np.sqrt(np.mean(c.astype(np.float64) ** 2))) for c in concealed]
    assert rms[0] > 4000  # first 20 ms: the tone goes on at (nearly) full level
    assert rms[0] > rms[1] > rms[2]  # fading out
    assert rms[3] == 0.0  # silent after 60 ms of loss
    # The repetition continues the waveform: no jump at the boundary with the last real sample.
    last_real = float(ulaw_decode(ulaw_encode(tone[-1:]))[0])
    assert abs(float(concealed[0][0]) - last_real) < 2500


def test_concealment_without_history_is_silence_and_resume_is_clean() -> None:
    codec = codec_for_payload_type(0)
    assert not codec.conceal().any()
    tone = (6000 * np.sin(2 * np.pi * 250 * np.arange(640) / 8000)).astype(np.int16)
    for chunk in tone.reshape(4, 160):
        codec.decode(ulaw_encode(chunk))
    codec.conceal()
    resumed = codec.decode(ulaw_encode(tone[:160]))
    assert len(resumed) == 160 and resumed.dtype == np.int16
    # After resuming, decode is plain decode again.
    again = codec.decode(ulaw_encode(tone[:160]))
    assert again.tolist() == ulaw_decode(ulaw_encode(tone[:160])).tolist()


def test_bad_payload_leaves_codec_usable() -> None:
    codec = codec_for_payload_type(118)
    with pytest.raises(CodecError):
        codec.decode(b"\x00")
    assert codec.decode(b"\x00\x01").tolist() == [1]


def test_a_payloads_level_is_read_without_touching_the_concealment() -> None:
    loud = ulaw_encode((np.sin(np.arange(160) / 3.0) * 12000).astype(np.int16))
    measured, plain = codec_for_payload_type(PT_PCMU), codec_for_payload_type(PT_PCMU)
    measured.decode(loud)
    plain.decode(loud)
    assert measured.rms(loud) > 5000 and measured.rms(bytes([0xFF]) * 160) == 0
    assert np.array_equal(measured.conceal(), plain.conceal())  # (as if never measured)
