"""Capacity leases against the real Redis."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

import pytest
import redis.asyncio as aioredis

from bridge.state.leases import CapacityLeases, CapacityUnavailable


@pytest.fixture
async def client(redis_url: str):  # type: ignore[no-untyped-def]
    c = aioredis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_n_slots_then_refused_then_freed(client: aioredis.Redis, redis_prefix: str) -> None:
    leases = CapacityLeases(client, redis_prefix, slots=3, ttl_s=10)
    held = [await leases.acquire(f"call-{i}") for i in range(3)]
    assert all(held) and await leases.in_use() == 3
    assert await leases.acquire("call-3") is None
    again = await leases.acquire("call-0")  # the same call asking again keeps its one slot
    assert again is not None and await leases.in_use() == 3
    lease = held[1]
    assert lease is not None
    await leases.release(lease)
    assert await leases.in_use() == 2 and await leases.acquire("call-3") is not None
    assert not await leases.renew(lease)  # released: renewal refused and the lease marked lost
    assert lease.lost.is_set()


async def test_concurrent_acquires_never_exceed_slots(client: aioredis.Redis, redis_prefix: str) -> None:
    leases = CapacityLeases(client, redis_prefix, slots=5, ttl_s=10)
    results = await asyncio.gather(*(leases.acquire(f"c{i}") for i in range(40)))
    assert sum(r is not None for r in results) == 5 and await leases.in_use() == 5


async def test_hold_renews_past_the_ttl_and_releases_on_exit(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    leases = CapacityLeases(client, redis_prefix, slots=1, ttl_s=0.6, renew_every_s=0.1)
    async with leases.hold("long-call") as lease:
        assert lease is not None
        await asyncio.sleep(1.5)  # well past the TTL: only renewals keep it
        assert await leases.in_use() == 1 and not lease.lost.is_set()
        async with leases.hold("second") as refused:
            assert refused is None
    assert await leases.in_use() == 0


async def test_dead_holder_loses_its_slot_within_the_ttl(
    redis_url: str, client: aioredis.Redis, redis_prefix: str
) -> None:
    # A real process takes a lease and renews it, then is killed with SIGKILL (no release, no cleanup).
    holder = textwrap.dedent(
        f"""
        import asyncio, sys
        import redis.asyncio as aioredis
        from bridge.state.leases import CapacityLeases
        async def main():
            leases = CapacityLeases(aioredis.from_url({redis_url!r}), {redis_prefix!r}, slots=1, ttl_s=1.0,
                                    renew_every_s=0.2)
            async with leases.hold("doomed") as lease:
                assert lease is not None
                print("held", flush=True)
                await asyncio.sleep(3600)
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", holder, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"held"
        leases = CapacityLeases(client, redis_prefix, slots=1, ttl_s=1.0)
        await asyncio.sleep(1.3)  # longer than the TTL: the live holder's renewals keep the slot
        assert await leases.acquire("newcomer") is None
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        async with asyncio.timeout(2.0):  # the slot must come free within the 1 s TTL (+ margin for load)
            while await leases.acquire("newcomer") is None:  # noqa: ASYNC110 (polling Redis)
                await asyncio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_redis_down_is_a_clear_error() -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    leases = CapacityLeases(dead, "x", slots=1, ttl_s=1)
    with pytest.raises(CapacityUnavailable):
        await leases.acquire("c")
    with pytest.raises(CapacityUnavailable):
        await leases.in_use()
    await dead.aclose()


def test_renew_interval_must_be_shorter_than_ttl() -> None:
    with pytest.raises(ValueError, match="renew_every_s"):
        CapacityLeases(aioredis.Redis(), "x", slots=1, ttl_s=1, renew_every_s=1)
