"""CallMedia over real UDP on loopback with the real echo engine: behaviour, not timing."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from bridge.engine_client import EngineSession
from bridge.media.call_media import GRID_RANGE_S, LATE_GRACE_S, CallMedia, MediaBindError
from bridge.media.rtp import RtpPacket, build_rtp
from bridge.media.simleg import GARBAGE_KINDS, SimLeg
from engine.backend import StepOutput
from engine.config import EngineSettings
from engine.echo import EchoBackend
from engine.protocol import Ready, decode_audio, encode_audio, encode_control
from engine.server import run_engine
from tests.media.fixtures import bridge_settings, fake_engine, segment_correlations, wired_call


async def test_call_end_to_end_echo(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k) as call:
        await call.leg.run(len(speech_8k) / 8000 + 0.3, tail_s=0.3)
    stats = call.media.stats
    assert stats.end_reason == "stopped"
    assert call.run_task.result() == "stopped"
    assert stats.rtp_dropped == {}
    assert stats.rtp_in == call.leg.packets_sent
    assert stats.frames_to_engine >= len(speech_8k) // 640
    assert stats.frames_from_engine >= stats.frames_to_engine - 2  # echo answers every frame
    # What came back is the caller's speech (through µ-law → 24 kHz → engine → 8 kHz → µ-law).
    back = call.leg.received_audio_8k()
    corrs = segment_correlations(speech_8k, back)
    assert len(corrs) >= 5 and min(corrs) > 0.9, corrs
    assert call.leg.timestamp_errors == 0
    assert call.leg.sequence_gaps == 0
    assert call.leg.received[0].marker and not any(p.marker for p in call.leg.received[1:])
    assert {p.payload_type for p in call.leg.received} == {0}
    assert stats.added_latency_ms.count > 0
    snap = call.media.snapshot()
    assert snap["jitter_buffer"]["received"] == stats.rtp_in
    assert snap["resampler_delay_ms"] == pytest.approx(6.0, abs=0.5)
    assert call.media._sock is None  # closed


async def test_foreign_source_is_dropped(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k) as call:
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            intruder.bind(("127.0.0.1", 0))
            pkt = build_rtp(RtpPacket(0, 1, 160, 0x5555, b"\x00" * 160))
            for _ in range(10):
                intruder.sendto(pkt, call.media.local_address)
            await call.leg.run(0.5)
        finally:
            intruder.close()
    assert call.media.stats.rtp_dropped.get("foreign_source") == 10
    assert call.media.stats.rtp_in == call.leg.packets_sent  # the intruder's audio never got in
    assert call.media.stats.ssrc_changes == 0


async def test_unlocked_drops_unless_learning(engine_url: str, speech_8k: np.ndarray) -> None:
    for learn in (False, True):
        engine = await EngineSession.open(engine_url)
        media = CallMedia(bridge_settings(), engine, "c", learn_remote=learn)
        try:
            async with SimLeg(await media.bind(), speech_8k[:3200]) as leg:
                task = asyncio.create_task(media.run())
                await leg.run(0.4, tail_s=0.1)
                await media.stop()
                await task
        finally:
            await engine.close()
        if learn:
            assert media.remote == leg.local_address
            assert media.stats.rtp_in == leg.packets_sent
            assert leg.packets_received > 0
        else:
            assert media.stats.rtp_dropped["not_locked"] == leg.packets_sent
            assert media.stats.rtp_in == 0 and leg.packets_received == 0


async def test_garbage_datagrams_are_counted_and_dropped(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k) as call:
        for kind in GARBAGE_KINDS:
            if kind != "foreign_ssrc":
                call.leg.send_garbage(kind)
        await call.leg.run(0.6)
    dropped = call.media.stats.rtp_dropped
    assert dropped["truncated"] == 2  # the 7-byte one and the empty one
    assert dropped["oversized"] == 1
    assert dropped["version"] == 1
    assert dropped["payload_type"] == 1
    assert dropped["rtcp"] == 1
    assert call.media.stats.end_reason == "stopped"
    assert call.media.stats.frames_from_engine > 0  # the call carried on


async def test_ssrc_change_mid_call_resets_and_continues(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k) as call:
        await call.leg.run(0.5)
        frames_before = call.media.stats.frames_to_engine
        call.leg.change_ssrc()
        await call.leg.run(0.6)
    stats = call.media.stats
    assert stats.ssrc_changes == 1
    assert call.media.snapshot()["jitter_buffer"]["resets"] == 1
    assert stats.frames_to_engine > frames_before + 3  # the new stream is carried too
    assert stats.rtp_in == call.leg.packets_sent


async def test_engine_dies_mid_call(speech_8k: np.ndarray) -> None:
    async def dies_after_three_frames(ws: web.WebSocketResponse) -> None:
        await ws.receive()  # open
        await ws.send_str(encode_control(Ready("s", 0, 1)))
        for _ in range(3):
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        await ws.close()  # the "engine" goes away without a ``closed`` message

    async with fake_engine(dies_after_three_frames) as url:
        engine = await EngineSession.open(url)
        media = CallMedia(bridge_settings(), engine, "c")
        async with SimLeg(None, speech_8k) as leg:
            leg.set_remote(await media.bind())
            media.lock_remote(*leg.local_address)
            task = asyncio.create_task(media.run())
            leg_task = asyncio.create_task(leg.run(3.0))
            reason = await asyncio.wait_for(task, 5.0)
            leg.stop()
            await leg_task
        await engine.close()
    assert reason.startswith("engine_gone")
    assert media._sock is None
    await media.stop()  # idempotent after the end


async def test_hold_stops_rtp_and_engine_frames(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k) as call:
        await call.leg.run(0.5)
        call.media.pause()
        await asyncio.sleep(0.05)  # let packets already in flight land
        received_before = call.leg.packets_received
        to_engine_before = call.media.stats.frames_to_engine
        await call.leg.run(0.5)  # caller keeps sending while held
        assert call.leg.packets_received == received_before
        assert call.media.stats.frames_to_engine == to_engine_before
        assert call.media.stats.rtp_dropped.get("held", 0) > 0
        call.media.resume()
        await call.leg.run(0.6)
    assert call.leg.packets_received > received_before
    assert call.media.stats.frames_to_engine > to_engine_before
    resumed = call.leg.received[received_before]
    assert resumed.marker  # first packet after the hold is marked
    assert call.media.stats.holds == 1


async def test_loss_jitter_reordering_keeps_cadence(engine_url: str, speech_8k: np.ndarray) -> None:
    async with wired_call(engine_url, speech_8k, loss=0.05, jitter_ms=30, reorder=0.05, seed=7) as call:
        await call.leg.run(2.5, tail_s=0.2)
    stats = call.media.stats
    jb = call.media.snapshot()["jitter_buffer"]
    assert call.leg.packets_lost_injected > 0 and call.leg.packets_reordered_injected > 0
    assert jb["reordered"] > 0 and stats.slots_concealed > 0
    assert stats.end_reason == "stopped"
    # Cadence: the bridge sent a gapless, drift-free stream whatever came in.
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0
    assert stats.rtp_out_skipped == 0 or stats.rtp_out_skipped < 3
    assert stats.frames_from_engine > 20


async def test_slin16_inbound(engine_url: str, speech_8k: np.ndarray) -> None:
    engine = await EngineSession.open(engine_url)
    media = CallMedia(bridge_settings(), engine, "c", inbound_format="slin16")
    async with SimLeg(None, speech_8k, codec="slin16") as leg:
        leg.set_remote(await media.bind())
        media.lock_remote(*leg.local_address)
        task = asyncio.create_task(media.run())
        await leg.run(len(speech_8k) / 8000 + 0.3, tail_s=0.2)
        await media.stop()
        await task
    await engine.close()
    assert media.stats.rtp_in == leg.packets_sent and media.stats.rtp_dropped == {}
    corrs = segment_correlations(speech_8k, leg.received_audio_8k())
    assert len(corrs) >= 5 and min(corrs) > 0.9, corrs
    assert {p.payload_type for p in leg.received} == {0}  # the return path is always µ-law


async def test_media_timeout_ends_the_call(engine_url: str) -> None:
    engine = await EngineSession.open(engine_url)
    media = CallMedia(bridge_settings(media_timeout_s=0.3), engine, "c")
    await media.bind()
    media.lock_remote("127.0.0.1", 9)
    reason = await asyncio.wait_for(media.run(), 3.0)
    await engine.close()
    assert reason == "media_timeout"
    assert media._sock is None


async def test_bind_fails_cleanly_when_the_range_is_taken(engine_url: str) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    engine = await EngineSession.open(engine_url)
    try:
        media = CallMedia(bridge_settings(rtp_port_min=port, rtp_port_max=port), engine, "c")
        with pytest.raises(MediaBindError):
            await media.bind()
        assert (await media.run()).startswith("bind_failed")
    finally:
        blocker.close()
        await engine.close()


class StallOnceBackend(EchoBackend):
    """Echo, but one step (the 12th) takes 350 ms: the frames held up meanwhile come back in a burst."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self.steps = 0

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        import time

        self.steps += 1
        if self.steps == 12:
            time.sleep(0.35)
        return super().step(frames)


