"""CallRecorder against real PostgreSQL, including an outage made by cutting a real TCP proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import psycopg
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.state.records import CallRecorder, CallStart
from tests.state.fixtures import TcpProxy, empty_config, proxied_url, server_address


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll the recorder's counters (set by its own task; no event to wait on from outside)."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def rows(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


async def test_full_call_record_and_cli(migrated_fresh_database_url: str, tmp_path: Path) -> None:
    url = migrated_fresh_database_url
    recorder = CallRecorder(url)
    await recorder.start()
    recorder.record_start(CallStart("call-1", "+15550001234", "+15557654321", "support"))
    recorder.record_event("call-1", "stasis_start", {"channel": "PJSIP/1"})
    recorder.record_answer("call-1")
    recorder.record_event("call-1", "dtmf", {"digit": "5"})
    recorder.record_end(
        "call-1", "caller_hangup", {"p50_ms": 92.0, "p95_ms": 130.5}, "Hello, how can I help?", "5#"
    )
    recorder.record_refused("call-2", "+15550001234", "+15550000000", "capacity")
    await recorder.stop(drain_timeout=10)
    assert recorder.status()["written"] == 6 and recorder.status()["queue_depth"] == 0
    assert recorder.status()["db_up"] is True

    env = {"AZIZA_DATABASE_URL": url, "AZIZA_CONFIG": empty_config(tmp_path)}
    listed = json.loads(CliRunner().invoke(cli, ["calls", "list", "--json"], env=env).stdout)
    assert {c["id"]: c["refused"] for c in listed} == {"call-1": False, "call-2": True}
    shown = json.loads(CliRunner().invoke(cli, ["calls", "show", "call-1", "--json"], env=env).stdout)
    assert shown["end_cause"] == "caller_hangup" and shown["dtmf_digits"] == "5#"
    assert shown["latency_summary"] == {"p50_ms": 92.0, "p95_ms": 130.5}
    assert shown["transcript"] == "Hello, how can I help?"
    assert shown["started_at"] <= shown["answered_at"] <= shown["ended_at"]
    assert [e["kind"] for e in shown["events"]] == ["stasis_start", "dtmf"]
    text = CliRunner().invoke(cli, ["calls", "list", "--did", "+15550001234"], env=env).stdout
    assert "call-1" in text and "refused" in text


async def test_database_cut_mid_write_loses_nothing_and_keeps_order(migrated_fresh_database_url: str) -> None:
    proxy = TcpProxy(*server_address(migrated_fresh_database_url))
    await proxy.start()
    recorder = CallRecorder(
        proxied_url(migrated_fresh_database_url, proxy.port),
        backoff_min_s=0.02,
        backoff_max_s=0.2,
        connect_timeout_s=1.0,
    )
    try:
        await recorder.start()
        recorder.record_start(CallStart("before", None, None, None))
        await wait_until(lambda: recorder.status()["written"] == 1)

        proxy.cut()
        for i in range(50):
            recorder.record_start(CallStart(f"c{i:02d}", "+15550001234", None, "support"))
            recorder.record_event(f"c{i:02d}", "seq", {"i": i})
        await wait_until(lambda: recorder.status()["db_up"] is False)
        assert recorder.status()["queue_depth"] > 0 and recorder.status()["last_error"]
        assert rows(migrated_fresh_database_url, "SELECT count(*) FROM calls") == [(1,)]

        proxy.restore()
        await wait_until(lambda: recorder.status()["queue_depth"] == 0)
        assert recorder.status()["db_up"] is True and recorder.status()["retries"] >= 1
    finally:
        await recorder.stop(drain_timeout=5)
        await proxy.close()
    assert rows(migrated_fresh_database_url, "SELECT count(*) FROM calls") == [(51,)]
    seq = rows(migrated_fresh_database_url, "SELECT (data->>'i')::int FROM call_events ORDER BY at")
    assert [r[0] for r in seq] == list(range(50))  # stamped at enqueue, written in order, none doubled


async def test_full_queue_drops_and_counts_without_blocking(migrated_fresh_database_url: str) -> None:
    recorder = CallRecorder("postgresql://nobody@127.0.0.1:1/none", max_queue=10, backoff_min_s=0.05)
    await recorder.start()
    for i in range(25):
        recorder.record_event("c", "x", {"i": i})  # returns at once even with the database gone
    status = recorder.status()
    assert status["dropped_full"] == 15 and status["queue_depth"] == 10 and status["enqueued"] == 10
    await recorder.stop(drain_timeout=0.2)
    assert recorder.status()["lost_at_stop"] == 10


async def test_row_the_database_refuses_is_skipped_not_blocking(migrated_fresh_database_url: str) -> None:
    recorder = CallRecorder(migrated_fresh_database_url)
    await recorder.start()
    recorder.record_start(CallStart("ok-1", None, None, None))
    recorder.record_event("ok-1", "bad\x00kind", {})  # NUL in text: PostgreSQL refuses the row
    recorder.record_event("ok-1", "odd", {"value": object(), "when": Path("/x")})  # stored via str()
    recorder.record_start(CallStart("ok-2", None, None, None))
    await wait_until(lambda: recorder.status()["queue_depth"] == 0)
    await recorder.stop()
    assert recorder.status()["rejected"] == 1 and recorder.status()["written"] == 3
    kinds = rows(migrated_fresh_database_url, "SELECT kind, data->>'when' FROM call_events")
    assert kinds == [("odd", "/x")]
    assert rows(migrated_fresh_database_url, "SELECT id FROM calls ORDER BY id") == [("ok-1",), ("ok-2",)]
