"""Capacity leases in Redis: a call holds one of N slots for as long as it renews its lease.

One sorted set per appliance, ``{prefix}:leases``: member = call id, score = expiry in ms on Redis's own
clock (``TIME`` inside the scripts, so bridges with skewed clocks agree). Each script first drops expired
members, so the slots of a bridge that died without releasing free themselves within the TTL, and
"count, then add" happens atomically inside Redis: two bridges can never both take the last slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
_PURGE = "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) "

# KEYS[1] leases; ARGV: call id, slots, ttl ms. Returns {granted (0/1), in use after, expiry ms}.
_ACQUIRE = (
    _NOW_MS
    + _PURGE
    + """
local expiry = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  return {1, redis.call('ZCARD', KEYS[1]), expiry}
end
local used = redis.call('ZCARD', KEYS[1])
if used >= tonumber(ARGV[2]) then
  return {0, used, 0}
end
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 4)
return {1, used + 1, expiry}
"""
)
# Renew only a lease still held: one that expired may already belong to someone else's count.
_RENEW = (
    _NOW_MS
    + _PURGE
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return expiry
"""
)
_IN_USE = _NOW_MS + _PURGE + "return redis.call('ZCARD', KEYS[1])"


class CapacityUnavailable(Exception):
    """Redis could not be asked: the caller decides (the bridge refuses the call with congestion)."""


@dataclass
class Lease:
    call_id: str
    expires_at_ms: int
    # Set when a renewal finds the lease gone (expired, e.g. after a long Redis outage): the call is over
    # capacity and its owner should end it.
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class CapacityLeases:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        slots: int,
        ttl_s: float,
        renew_every_s: float | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if renew_every_s is not None and renew_every_s >= ttl_s:
            raise ValueError(
                "renew_every_s must be shorter than ttl_s, or every lease lapses between renewals"
            )
        self._redis = redis
        self.key = f"{prefix}:leases"
        self.slots = slots
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.renew_every_s = renew_every_s if renew_every_s is not None else ttl_s / 3
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._in_use = redis.register_script(_IN_USE)

    async def acquire(self, call_id: str) -> Lease | None:
        """A lease on one slot, or None when all N are taken. Raises CapacityUnavailable if Redis is down."""
        try:
            granted, _used, expiry = await self._acquire(
                keys=[self.key], args=[call_id, self.slots, self._ttl_ms]
            )
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc
        return Lease(call_id, int(expiry)) if int(granted) else None

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it was already gone (then ``lease.lost`` is set)."""
        try:
            expiry = int(await self._renew(keys=[self.key], args=[lease.call_id, self._ttl_ms]))
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc
        if expiry == 0:
            lease.lost.set()
            return False
        lease.expires_at_ms = expiry
        return True

    async def release(self, lease: Lease) -> None:
        """Give the slot back; a Redis error is logged (the TTL frees the slot anyway)."""
        try:
            await self._redis.zrem(self.key, lease.call_id)
        except RedisError as exc:
            log.warning("lease release for %s failed (%s): it expires within the TTL", lease.call_id, exc)

    async def in_use(self) -> int:
        try:
            return int(await self._in_use(keys=[self.key]))
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc

    async def _renew_forever(self, lease: Lease) -> None:
        while not lease.lost.is_set():
            await asyncio.sleep(self.renew_every_s)
            try:
                if not await self.renew(lease):
                    log.error("capacity lease of call %s lapsed", lease.call_id)
                    return
            except CapacityUnavailable as exc:
                # redis-py can turn a cancellation into a connection error: never swallow our own cancel.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                # Keep trying: a short Redis blip should not end a call; the lease survives until its TTL.
                log.warning("lease renewal for %s failed: %s", lease.call_id, exc)

    @contextlib.asynccontextmanager
    async def hold(self, call_id: str) -> AsyncIterator[Lease | None]:
        """``async with leases.hold(call_id) as lease:`` None when full, else renewed until the block ends."""
        lease = await self.acquire(call_id)
        if lease is None:
            yield None
            return
        renewer = asyncio.create_task(self._renew_forever(lease), name=f"lease-renew-{call_id}")
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.release(lease)
