"""RouteResolver: DB answers, cache, defaults, and a database that goes away."""

from __future__ import annotations

import asyncio

from bridge.state import repo
from bridge.state.db import StateDB
from bridge.state.routing import BUILTIN_PERSONA, RouteResolver
from tests.state.fixtures import TcpProxy, proxied_url, server_address


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seed(url: str) -> None:
    with repo.connect(url) as conn:
        repo.create_persona(conn, "fallback", "en", "Default persona.")
        repo.create_persona(conn, "support", "ru", "Помогай.", lora_adapter="ru-adapter")
        repo.add_did(
            conn, "+15550001234", "support", transfer_target="sip:op@pbx", dtmf_actions={"9": "hangup"}
        )
        repo.add_did(conn, "+15550001235", "support", enabled=False)


async def test_resolve_db_cache_default(migrated_fresh_database_url: str) -> None:
    seed(migrated_fresh_database_url)
    clock = FakeClock()
    async with StateDB(migrated_fresh_database_url) as db:
        resolver = RouteResolver(db, cache_ttl_s=60, clock=clock)
        route = await resolver.resolve("+15550001234")
        assert route.source == "db" and route.persona.name == "support" and route.persona.language == "ru"
        assert route.persona.adapter_id == "ru-adapter" and route.transfer_target == "sip:op@pbx"
        assert route.dtmf_actions == {"9": "hangup"}

        with repo.connect(migrated_fresh_database_url) as conn:
            repo.update_did(conn, "+15550001234", persona="fallback")
        assert (await resolver.resolve("+15550001234")).source == "cache"  # within the TTL
        clock.now += 61
        fresh = await resolver.resolve("+15550001234")
        assert fresh.source == "db" and fresh.persona.name == "fallback"

        for unknown in ("+15550001235", "+19999999999"):  # disabled, unknown
            route = await resolver.resolve(unknown)
            assert route.source == "default" and route.persona.name == "fallback"
            assert route.dtmf_actions == {"0": "transfer", "#": "hangup"}


async def test_database_down_serves_cache_then_builtin(migrated_fresh_database_url: str) -> None:
    seed(migrated_fresh_database_url)
    proxy = TcpProxy(*server_address(migrated_fresh_database_url))
    await proxy.start()
    clock = FakeClock()
    try:
        async with StateDB(proxied_url(migrated_fresh_database_url, proxy.port), timeout_s=1.0) as db:
            resolver = RouteResolver(db, cache_ttl_s=10, clock=clock)
            assert (await resolver.resolve("+15550001234")).source == "db"
            proxy.cut()
            clock.now += 100  # cache entry stale: the resolver asks the database, which is gone
            stale = await resolver.resolve("+15550001234")
            assert stale.source == "cache" and stale.persona.name == "support"
            never_seen = await resolver.resolve("+15557777777")
            assert never_seen.source == "default" and never_seen.persona == BUILTIN_PERSONA
            proxy.restore()
            async with asyncio.timeout(10):
                # The pool reconnects in its own time: poll until the database answers again.
                while (await resolver.resolve("+15550001234")).source != "db":
                    clock.now += 100
    finally:
        await proxy.close()