async def test_engine_stall_costs_audio_once_not_lasting_delay(speech_8k: np.ndarray) -> None:
    backend = StallOnceBackend(2)
    async with run_engine(EngineSettings(port=0, num_slots=2, batch_window_ms=5), backend=backend) as url:
        async with wired_call(url, speech_8k) as call:
            leg_run = asyncio.create_task(call.leg.run(4.0, tail_s=0.2))
            depths: list[int] = []
            while not leg_run.done():
                await asyncio.sleep(0.013)
                if backend.steps > 36:  # 2 s after the stall (1 s is what the phase waits to be sure)
                    depths.append(call.media._out.depth)
            await leg_run
    stats = call.media.stats
    assert backend.steps > 45
    # The stall's audio is dropped once (late or stale)...
    assert stats.rtp_out_late_dropped >= 4
    # ...and the queue is back to at most one frame plus a packet: the call did not keep the stall as delay.
    assert depths and max(depths) <= 5, depths
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0


class JitteryBackend(EchoBackend):
    """Echo whose steps take 0–35 ms at random: frames come back with that much jitter."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self._rng = np.random.default_rng(3)

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        import time

        time.sleep(float(self._rng.uniform(0.0, 0.035)))
        return super().step(frames)


async def test_engine_jitter_moves_the_timeline_in_slots_without_clock_drift(speech_8k: np.ndarray) -> None:
    engine_settings = EngineSettings(port=0, num_slots=2, batch_window_ms=0)
    async with run_engine(engine_settings, backend=JitteryBackend(2)) as url:
        async with wired_call(url, speech_8k) as call:
            leg_run = asyncio.create_task(call.leg.run(5.0, tail_s=0.2))
            grid_offsets: list[float] = []  # how far the pacer's grid has been slewed from its anchor
            while not leg_run.done():
                await asyncio.sleep(0.01)
                pacer = call.media._pacer
                if pacer is not None:
                    grid_offsets.append(abs(pacer.start - call.media._grid_anchor))
            await leg_run
    stats = call.media.stats
    assert grid_offsets and max(grid_offsets) <= 0.010 + 1e-6, max(grid_offsets)
    assert stats.rtp_out_expanded > 0  # late frames were played whole, a slot later...
    assert stats.rtp_out_late_dropped <= 4  # ...not cut (a stray one more than two slots late may be)
    # The grid moved only within its ±10 ms range: the RTP clock kept real time (two moments of the call
    # differ by at most the range's width, whatever jitter came in between).
    assert abs(call.leg.timestamp_drift_ms) <= 2 * GRID_RANGE_S * 1000.0 + 1.0, call.leg.timestamp_drift_ms
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0


class SpikyBackend(EchoBackend):
    """Echo whose steps on the given frames take ``spike_s`` longer: a frame now and then a few ms late."""

    def __init__(self, num_slots: int, spike_steps: set[int], spike_s: float) -> None:
        super().__init__(num_slots)
        self.spike_steps = spike_steps
        self.spike_s = spike_s
        self.steps = 0

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        import time

        self.steps += 1
        if self.steps in self.spike_steps:
            time.sleep(self.spike_s)
        return super().step(frames)


async def test_a_frame_a_few_ms_late_is_waited_for_not_played_a_slot_later(speech_8k: np.ndarray) -> None:
    """Two frames come back 9 ms late, 55 frames apart (so the phase controller takes each for an outlier,
    not a new phase): each misses its first tick by a few ms, and its first packet is held back until it
    arrives (within LATE_GRACE_S) instead of the timeline moving a slot later or its start being cut."""
    backend = SpikyBackend(2, spike_steps={15, 70}, spike_s=0.009)
    engine_settings = EngineSettings(port=0, num_slots=2, batch_window_ms=0)
    async with run_engine(engine_settings, backend=backend) as url:
        async with wired_call(url, np.tile(speech_8k, 3)) as call:
            leg_run = asyncio.create_task(call.leg.run(6.5, tail_s=0.2))
            mid_call: dict[str, int] = {}
            while not leg_run.done():
                await asyncio.sleep(0.01)
                if backend.steps == 76 and not mid_call:  # past both spikes, before the caller stops
                    stats = call.media.stats
                    mid_call = {"waited": stats.rtp_out_waited, "expanded": stats.rtp_out_expanded,
                                "late": stats.rtp_out_late_dropped, "unobserved": stats.margins_unobserved}
            await leg_run
    # Played whole at its place in the timeline (at least one of the two: on a loaded machine the other one
    # may meet a loop running behind, and then it is cut rather than moving the timeline, as it should be).
    assert mid_call["waited"] >= 1 and mid_call["expanded"] == 0, mid_call
    assert mid_call["late"] == 0 or mid_call["unobserved"] > 0, mid_call
    # The held packets left late by at most the grace; the grid itself did not move (no drift, no gap).
    assert float(np.max(call.leg.pacing_jitter_ms)) <= LATE_GRACE_S * 1000.0 + 2.0
    assert abs(call.leg.timestamp_drift_ms) <= 2 * GRID_RANGE_S * 1000.0 + 1.0
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0


async def test_a_stall_of_the_bridge_itself_is_cut_not_kept_as_delay(
    engine_url: str, speech_8k: np.ndarray
) -> None:
    """The bridge's own event loop stalls (here: 50 ms of blocking work, twice). The engine frames handled
    just after were received late, not sent late: their late packets are cut, the timeline is not moved a
    slot later, and the phase controller does not take those margins for the engine's."""
    import time

    async with wired_call(engine_url, np.tile(speech_8k, 2)) as call:
        leg_run = asyncio.create_task(call.leg.run(4.0, tail_s=0.2))
        for _ in range(2):
            await asyncio.sleep(1.3)
            time.sleep(0.050)  # noqa: ASYNC251 - the point: the loop blocked
        await asyncio.sleep(0.6)
        stats = call.media.stats
        mid_call = {"expanded": stats.rtp_out_expanded, "unobserved": stats.margins_unobserved > 0}
        shift_ms = call.media._phase.stats.shift_s * 1000.0
        await leg_run
    assert mid_call == {"expanded": 0, "unobserved": True}, mid_call
    assert abs(shift_ms) < 10.0, shift_ms
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0


