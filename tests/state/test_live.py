"""Live call hashes and the events channel, on the real Redis; `calls live` reads them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis.asyncio as aioredis
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.state.live import CallEvent, LiveCalls
from tests.state.fixtures import empty_config


async def test_live_hash_list_and_expiry(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        live = LiveCalls(client, redis_prefix, ttl_s=1)
        await live.update("c1", {"did": "+15550001234", "state": "answered"})
        await live.update("c2", {"did": "+15550001235", "state": "ringing"})
        await live.update("c2", {"state": "answered"})
        calls = {c["call_id"]: c for c in await live.list_live()}
        assert calls["c2"] == {"call_id": "c2", "did": "+15550001235", "state": "answered"}
        await live.remove("c1")
        assert [c["call_id"] for c in await live.list_live()] == ["c2"]
        await asyncio.sleep(1.2)  # not refreshed: gone after the TTL, as after a bridge crash
        assert await live.list_live() == []
        assert await client.exists(f"{redis_prefix}:call:c2") == 0
    finally:
        await client.aclose()


async def test_following_events_ends_when_its_stop_flag_is_set(redis_url: str, redis_prefix: str) -> None:
    """`calls live` stops on a flag, not on a cancellation (redis-py can turn a cancellation that lands in
    a read into a reconnect: the command then never ended after Ctrl-C, seen under load)."""
    client = aioredis.from_url(redis_url)
    live = LiveCalls(client, redis_prefix)
    stop = asyncio.Event()
    seen: list[CallEvent] = []

    async def follow() -> None:
        async for event in live.events(stop):
            seen.append(event)

    try:
        task = asyncio.create_task(follow())
        async with asyncio.timeout(30):
            while await live.publish(CallEvent("c1", "dtmf", {"digit": "1"})) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            while not seen:  # noqa: ASYNC110 - the subscriber is another connection's
                await asyncio.sleep(0.05)
        stop.set()  # no event comes after this: only the flag can end the loop
        async with asyncio.timeout(30):
            await task
        assert [e.call_id for e in seen] == ["c1"]
    finally:
        await client.aclose()


async def test_events_reach_subscribers_and_garbage_is_skipped(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        live = LiveCalls(client, redis_prefix)
        received: list[CallEvent] = []

        async def follow() -> None:
            async for event in live.events():
                received.append(event)
                if event.kind == "end":
                    return

        follower = asyncio.create_task(follow())
        async with asyncio.timeout(5):
            # Redis tells how many subscribers got it: poll until the follower's subscription is live.
            while await live.publish(CallEvent("warmup", "ping")) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await client.publish(live.channel, b"\xff not json")
            await client.publish(live.channel, json.dumps({"kind": "no call id"}))
            await live.publish(CallEvent("c1", "dtmf", {"digit": "5"}))
            await live.publish(CallEvent("c1", "end", {"cause": "hangup"}))
            await follower
        assert [(e.call_id, e.kind, e.data) for e in received if e.call_id != "warmup"] == [
            ("c1", "dtmf", {"digit": "5"}),
            ("c1", "end", {"cause": "hangup"}),
        ]
    finally:
        await client.aclose()


async def test_calls_live_once(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    client = aioredis.from_url(redis_url)
    try:
        await LiveCalls(client, redis_prefix).update("c9", {"did": "+15550001234"})
    finally:
        await client.aclose()
    env = {
        "AZIZA_REDIS_URL": redis_url,
        "AZIZA_REDIS_PREFIX": redis_prefix,
        "AZIZA_CONFIG": empty_config(tmp_path),
    }
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["calls", "live", "--once", "--json"], env=env)
    assert result.exit_code == 0, result.stderr
    expected = {"call_id": "c9", "did": "+15550001234", "duration_s": None}  # no started_at: no duration
    assert json.loads(result.stdout) == {"live": [expected]}
    env["AZIZA_REDIS_URL"] = "redis://127.0.0.1:1/0"
    down = await asyncio.to_thread(CliRunner().invoke, cli, ["calls", "live", "--once"], env=env)
    assert down.exit_code == 1 and down.stderr.startswith("Error: redis:")


async def test_calls_live_follows_events_until_interrupted(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    env = {
        **os.environ,
        "AZIZA_REDIS_URL": redis_url,
        "AZIZA_REDIS_PREFIX": redis_prefix,
        "AZIZA_CONFIG": empty_config(tmp_path),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin_cli.main",
        "calls",
        "live",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    client = aioredis.from_url(redis_url)
    try:
        assert proc.stdout is not None
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) == {"live": []}
        live = LiveCalls(client, redis_prefix)
        # The bounds only catch a hang: a subprocess on a loaded 2-core machine can take seconds per step.
        async with asyncio.timeout(60):
            while await live.publish(CallEvent("c1", "dtmf", {"digit": "0"})) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert (event["call_id"], event["kind"], event["data"]) == ("c1", "dtmf", {"digit": "0"})
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.aclose()


def _env(redis_url: str, redis_prefix: str, tmp_path: Path) -> dict[str, str]:
    return {"AZIZA_REDIS_URL": redis_url, "AZIZA_REDIS_PREFIX": redis_prefix,
            "AZIZA_CONFIG": empty_config(tmp_path)}


async def test_calls_live_shows_persona_language_duration_and_latency(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The session monitor's table, from hashes as the bridge writes them (the columns' formatting is
    tests/cli/test_live_view.py's; here: the hashes reach it, oldest call first, gaps as "-")."""
    started = time.time() - 65
    client = aioredis.from_url(redis_url)
    try:
        live = LiveCalls(client, redis_prefix)
        await live.update("c1", {"channel": "phone", "did": "+15550001234", "caller": "+15557654321",
                                 "persona": "anna", "language": "ru", "started_at": started,
                                 "latency_ms": 41.6, "ttfb_ms": 212.4, "turns": 3})
        await live.update("b2", {"channel": "browser", "persona": "max", "started_at": started + 30})
    finally:
        await client.aclose()
    env = _env(redis_url, redis_prefix, tmp_path)
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["calls", "live", "--once"], env=env)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2 live call(s) at ")
    assert lines[1].split() == ["ID", "CHANNEL", "DID", "CALLER", "PERSONA", "LANG", "DURATION", "LATENCY",
                                "TTFB"]
    phone, browser = (line.split() for line in lines[2:])
    assert phone[:6] + phone[7:] == ["c1", "phone", "+15550001234", "+15557654321", "anna", "ru", "42", "212"]
    assert browser[:6] + browser[7:] == ["b2", "browser", "-", "-", "max", "-", "-", "-"]
    # mm:ss of time.time() - started_at; the bound only absorbs a slow machine between write and read
    assert 65 <= _seconds(phone[6]) < 125 and 35 <= _seconds(browser[6]) < 95

    as_json = await asyncio.to_thread(CliRunner().invoke, cli, ["calls", "live", "--once", "--json"], env=env)
    rows = json.loads(as_json.stdout)["live"]
    assert [r["call_id"] for r in rows] == ["c1", "b2"]
    assert rows[0]["latency_ms"] == "41.6" and rows[0]["turns"] == "3" and 65 <= rows[0]["duration_s"] < 125

    both = await asyncio.to_thread(CliRunner().invoke, cli, ["calls", "live", "--once", "--watch", "2"],
                                   env=env)
    assert both.exit_code == 2 and "not both" in both.stderr


def _seconds(mm_ss: str) -> int:
    minutes, seconds = mm_ss.split(":")
    return int(minutes) * 60 + int(seconds)


async def test_calls_live_watch_redraws_until_interrupted(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    client = aioredis.from_url(redis_url)
    live = LiveCalls(client, redis_prefix)
    await live.update("c1", {"persona": "anna", "latency_ms": 40, "started_at": time.time()})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "admin_cli.main", "calls", "live", "--watch", "0.5", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **_env(redis_url, redis_prefix, tmp_path)},
    )
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert [(c["call_id"], c["latency_ms"]) for c in first["live"]] == [("c1", "40")]
        await live.update("c1", {"latency_ms": 55})
        # The bound only catches a hang: a subprocess on a loaded 2-core machine can take seconds per step.
        async with asyncio.timeout(60):
            while True:
                redrawn = json.loads(await proc.stdout.readline())
                if redrawn["live"] and redrawn["live"][0]["latency_ms"] == "55":
                    break
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await client.aclose()
