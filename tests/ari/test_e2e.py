"""End to end on one machine: fake Asterisk (real HTTP/WebSocket, real UDP SimLeg per call) -> the whole
bridge -> the real echo engine server and real CallMedia, with routes/leases/records in the real
PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from bridge.wiring import engine_opener, media_factory
from engine.config import EngineSettings
from engine.server import run_engine
from tests.ari.harness import eventually, fake_and_bridge
from tests.ari.standins import standin_deps

DID = "+15550001234"


@pytest.fixture
async def engine_url() -> AsyncIterator[str]:
    async with run_engine(EngineSettings(port=0, num_slots=4)) as url:
        yield url


def _speech() -> np.ndarray:
    from bridge.media.assets import load_speech_8k

    return load_speech_8k()


def _echo_similarity(sent: np.ndarray, got: np.ndarray, chunk: int = 4000) -> float:
    """Median, over 0.5 s chunks of the returned audio that are not silence, of the best normalised
    correlation of the chunk with any stretch of what was sent (robust to delay and to a dropped packet)."""
    a = sent.astype(np.float64)
    window = np.ones(chunk)
    energy = np.sqrt(np.maximum(np.convolve(a**2, window, mode="valid"), 1e-9))
    scores = []
    for start in range(0, len(got) - chunk + 1, chunk):
        c = got[start : start + chunk].astype(np.float64)
        norm = np.sqrt(np.sum(c**2))
        if norm < 50 * np.sqrt(chunk):  # (near) silence: nothing to compare
            continue
        scores.append(float(np.max(np.correlate(a, c, mode="valid") / (energy * norm))))
    return float(np.median(scores)) if scores else 0.0


def _real_media_deps(sd: Any, url: str) -> Any:
    from bridge.call_deps import CallDeps
    from bridge.config import BridgeSettings

    return CallDeps(sd.routes, sd.capacity, sd.sink, engine_opener(url), media_factory(BridgeSettings()))


async def test_call_end_to_end_echo_audio_comes_back(engine_url: str) -> None:
    sd = standin_deps()
    speech = _speech()
    async with fake_and_bridge(_real_media_deps(sd, engine_url), speech_8k=speech) as (fake, _svc):
        caller = await fake.originate_call(DID)
        await eventually(lambda: caller in sd.sink.answered_calls, what="answered")
        leg = fake.leg_for(caller)
        assert leg is not None
        await eventually(lambda: leg.packets_received >= 100, within_s=10, what="2 s of audio back")
        got = leg.received_audio_8k()
        similarity = _echo_similarity(speech, got)
        assert similarity > 0.6  # clean runs give ~1.0; a concealed or trimmed packet costs some
        assert _echo_similarity(np.random.default_rng(0).normal(0, 3000, 16000), got) < 0.3  # can fail
        assert all(p.payload_type == 0 and len(p.payload) == 160 for p in leg.received)
        await fake.hangup_caller(caller)
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended")
        cause, summary, _ = sd.sink.ended_calls[caller]
        assert cause == "caller_hangup" and "media" in summary
        assert not fake.bridges and sd.capacity.held == set()


async def test_engine_down_refuses_with_congestion() -> None:
    sd = standin_deps()
    async with fake_and_bridge(_real_media_deps(sd, "ws://127.0.0.1:9/session")) as (fake, _svc):
        caller = await fake.originate_call(DID)
        await eventually(lambda: sd.sink.refused_calls, what="refused")
        assert sd.sink.refused_calls[0][1] == "engine_unavailable"
        # The record is written before the ARI hangup lands: wait for the channel, not just the record.
        await eventually(lambda: fake.channel(caller).hangup_reason, what="hung up")
        assert fake.channel(caller).hangup_reason == "congestion" and not fake.channel(caller).answered


async def test_hold_stops_rtp_and_unhold_resumes(engine_url: str) -> None:
    sd = standin_deps()
    async with fake_and_bridge(_real_media_deps(sd, engine_url), speech_8k=_speech()) as (fake, svc):
        caller = await fake.originate_call(DID)
        await eventually(lambda: caller in sd.sink.answered_calls, what="answered")
        leg = fake.leg_for(caller)
        assert leg is not None
        await eventually(lambda: leg.packets_received >= 10, what="audio flowing")
        await svc.controller.get(caller).hold()
        await asyncio.sleep(0.1)  # packets already on the wire may land
        held_count = leg.packets_received
        await asyncio.sleep(0.3)
        assert leg.packets_received == held_count, "RTP sent while held"
        await svc.controller.get(caller).unhold()
        await eventually(lambda: leg.packets_received > held_count + 5, what="RTP after unhold")


async def test_engine_dies_mid_call_call_ends_cleanly() -> None:
    sd = standin_deps()
    engine = run_engine(EngineSettings(port=0, num_slots=2))
    url = await engine.__aenter__()
    engine_stopped = False
    try:
        async with fake_and_bridge(_real_media_deps(sd, url), speech_8k=_speech()) as (fake, svc):
            caller = await fake.originate_call(DID)
            await eventually(lambda: caller in sd.sink.answered_calls, what="answered")
            await engine.__aexit__(None, None, None)  # the engine process goes away
            engine_stopped = True
            await eventually(lambda: caller in sd.sink.ended_calls, what="call ended")
            cause = sd.sink.ended_calls[caller][0]
            assert cause.startswith("media:engine"), cause
            assert fake.channel(caller).hangup_reason == "normal" and not fake.bridges
            assert sd.capacity.held == set() and svc.controller.calls == {}
    finally:
        if not engine_stopped:
            await engine.__aexit__(None, None, None)
