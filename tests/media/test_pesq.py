"""PESQ (ITU-T P.862 narrow-band): the 24 kHz detour through the engine's rate costs no speech quality.

Reference path (what a plain G.711 call gives): speech → µ-law → decode.
Aziza path: speech → µ-law → decode → 8k→24k → 24k→8k (both streamed in 20 ms chunks) → µ-law → decode.
Checked for the call path's low-delay FIR (``bridge.media.fir_resample``) and, as the reference, soxr's
streaming resampler (which the call path does not use: it holds back 40-60 ms per direction).
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pytest
import soxr
from pesq import pesq

from bridge.media.assets import load_speech_8k
from bridge.media.codecs import codec_for_payload_type, float32_to_pcm16, ulaw_decode, ulaw_encode
from bridge.media.fir_resample import FirResampler
from bridge.media.jitter import JitterBuffer
from bridge.media.rtp import RtpSender, parse_rtp


class _Resampler(Protocol):
    def process(self, chunk: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
    def flush(self) -> npt.NDArray[np.float32]: ...


class _SoxrStream:
    """soxr's streaming resampler with the FIR's calling convention (int16 in, float32 out)."""

    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)

    def process(self, chunk: npt.ArrayLike) -> npt.NDArray[np.float32]:
        audio = np.asarray(chunk)
        if audio.dtype == np.int16:
            audio = audio.astype(np.float32) / np.float32(32768.0)
        return np.asarray(self._stream.resample_chunk(audio.astype(np.float32)), dtype=np.float32)

    def flush(self) -> npt.NDArray[np.float32]:
        empty = np.zeros(0, dtype=np.float32)
        return np.asarray(self._stream.resample_chunk(empty, last=True), dtype=np.float32)


def _make(kind: str, in_rate: int, out_rate: int) -> _Resampler:
    if kind == "fir":
        return FirResampler(in_rate, out_rate)
    return _SoxrStream(in_rate, out_rate, "VHQ" if kind == "soxr-VHQ" else "HQ")


def _via_24k(pcm: npt.NDArray[np.int16], kind: str) -> npt.NDArray[np.int16]:
    up, down = _make(kind, 8000, 24000), _make(kind, 24000, 8000)
    out = [down.process(up.process(pcm[i : i + 160])) for i in range(0, len(pcm), 160)]
    out += [down.process(up.flush()), down.flush()]
    audio = np.concatenate(out)
    # A fixed-delay filter returns its delay as extra samples up front: align to the input by correlation.
    lag = max(0, len(audio) - len(pcm))
    if lag:
        ref = pcm.astype(np.float32)
        scores = [float(np.dot(ref, audio[d : d + len(pcm)])) for d in range(lag + 1)]
        audio = audio[int(np.argmax(scores)) :][: len(pcm)]
    return float32_to_pcm16(audio)


@pytest.mark.parametrize("kind", ["soxr-HQ", "soxr-VHQ", "fir"])
def test_resampling_round_trip_costs_no_mos(kind: str) -> None:
    speech = load_speech_8k()
    plain = ulaw_decode(ulaw_encode(speech))
    aziza = ulaw_decode(ulaw_encode(_via_24k(plain, kind)))
    assert len(aziza) == len(speech)
    ref = speech.astype(np.float32)
    mos_plain = pesq(8000, ref, plain.astype(np.float32), "nb")
    mos_aziza = pesq(8000, ref, aziza.astype(np.float32), "nb")
    print(
        f"PESQ NB ({kind}): ulaw {mos_plain:.3f}, ulaw+8k->24k->8k+ulaw {mos_aziza:.3f}, "
        f"loss {mos_plain - mos_aziza:.3f}"
    )
    assert mos_plain > 3.5  # sanity: the sample and the scorer are working
    assert mos_plain - mos_aziza <= 0.05


def test_pesq_detects_real_damage() -> None:
    # The measurement can fail: 10 % of 20 ms packets zeroed costs far more than 0.05 MOS.
    speech = load_speech_8k()
    plain = ulaw_decode(ulaw_encode(speech))
    damaged = plain.copy()
    for start in range(0, len(damaged), 1600):
        damaged[start : start + 160] = 0
    ref = speech.astype(np.float32)
    loss = pesq(8000, ref, plain.astype(np.float32), "nb") - pesq(8000, ref, damaged.astype(np.float32), "nb")
    print(f"PESQ NB loss with 10 % of packets zeroed: {loss:.3f}")
    assert loss > 0.3


def test_loss_concealment_beats_silence_end_to_end() -> None:
    """Speech → RTP → 5 % loss → jitter buffer → decode/PLC, scored against zero-filling the same slots."""
    speech = load_speech_8k()
    speech = speech[: len(speech) // 160 * 160]
    rng = random.Random(7)
    sender = RtpSender(0, rng=random.Random(1))
    jb = JitterBuffer()
    codec = codec_for_payload_type(0)
    concealed: list[npt.NDArray[np.int16]] = []
    zeroed: list[npt.NDArray[np.int16]] = []
    for k, chunk in enumerate(speech.reshape(-1, 160)):
        datagram = sender.next_packet(ulaw_encode(chunk), 160)
        if rng.random() >= 0.05:
            jb.push(parse_rtp(datagram), k * 0.02 + 0.003)
        slot = jb.pop(k * 0.02 + 0.005)
        if slot.payload is None:
            concealed.append(codec.conceal())
            zeroed.append(np.zeros(160, dtype=np.int16))
        else:
            pcm = codec.decode(slot.payload)
            concealed.append(pcm)
            zeroed.append(ulaw_decode(slot.payload))
    assert jb.stats.lost > 0 and jb.stats.concealed == jb.stats.lost
    ref = speech.astype(np.float32)
    mos_plc = pesq(8000, ref, np.concatenate(concealed).astype(np.float32), "nb")
    mos_zero = pesq(8000, ref, np.concatenate(zeroed).astype(np.float32), "nb")
    lost = f"{jb.stats.lost} of {len(zeroed)} packets lost"
    print(f"PESQ NB with {lost}: PLC {mos_plc:.3f}, zeros {mos_zero:.3f}")
    assert mos_plc > mos_zero
