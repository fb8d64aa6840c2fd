"""One health report for ``aziza-admin health`` and the bridge's ``/health``.

Each check is bounded by a timeout and reports its own error, so a dead dependency makes the report say
so instead of hanging or raising.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import psycopg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bridge.config import Settings
from bridge.redact import mask_text, mask_url, url_passwords
from bridge.state import migrate
from bridge.state.leases import CapacityLeases, CapacityUnavailable
from bridge.state.records import CallRecorder


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _check_database(settings: Settings, timeout_s: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout_s):
            conn = await psycopg.AsyncConnection.connect(
                settings.database_url, connect_timeout=max(1, int(timeout_s)), autocommit=True
            )
            async with conn:
                cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
                row = await cur.fetchone()
                versions: list[int] = []
                if row and row[0]:
                    cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
                    versions = [r[0] for r in await cur.fetchall()]
    except (psycopg.Error, OSError, TimeoutError) as exc:
        return {"up": False, "error": mask_text(_one_line(exc), url_passwords(settings.database_url))}
    known = [m.version for m in migrate.discover()]
    pending = [v for v in known if v not in versions]
    return {"up": True, "version": max(versions, default=0), "pending": pending, "ok": not pending}


async def _check_redis(settings: Settings, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    client = aioredis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
            leases = CapacityLeases(
                client, settings.redis_prefix, settings.capacity.slots, settings.capacity.lease_ttl_s
            )
            in_use = await leases.in_use()
        return {"up": True}, {"slots": settings.capacity.slots, "in_use": in_use}
    except (RedisError, CapacityUnavailable, OSError, TimeoutError) as exc:
        error = mask_text(_one_line(exc), url_passwords(settings.redis_url))
        return {"up": False, "error": error}, {"slots": settings.capacity.slots, "in_use": None}
    finally:
        await client.aclose()


async def _check_engine(settings: Settings, timeout_s: float) -> dict[str, Any]:
    """Every configured engine's /health (the URLs calls are placed on: ``bridge.engine_urls`` or
    ``bridge.engine_url``); up when at least one answers. URLs and errors are shown with secrets masked."""
    from bridge.engine_pool import fetch_health, health_url

    engines: list[dict[str, Any]] = []
    for engine_url in settings.bridge.engines():
        probed, _ = health_url(engine_url)
        shown = {"url": mask_url(probed if not engine_url.startswith("unix:") else engine_url),
                 "engine_url": mask_url(engine_url)}
        try:
            body = await fetch_health(engine_url, timeout_s)
            engines.append({"up": True, **shown, "detail": body})
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            error = mask_text(_one_line(exc), url_passwords(engine_url))
            engines.append({"up": False, **shown, "error": error})
    up = any(e["up"] for e in engines)
    report: dict[str, Any] = {"up": up, "engines": engines}
    if len(engines) == 1:  # the single-engine shape older tools read
        report.update({k: v for k, v in engines[0].items() if k != "up"})
    return report


async def check_health(
    settings: Settings, recorder: CallRecorder | None = None, timeout_s: float = 2.0
) -> dict[str, Any]:
    """``ok`` is true when the database (migrated), Redis and the engine all answer."""
    database, (redis_report, capacity), engine = await asyncio.gather(
        _check_database(settings, timeout_s),
        _check_redis(settings, timeout_s),
        _check_engine(settings, timeout_s),
    )
    report: dict[str, Any] = {
        "database": database,
        "redis": redis_report,
        "capacity": capacity,
        "engine": engine,
    }
    if recorder is not None:
        report["records"] = recorder.status()
    report["ok"] = bool(database.get("ok") and redis_report["up"] and engine["up"])
    return report
