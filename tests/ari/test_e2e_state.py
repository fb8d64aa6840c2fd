"""The production wiring end to end: fake Asterisk -> aziza-bridge (bridge.wiring.production_deps) -> real
echo engine and CallMedia, routes and call records in the real PostgreSQL, capacity leases and live
state in the real Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import redis.asyncio as aioredis

from bridge.app import BridgeService
from bridge.config import Settings
from bridge.state import repo
from bridge.state.live import LiveCalls
from bridge.state.models import Persona
from bridge.wiring import production_deps
from engine.config import EngineSettings
from engine.server import run_engine
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import bridge_settings, control_headers, eventually
from tests.state.fixtures import migrated_database_url, seeded_persona, state_settings

__all__ = ["migrated_database_url", "seeded_persona", "state_settings"]  # fixtures used below


def _random_did() -> str:
    return "+1555" + "".join(random.choice("0123456789") for _ in range(7))


@asynccontextmanager
async def production_bridge(
    state: Settings, *, slots: int
) -> AsyncIterator[tuple[FakeAsterisk, BridgeService]]:
    from bridge.media.assets import load_speech_8k

    async with FakeAsterisk(speech_8k=load_speech_8k()) as fake, run_engine(
        EngineSettings(port=0, num_slots=slots + 2)
    ) as engine_url:
        settings = bridge_settings(
            fake.url,
            database_url=state.database_url,
            redis_url=state.redis_url,
            redis_prefix=state.redis_prefix,
            bridge={"engine_url": engine_url, "rtp_port_min": 31000, "rtp_port_max": 31999},
            capacity={"slots": slots, "lease_ttl_s": 5.0, "renew_every_s": 1.0},
        )
        async with production_deps(settings) as wired, BridgeService(
            settings, wired.deps, health_probe=wired.health_probe, extra_routes=wired.routes
        ) as svc:
            await asyncio.wait_for(fake.ws_connected.wait(), 5)
            yield fake, svc


def _call_row(database_url: str, call_id: str) -> dict[str, object] | None:
    with repo.connect(database_url) as conn:
        return conn.execute("SELECT * FROM calls WHERE id = %s", (call_id,)).fetchone()


async def _events(database_url: str, call_id: str) -> list[tuple[str, object]]:
    def read() -> list[tuple[str, object]]:
        with repo.connect(database_url) as conn:
            rows = conn.execute("SELECT kind, data FROM call_events WHERE call_id = %s ORDER BY at",
                                (call_id,)).fetchall()
        return [(str(r["kind"]), r["data"]) for r in rows]

    return await asyncio.to_thread(read)


async def _row_when(database_url: str, call_id: str, column: str) -> dict[str, object]:
    async def probe() -> dict[str, object] | None:
        row = await asyncio.to_thread(_call_row, database_url, call_id)
        return row if row and row.get(column) is not None else None

    deadline = asyncio.get_running_loop().time() + 10
    while True:
        row = await probe()
        if row is not None:
            return row
        assert asyncio.get_running_loop().time() < deadline, f"call {call_id}: {column} never written"
        await asyncio.sleep(0.05)


async def test_production_call_routed_recorded_and_live(
    state_settings: Settings, seeded_persona: Persona
) -> None:
    did = _random_did()
    with repo.connect(state_settings.database_url) as conn:
        repo.add_did(conn, did, seeded_persona.name, transfer_target="operators,100")
    async with production_bridge(state_settings, slots=2) as (fake, svc):
        caller = await fake.originate_call(did, caller="+15557654321")
        await eventually(lambda: caller in svc.controller.calls
                         and svc.controller.get(caller).state.value == "active", within_s=10, what="active")
        call = svc.controller.get(caller)
        assert call.route is not None and call.route.source == "db"
        assert call.route.persona.name == seeded_persona.name
        redis = aioredis.from_url(state_settings.redis_url)
        try:
            live = LiveCalls(redis, state_settings.redis_prefix)
            rows: list[dict[str, str]] = []
            for _ in range(100):
                rows = await live.list_live()
                if rows and rows[0].get("state") == "active":
                    break
                await asyncio.sleep(0.05)
            assert rows and rows[0]["call_id"] == caller and rows[0]["persona"] == seeded_persona.name
            leases_in_use = await redis.zcard(f"{state_settings.redis_prefix}:leases")
            assert leases_in_use == 1
        finally:
            await redis.aclose()
        leg = fake.leg_for(caller)
        assert leg is not None
        await eventually(lambda: leg.packets_received >= 25, within_s=10, what="echo audio back")
        # `calls live`: the call's hash has its persona's language and, within a period (2 s), the
        # current latency measured by its real media
        redis = aioredis.from_url(state_settings.redis_url, decode_responses=True)
        try:
            key = f"{state_settings.redis_prefix}:call:{caller}"
            async with asyncio.timeout(15):
                while "latency_ms" not in (live_hash := await redis.hgetall(key)):  # noqa: ASYNC110 (Redis)
                    await asyncio.sleep(0.1)
        finally:
            await redis.aclose()
        assert live_hash["language"] == seeded_persona.language and live_hash["channel"] == "phone"
        assert float(live_hash["latency_ms"]) > 0 and live_hash["turns"].isdigit()
        async with aiohttp.ClientSession() as http, http.get(
            f"{svc.http_url}/health", headers=control_headers()
        ) as resp:
            health = await resp.json()
        assert health["state"]["database"]["ok"] and health["state"]["redis"]["up"]
        await fake.send_dtmf(caller, "5")
        await fake.send_dtmf(caller, "0")  # transfer to the DID's target
        row = await _row_when(state_settings.database_url, caller, "ended_at")
        assert row["end_cause"] == "transferred" and row["dtmf_digits"] == "50"
        assert row["answered_at"] is not None and row["refused"] is False
        assert row["did"] == did and row["persona"] == seeded_persona.name
        summary = row["latency_summary"]
        assert isinstance(summary, dict) and summary["media"]["rtp_out"] > 0
        assert fake.originates[0]["endpoint"] == "Local/100@operators/n"  # answered: then transferred
        events = await _events(state_settings.database_url, caller)
        assert ("transfer", {"target": "operators,100", "outcome": "answered"}) in events


async def test_eleventh_call_refused_with_real_leases(state_settings: Settings) -> None:
    did = _random_did()  # unknown DID: default persona
    async with production_bridge(state_settings, slots=10) as (fake, svc):
        callers = [await fake.originate_call(did, caller=f"+1555100{i:04d}") for i in range(11)]
        await eventually(lambda: sum(1 for c in callers if fake.channel(c).answered
                                     or fake.channel(c).hangup_reason) == 11, within_s=15, what="decided")
        refused = [c for c in callers if fake.channel(c).hangup_reason == "busy"]
        assert len(refused) == 1 and not fake.channel(refused[0]).answered
        row = await _row_when(state_settings.database_url, refused[0], "ended_at")
        assert row["refused"] is True and row["end_cause"] == "capacity_full" and row["answered_at"] is None
        assert all(svc.controller.get(c).route.source == "default"  # type: ignore[union-attr]
                   for c in callers if c not in refused)
        for c in callers:
            if c not in refused:
                await fake.hangup_caller(c)
        await eventually(lambda: not svc.controller.calls, within_s=10, what="all torn down")
        redis = aioredis.from_url(state_settings.redis_url)
        try:
            assert await redis.zcard(f"{state_settings.redis_prefix}:leases") == 0
        finally:
            await redis.aclose()
