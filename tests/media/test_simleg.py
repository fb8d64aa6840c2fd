"""SimLeg: two legs talking to each other over real UDP, with and without impairments."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bridge.media.codecs import ulaw_decode, ulaw_encode
from bridge.media.rtp import RtpPacket, build_rtp
from bridge.media.simleg import GARBAGE_KINDS, SimLeg


async def _pair(audio: np.ndarray, **impairments: float) -> tuple[SimLeg, SimLeg]:
    sender = SimLeg(None, audio, **impairments)  # type: ignore[arg-type]
    receiver = SimLeg(None, np.zeros(0, dtype=np.int16))
    receiver.set_remote(await sender.bind())
    sender.set_remote(await receiver.bind())
    return sender, receiver


async def test_audio_arrives_intact_and_in_cadence(speech_8k: np.ndarray) -> None:
    audio = speech_8k[:8000]
    sender, receiver = await _pair(audio)
    try:
        await sender.run(1.0, tail_s=0.05)
    finally:
        sender.close()
        receiver.close()
    assert sender.packets_sent == 50 and receiver.packets_received == 50
    assert receiver.timestamp_errors == 0 and receiver.sequence_gaps == 0
    expected = ulaw_decode(ulaw_encode(audio))
    assert np.array_equal(receiver.received_audio_8k()[: len(expected)], expected)
    assert receiver.received[0].marker
    assert len(receiver.arrival_intervals_ms) == 49
    assert receiver.summary()["kernel_timestamps"] in (True, False)


async def test_loss_and_jitter_are_injected(speech_8k: np.ndarray) -> None:
    sender, receiver = await _pair(speech_8k, loss=0.2, jitter_ms=40.0, reorder=0.1, seed=3)
    try:
        await sender.run(1.0, tail_s=0.1)
    finally:
        sender.close()
        receiver.close()
    assert sender.packets_lost_injected > 0 and sender.packets_reordered_injected > 0
    assert receiver.packets_received == 50 - sender.packets_lost_injected
    assert receiver.sequence_gaps > 0
    seqs = [p.sequence for p in receiver.received]
    assert seqs != sorted(seqs)  # reordered on the wire
    assert receiver.timestamp_errors == 0  # reordering is not drift


async def test_garbage_is_counted_by_a_receiving_leg(speech_8k: np.ndarray) -> None:
    sender, receiver = await _pair(speech_8k)
    try:
        for kind in GARBAGE_KINDS:
            sender.send_garbage(kind)
        with pytest.raises(ValueError):
            sender.send_garbage("nonsense")
        await asyncio.sleep(0.1)
    finally:
        sender.close()
        receiver.close()
    dropped = receiver.receiver.stats.dropped
    assert dropped == {"truncated": 2, "oversized": 1, "version": 1, "rtcp": 1}
    # unknown PT and a foreign SSRC are valid RTP: a leg records them; the bridge is what rejects them
    assert receiver.packets_received == 2


async def test_ssrc_change_restarts_timestamp_reference(speech_8k: np.ndarray) -> None:
    sender, receiver = await _pair(speech_8k)
    try:
        await sender.run(0.2)
        sender.change_ssrc(0xABCDEF)
        await sender.run(0.2, tail_s=0.05)
    finally:
        sender.close()
        receiver.close()
    assert {p.ssrc for p in receiver.received[-5:]} == {0xABCDEF}
    assert receiver.timestamp_errors == 0


async def test_run_needs_a_remote_and_close_is_idempotent() -> None:
    leg = SimLeg(None, np.zeros(160, dtype=np.int16))
    with pytest.raises(RuntimeError):
        await leg.run(0.1)
    leg.close()
    leg.close()
    with pytest.raises(ValueError):
        SimLeg(None, np.zeros(160, dtype=np.int16), loss=1.5)


async def test_timestamp_drift_is_detected() -> None:
    receiver = SimLeg(None, np.zeros(0, dtype=np.int16))
    sender = SimLeg(None, np.zeros(0, dtype=np.int16))
    receiver.set_remote(await sender.bind())
    sender.set_remote(await receiver.bind())
    try:
        for seq, ts in ((1, 160), (2, 320), (3, 500)):  # the third packet's timestamp drifted
            sender.send_raw(build_rtp(RtpPacket(0, seq, ts, 7, b"\xff" * 160)))
        await asyncio.sleep(0.1)
    finally:
        sender.close()
        receiver.close()
    assert receiver.timestamp_errors == 1
