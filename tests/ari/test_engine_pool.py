"""Several engines as one appliance: placement by free slots (sans-IO, virtual time), then real echo
engines: calls spread over them, a full house is refused only when every engine is full, and when an
engine dies new calls go to the others."""

from __future__ import annotations

import pytest

from bridge.engine_client import EngineFull, EngineUnavailable
from bridge.engine_pool import EnginePlacement, EnginePool, health_url
from engine.config import EngineSettings
from engine.server import run_engine

A, B, C = "ws://a/session", "ws://b/session", "ws://c/session"


def test_order_prefers_free_slots_then_unknown_then_full_then_down() -> None:
    p = EnginePlacement([A, B, C])
    assert p.order(0.0) == [A, B, C]  # nothing known: configuration order
    p.health(A, free=1, total=4, now=0.0)
    p.health(B, free=3, total=4, now=0.0)
    assert p.order(0.0) == [B, A, C]
    p.full(B)
    assert p.order(0.0) == [A, C, B]
    p.failed(A, now=0.0, error="refused")
    assert p.order(0.0) == [C, B, A]


def test_a_dead_engine_backs_off_doubling_and_health_brings_it_back() -> None:
    p = EnginePlacement([A, B], min_backoff_s=0.5, max_backoff_s=4.0)
    p.health(B, free=0, total=1, now=0.0)
    for expected in (0.5, 1.0, 2.0, 4.0, 4.0):
        p.failed(A, now=10.0, error="refused")
        assert p.engines[A].down_until == 10.0 + expected
    assert p.order(11.0) == [B, A]  # down: tried last (after a full one)
    assert p.order(14.0) == [A, B]  # back-off over: unknown beats full
    p.health(A, free=2, total=2, now=14.0)
    assert p.engines[A].failures == 0 and p.order(14.0) == [A, B]
    p.opened(A)
    assert p.engines[A].free == 1


def test_health_urls() -> None:
    assert health_url("ws://10.0.0.2:8999/session")[0] == "http://10.0.0.2:8999/health"
    assert health_url("wss://gpu1:443/session")[0] == "https://gpu1:443/health"
    assert health_url("unix:///run/aziza/engine.sock")[0] == "http://localhost/health"


async def test_calls_spread_over_engines_and_survive_one_dying() -> None:
    one_slot = EngineSettings(port=0, num_slots=1, batch_window_ms=0)
    async with run_engine(one_slot) as url_b:
        first = run_engine(one_slot)
        url_a = await first.__aenter__()
        pool = EnginePool([url_a, url_b], poll_s=0.05)
        async with pool.running():
            await pool.poll_once()
            s1 = await pool.open(None, "c1")
            s2 = await pool.open(None, "c2")
            assert {s1.url, s2.url} == {url_a, url_b}  # one call per engine
            with pytest.raises(EngineFull):
                await pool.open(None, "c3")  # every engine full: refused
            await s1.close()
            await s2.close()
            await first.__aexit__(None, None, None)  # engine A dies
            for i in range(3):  # every new call lands on B, whatever A's last known state
                session = await pool.open(None, f"after-{i}")
                assert session.url == url_b
                await session.close()
            assert pool.placement.engines[url_a].last_error is not None
    with pytest.raises(EngineUnavailable):
        await EnginePool([url_a], open_timeout_s=1).open(None, "nobody-home")