async def test_engine_numbering_jump_resyncs_the_output(speech_8k: np.ndarray) -> None:
    """An engine whose frame numbers jump by 1000 mid-call (frames skipped on its side): the output re-anchors
    on the new numbering and plays on, instead of waiting for slots 20 s away or dropping everything."""

    async def renumbering_echo(ws: web.WebSocketResponse) -> None:
        await ws.receive()  # open
        await ws.send_str(encode_control(Ready("s", 0, 1)))
        seq = 0
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            frame = decode_audio(msg.data)
            await ws.send_bytes(encode_audio(seq, frame.pcm))
            seq += 1000 if seq == 10 else 1

    async with fake_engine(renumbering_echo) as url, wired_call(url, speech_8k) as call:
        await call.leg.run(len(speech_8k) / 8000 + 0.3, tail_s=0.3)
    stats = call.media.stats
    assert stats.rtp_out_resyncs == 1
    assert stats.engine_frames_lost == 999  # the gap is counted as what it is
    assert stats.frames_from_engine > 20
    # Played on after the jump: what came back is still the caller's speech, frame after frame.
    corrs = segment_correlations(speech_8k, call.leg.received_audio_8k())
    assert len(corrs) >= 3 and min(corrs) > 0.8, corrs
    assert call.leg.timestamp_errors == 0 and call.leg.sequence_gaps == 0


