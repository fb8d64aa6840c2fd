"""The bridge side of `calls live`: StateSink keeps each live call's Redis hash up to date (persona,
language, channel, start, and a phone call's current latency, TTFB and turns every period), on the real
Redis; a Redis outage costs the monitor its figures, never a call. Polls are bounded only to catch a
hang: every verdict is on what Redis holds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from bridge.call_deps import CallInfo
from bridge.media.turns import TurnStats
from bridge.state.live import LiveCalls
from bridge.state.records import CallRecorder
from bridge.state_adapters import StateSink, media_gauges
from bridge.wiring import watched_media
from tests.state.fixtures import RedisServer

PERIOD_S = 0.05


class _NoRecords:
    """The PostgreSQL side is not under test here: every record_* call is accepted and forgotten."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class FakeLedger:
    round_trip_ms: float | None = None

    def recent_round_trip_ms(self) -> float | None:
        return self.round_trip_ms


@dataclass
class FakeStats:
    turns: TurnStats = field(default_factory=TurnStats)


@dataclass
class FakeMedia:
    """What the sink reads of CallMedia: ledger.recent_round_trip_ms() and stats.turns."""

    ledger: FakeLedger = field(default_factory=FakeLedger)
    stats: FakeStats = field(default_factory=FakeStats)


def _phone(call_id: str) -> CallInfo:
    return CallInfo(call_id, "+15550001234", "+15557654321", "anna", "PJSIP/trunk-0001", language="ru")


@pytest.fixture
async def sink_on(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[str, str], Any]]:
    """Start StateSinks (writer task running, short period) on a Redis URL; stop them afterwards."""
    started: list[tuple[StateSink, asyncio.Task[None], aioredis.Redis]] = []

    async def make(url: str, prefix: str) -> tuple[StateSink, aioredis.Redis]:
        client = aioredis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        sink = StateSink(cast(CallRecorder, _NoRecords()), LiveCalls(client, prefix),
                         gauges_every_s=PERIOD_S, refresh_every_s=PERIOD_S * 4)
        started.append((sink, asyncio.create_task(sink.run()), client))
        return sink, client

    yield make
    for sink, writer, client in started:
        sink.stop()
        await asyncio.wait({writer}, timeout=5)
        writer.cancel()
        await client.aclose()


async def _hash_when(url: str, key: str, ok: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """The hash once ``ok`` holds (read on its own connection: the sink's may be failing)."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    fields = cast(dict[str, str], await client.hgetall(key))
                except Exception:  # that Redis is down for now
                    fields = {}
                if ok(fields):
                    return fields
                await asyncio.sleep(PERIOD_S)
    finally:
        await client.aclose()


def test_media_gauges_leave_out_what_is_not_known_yet() -> None:
    media = FakeMedia()
    assert media_gauges(media) == {"turns": 0}
    media.ledger.round_trip_ms, media.stats.turns.turns = 41.26, 2
    media.stats.turns.ttfb_ms[:] = [250.0, 180.44]
    assert media_gauges(media) == {"latency_ms": 41.3, "ttfb_ms": 180.4, "turns": 2}
    assert media_gauges(object()) == {}  # stand-in media without a ledger


async def test_the_sink_keeps_each_live_hash_up_to_date(
    sink_on: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    sink, _ = await sink_on(redis_url, redis_prefix)
    media = FakeMedia()
    sink.started(_phone("c1"))
    # As production wires it: the media factory hands each call's media to the sink.
    watched_media(lambda engine, call_id: cast(Any, media), sink)(cast(Any, None), "c1")
    sink.answered("c1")
    sink.started(CallInfo("b1", "", "browser", "anna", "WebSocket/talk", "en", "browser"))
    key = f"{redis_prefix}:call:c1"

    first = await _hash_when(redis_url, key, lambda h: "turns" in h)
    started_at = float(first.pop("started_at"))
    assert first == {"did": "+15550001234", "caller": "+15557654321", "persona": "anna", "language": "ru",
                     "channel": "phone", "state": "active", "turns": "0"}
    media.ledger.round_trip_ms, media.stats.turns.turns = 41.26, 3
    media.stats.turns.ttfb_ms[:] = [250.0, 180.44]
    later = await _hash_when(redis_url, key, lambda h: "latency_ms" in h)
    assert (later["latency_ms"], later["ttfb_ms"], later["turns"]) == ("41.3", "180.4", "3")
    assert float(later["started_at"]) == started_at  # the start stays put
    browser = await _hash_when(redis_url, f"{redis_prefix}:call:b1", lambda h: "channel" in h)
    assert browser["channel"] == "browser" and browser["language"] == "en" and "latency_ms" not in browser

    # The call ends: its hash goes, and later periods (seen on another call) do not bring it back.
    other = FakeMedia()
    sink.started(_phone("c2"))
    sink.watch("c2", other)
    sink.ended("c1", "hangup", {}, "", "")
    await _hash_when(redis_url, key, lambda h: not h)
    other.ledger.round_trip_ms = 55.0
    await _hash_when(redis_url, f"{redis_prefix}:call:c2", lambda h: h.get("latency_ms") == "55.0")
    client = aioredis.from_url(redis_url)
    try:
        assert await client.exists(key) == 0
        assert sorted(c["call_id"] for c in await LiveCalls(client, redis_prefix).list_live()) == ["b1", "c2"]
    finally:
        await client.aclose()
    # Media is made before the answer: a call watched but then refused is forgotten, never written.
    sink.watch("refused", FakeMedia())
    sink.refused(_phone("refused"), "media_unavailable")
    assert "refused" not in sink._media and "refused" not in sink._periodic_batch(True)


async def test_a_redis_outage_costs_the_monitor_its_figures_not_the_call(
    sink_on: Callable[..., Any], own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = "aziza-outage"
    sink, _ = await sink_on(own_redis.url, prefix)
    media = FakeMedia(FakeLedger(30.0))
    sink.started(_phone("c1"))
    sink.watch("c1", media)
    key = f"{prefix}:call:c1"
    await _hash_when(own_redis.url, key, lambda h: h.get("latency_ms") == "30.0")

    caplog.set_level(logging.WARNING, logger="bridge.state_adapters")
    await own_redis.stop(save=False)  # and back empty: the hash must come back whole
    failed = sink.live_errors
    async with asyncio.timeout(30):
        while sink.live_errors < failed + 5:  # several periods fail  # noqa: ASYNC110
            await asyncio.sleep(PERIOD_S)
    sink.event("c1", "dtmf", {"digit": "5"})  # the call goes on: its facts are queued, never waited on
    media.ledger.round_trip_ms = 77.0
    await own_redis.start()
    back = await _hash_when(own_redis.url, key, lambda h: h.get("latency_ms") == "77.0")
    assert back["persona"] == "anna" and back["language"] == "ru" and back["channel"] == "phone"
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.state_adapters"]
    assert sum("write failed" in m for m in messages) == 1, messages  # once per outage, not per period
    assert sum("work again" in m for m in messages) == 1, messages
    assert "c1" in sink._live_fields and "c1" in sink._media  # the call is still watched
