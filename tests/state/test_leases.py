"""Capacity leases against the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap

import pytest
import redis.asyncio as aioredis

from bridge.state.leases import CapacityLeases, CapacityUnavailable, LeaseKeeper
from tests.state.fixtures import RedisServer


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
    assert not await leases.renew(lease)  # released: the single-lease renewal does not add it back


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
        assert await leases.in_use() == 1
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


# -- LeaseKeeper: a live call never loses its slot to Redis -------------------------------------------------


async def test_keeper_puts_back_leases_redis_lost(client: aioredis.Redis, redis_prefix: str) -> None:
    keeper = LeaseKeeper(CapacityLeases(client, redis_prefix, slots=5, ttl_s=10))
    for i in range(3):
        assert await keeper.acquire(f"call-{i}") is not None
    await client.delete(f"{redis_prefix}:leases")  # what a Redis restarted empty looks like
    result = await keeper.renew_once()
    assert result is not None and sorted(result.reregistered) == ["call-0", "call-1", "call-2"]
    assert result.in_use == 3 and await keeper.leases.in_use() == 3
    assert keeper.stats.reregistered == 3
    again = await keeper.renew_once()  # nothing missing any more
    assert again is not None and again.reregistered == []


async def test_over_n_after_reregistration_refuses_new_calls_until_under_n(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    ours = LeaseKeeper(CapacityLeases(client, redis_prefix, slots=3, ttl_s=10))
    held = [await ours.acquire(f"ours-{i}") for i in range(3)]
    assert all(held)
    await client.delete(f"{redis_prefix}:leases")
    # While our leases are missing, another bridge sharing this Redis admits two calls.
    other = CapacityLeases(client, redis_prefix, slots=3, ttl_s=10)
    assert await other.acquire("theirs-0") is not None and await other.acquire("theirs-1") is not None
    result = await ours.renew_once()
    assert result is not None and result.in_use == 5 and ours.stats.over_capacity
    assert await ours.acquire("new-0") is None and await other.acquire("new-1") is None
    for lease in held[:2]:
        assert lease is not None
        await ours.release(lease)
    assert await other.acquire("new-2") is None  # 3 of 3: still full
    assert held[2] is not None
    await ours.release(held[2])
    assert await other.acquire("new-3") is not None  # back under N: admitted
    result = await ours.renew_once()
    assert result is not None and not ours.stats.over_capacity


async def test_release_during_a_renewal_is_not_put_back(client: aioredis.Redis, redis_prefix: str) -> None:
    keeper = LeaseKeeper(CapacityLeases(client, redis_prefix, slots=5, ttl_s=10))
    lease = await keeper.acquire("leaving")
    assert lease is not None
    renewal = asyncio.create_task(keeper.renew_once())
    await asyncio.sleep(0)  # the renewal has taken its list of leases and is on its way
    assert keeper._in_flight == {"leaving"}
    await keeper.release(lease)
    await renewal
    assert await client.zscore(f"{redis_prefix}:leases", "leaving") is None
    assert await keeper.leases.in_use() == 0


async def test_keeper_survives_redis_down_and_reregisters_when_it_is_back(own_redis: RedisServer) -> None:
    client = aioredis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    leases = CapacityLeases(client, "k", slots=2, ttl_s=0.6, renew_every_s=0.2)
    keeper = LeaseKeeper(leases, retry_every_s=0.1)
    try:
        assert await keeper.acquire("a") is not None and await keeper.acquire("b") is not None
        runner = asyncio.create_task(keeper.run())
        await own_redis.stop(save=False)
        failures = keeper.stats.renew_failures
        async with asyncio.timeout(10):
            while keeper.stats.renew_failures < failures + 2:  # noqa: ASYNC110 (watching the keeper)
                await asyncio.sleep(0.05)
        assert not runner.done()  # failures are retried, never raised
        await own_redis.start()  # empty
        keeper.renewed.clear()
        async with asyncio.timeout(10):
            await keeper.renewed.wait()
        assert keeper.stats.reregistered == 2 and keeper.stats.in_use == 2
        assert await keeper.leases.in_use() == 2
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    finally:
        await client.aclose()