async def test_holds_for_late_frames_come_out_of_a_pacing_budget() -> None:
    """Every frame due and late for 20 s (a loop running behind all the while): only HOLDS_BURST holds, then
    one per 1 / HOLDS_PER_S seconds, so held packets put at most ~0.5 % of intervals off the grid."""
    from types import SimpleNamespace

    from bridge.media.call_media import HOLDS_BURST, HOLDS_PER_S
    from bridge.media.media_clock import MediaClock

    now = [100.0]
    engine = SimpleNamespace(frames_sent=0)  # all CallMedia reads of the session here
    media = CallMedia(bridge_settings(), engine, "budget", clock=lambda: now[0])  # type: ignore[arg-type]
    clock = MediaClock()
    clock.acquire()
    media._clock_acquired = clock
    try:
        holds = 0
        for seq in range(250):  # 20 s of 80 ms frames
            now[0] += 0.080
            media._last_frame_at = now[0] - 0.080
            media._next_engine_seq = seq
            engine.frames_sent = seq + 1  # the engine has the input: the frame is due
            media._out.next_slot = seq * 4 + media._slot_offset
            if media._frame_due_now(now[0]):
                media._hold_for_frame(now[0])
                media._cancel_wait()
                holds += 1
    finally:
        clock.release()
    assert holds == pytest.approx(HOLDS_BURST + 20 * HOLDS_PER_S, abs=1)
