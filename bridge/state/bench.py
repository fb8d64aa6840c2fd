"""Benchmark of the state layer against real PostgreSQL and Redis: prints numbers, asserts nothing.

    python -m bridge.state.bench [--database-url URL] [--redis-url URL] [--records 20000] [--leases 2000]

The database must be migrated (`aziza-admin db migrate`); it writes call records with ids ``bench-*``
and removes them afterwards, and uses its own Redis prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg
import redis.asyncio as aioredis

from bridge.config import Settings
from bridge.state.db import StateDB
from bridge.state.leases import CapacityLeases
from bridge.state.records import CallRecorder, CallStart
from bridge.state.routing import RouteResolver


def _pcts(samples_s: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.3f} ms  p99 {p99:.3f} ms  max {ms[-1]:.3f} ms  (n={len(ms)})"


async def bench_records(database_url: str, calls: int) -> None:
    recorder = CallRecorder(database_url, max_queue=calls * 3 + 10)
    await recorder.start()
    tag = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    for i in range(calls):
        call_id = f"bench-{tag}-{i}"
        recorder.record_start(CallStart(call_id, "+15550001234", "+15557654321", "bench"))
        recorder.record_event(call_id, "bench", {"i": i})
        recorder.record_end(call_id, "bench", {"p50_ms": 1.0}, "", "")
    enqueue_s = time.perf_counter() - t0
    while recorder.depth() > 0:  # noqa: ASYNC110 (polling the writer's progress)
        await asyncio.sleep(0.01)
    total_s = time.perf_counter() - t0
    await recorder.stop()
    writes = calls * 3
    print(
        f"records: {writes} writes enqueued in {enqueue_s * 1000:.1f} ms "
        f"({enqueue_s / writes * 1e6:.2f} us each, the call's cost)"
    )
    print(
        f"records: {writes} writes committed in {total_s:.2f} s = {writes / total_s:.0f} writes/s "
        f"(written {recorder.stats.written}, dropped {recorder.stats.dropped_full})"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM call_events WHERE call_id LIKE %s", (f"bench-{tag}-%",))
        conn.execute("DELETE FROM calls WHERE id LIKE %s", (f"bench-{tag}-%",))


async def bench_leases(redis_url: str, n: int) -> None:
    client = aioredis.from_url(redis_url)
    prefix = f"aziza-bench-{uuid.uuid4().hex[:8]}"
    leases = CapacityLeases(client, prefix, slots=10, ttl_s=15)
    acquire, release, renew = [], [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            lease = await leases.acquire(f"c{i}")
            t1 = time.perf_counter()
            assert lease is not None
            await leases.renew(lease)
            t2 = time.perf_counter()
            await leases.release(lease)
            t3 = time.perf_counter()
            acquire.append(t1 - t0)
            renew.append(t2 - t1)
            release.append(t3 - t2)
        print(f"lease acquire: {_pcts(acquire)}")
        print(f"lease renew:   {_pcts(renew)}")
        print(f"lease release: {_pcts(release)}")
        t0 = time.perf_counter()
        # 90: below redis-py's default pool of 100 connections (more at once raises MaxConnectionsError).
        results = await asyncio.gather(*(leases.acquire(f"burst{i}") for i in range(90)))
        burst_ms = (time.perf_counter() - t0) * 1000
        print(
            f"lease burst: 90 concurrent acquires for 10 slots in {burst_ms:.1f} ms, "
            f"granted {sum(r is not None for r in results)}"
        )
    finally:
        await client.delete(f"{prefix}:leases")
        await client.aclose()


async def bench_routes(database_url: str, n: int) -> None:
    async with StateDB(database_url) as db:
        resolver = RouteResolver(db, cache_ttl_s=0)
        await resolver.resolve("+15550001234")  # warm the pool
        db_times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await resolver.resolve("+15550001234")
            db_times.append(time.perf_counter() - t0)
        cached = RouteResolver(db, cache_ttl_s=3600)
        await cached.resolve("+15550001234")
        cache_times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await cached.resolve("+15550001234")
            cache_times.append(time.perf_counter() - t0)
    print(f"route resolve (database): {_pcts(db_times)}")
    print(f"route resolve (cached):   {_pcts(cache_times)}")


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings()
    database_url = args.database_url or settings.database_url
    redis_url = args.redis_url or settings.redis_url
    await bench_records(database_url, args.records // 3)
    await bench_leases(redis_url, args.leases)
    await bench_routes(database_url, args.leases)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--records", type=int, default=30000, help="record writes (start+event+end per call)")
    parser.add_argument("--leases", type=int, default=2000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
