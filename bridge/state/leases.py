"""Capacity leases in Redis: a call holds one of N slots for as long as it renews its lease.

One sorted set per appliance, ``{prefix}:leases``: member = call id, score = expiry in ms on Redis's own
clock (``TIME`` inside the scripts, so bridges with skewed clocks agree). Each script first drops expired
members, so the slots of a bridge that died without releasing free themselves within the TTL, and
"count, then add" happens atomically inside Redis: two bridges can never both take the last slot.

Admission and renewal differ on purpose. Admission (``acquire``) refuses call N+1. Renewal never ends a
live call: :class:`LeaseKeeper` renews all of a bridge's leases in one round trip and puts back any that
Redis no longer has (Redis restarted empty, an outage longer than the TTL, a renewal that reached Redis
after the TTL because the bridge's loop stalled). If that puts the house over N, admission refuses new
calls until it is back under N; the calls already talking are never the ones to pay for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
# Every lease this bridge holds, in one round trip: KEYS[1] leases; ARGV: ttl ms, call ids...
# Members that are gone (Redis restarted empty, expired) are added back unconditionally: a live call keeps
# its slot even if that puts the house over N. Returns {in use after, {ids that had to be re-added}}.
_RENEW_ALL = (
    _NOW_MS
    + _PURGE
    + """
local expiry = now + tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then missing[#missing + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 4) end
return {redis.call('ZCARD', KEYS[1]), missing}
"""
)
_IN_USE = _NOW_MS + _PURGE + "return redis.call('ZCARD', KEYS[1])"


class CapacityUnavailable(Exception):
    """Redis could not be asked: the caller decides (the bridge refuses the call with congestion)."""


@dataclass
class Lease:
    call_id: str
    expires_at_ms: int


@dataclass(frozen=True)
class RenewResult:
    in_use: int
    reregistered: list[str]


class CapacityLeases:
    """The Redis primitives. A bridge holds its leases through a :class:`LeaseKeeper`."""

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
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.renew_every_s = renew_every_s if renew_every_s is not None else ttl_s / 3
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._renew_all = redis.register_script(_RENEW_ALL)
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
        """Extend one lease if Redis still has it; False if it was gone (nothing is added back)."""
        try:
            expiry = int(await self._renew(keys=[self.key], args=[lease.call_id, self._ttl_ms]))
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc
        if expiry == 0:
            return False
        lease.expires_at_ms = expiry
        return True

    async def renew_all(self, call_ids: list[str]) -> RenewResult:
        """Extend every one of ``call_ids``, putting back those Redis no longer has (even over N)."""
        try:
            used, missing = await self._renew_all(keys=[self.key], args=[self._ttl_ms, *call_ids])
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc
        return RenewResult(int(used), [m.decode() if isinstance(m, bytes) else str(m) for m in missing])

    async def release(self, lease: Lease) -> None:
        """Give the slot back; a Redis error is logged (the TTL frees the slot anyway)."""
        await self.release_ids([lease.call_id])

    async def release_ids(self, call_ids: list[str]) -> None:
        if not call_ids:
            return
        try:
            await self._redis.zrem(self.key, *call_ids)
        except RedisError as exc:
            log.warning("lease release for %s failed (%s): it expires within the TTL", call_ids, exc)

    async def in_use(self) -> int:
        try:
            return int(await self._in_use(keys=[self.key]))
        except RedisError as exc:
            raise CapacityUnavailable(f"redis: {exc}") from exc

    @contextlib.asynccontextmanager
    async def hold(self, call_id: str) -> AsyncIterator[Lease | None]:
        """``async with leases.hold(call_id) as lease:`` None when full, else kept until the block ends."""
        keeper = LeaseKeeper(self)
        lease = await keeper.acquire(call_id)
        if lease is None:
            yield None
            return
        renewer = asyncio.create_task(keeper.run(), name=f"lease-keeper-{call_id}")
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await keeper.release(lease)


@dataclass
class KeeperStats:
    renewals: int = 0
    renew_failures: int = 0
    reregistered: int = 0  # leases Redis had lost and the keeper put back
    refused_full: int = 0  # admissions refused: the house was full (or over N)
    in_use: int | None = None  # the house, as of the last successful renewal
    over_capacity: bool = False
    last_error: str | None = None


class LeaseKeeper:
    """This bridge's live leases, renewed together by one task (``run``), never given up for Redis.

    * One round trip per renewal for all calls, so a loaded loop has one timer to serve, not one per call.
    * A renewal that fails (Redis down or slow) is retried every ``retry_every_s`` (a warning each first
      failure and then every 30th); calls go on. Each round trip is bounded by ``round_timeout_s``.
    * A lease Redis no longer has is put back at the next successful round (re-registration): after Redis
      restarts, within ``retry_every_s`` of it answering again. If the house is then over N, ``acquire``
      refuses new calls (the script counts every member) until it is back under N.
    """

    def __init__(
        self,
        leases: CapacityLeases,
        *,
        retry_every_s: float = 1.0,
        round_timeout_s: float | None = None,
    ) -> None:
        self.leases = leases
        self.renew_every_s = leases.renew_every_s
        self.retry_every_s = min(retry_every_s, leases.renew_every_s)
        # A round that takes longer than a third of the TTL is treated as failed (and retried).
        self.round_timeout_s = round_timeout_s if round_timeout_s is not None else max(0.1, leases.ttl_s / 3)
        self.held: dict[str, Lease] = {}
        self._in_flight: set[str] = set()
        self._released_in_flight: set[str] = set()
        self.stats = KeeperStats()
        self.renewed = asyncio.Event()  # set after each successful round (tests and health wait on it)

    @property
    def slots(self) -> int:
        return self.leases.slots

    async def acquire(self, call_id: str) -> Lease | None:
        """Admission: a lease, or None when the house is full (or over N). Raises CapacityUnavailable."""
        lease = await self.leases.acquire(call_id)
        if lease is None:
            self.stats.refused_full += 1
        else:
            self.held[call_id] = lease
        return lease

    async def release(self, lease: Lease) -> None:
        self.held.pop(lease.call_id, None)
        if lease.call_id in self._in_flight:
            # A renewal already on its way may add it back after our ZREM: remove it again afterwards.
            self._released_in_flight.add(lease.call_id)
        await self.leases.release(lease)

    async def renew_once(self) -> RenewResult | None:
        """One renewal round for every held lease; None when Redis could not be asked."""
        ids = list(self.held)
        self._in_flight = set(ids)
        try:
            async with asyncio.timeout(self.round_timeout_s):
                result = await self.leases.renew_all(ids)
        except (CapacityUnavailable, TimeoutError) as exc:
            _reraise_if_cancelling(exc)
            self.stats.renew_failures += 1
            self.stats.last_error = str(exc) or type(exc).__name__
            if self.stats.renew_failures % 30 == 1:
                log.warning(
                    "capacity lease renewal failed (%d so far): %s; %d live call(s) go on and are "
                    "re-registered when Redis answers", self.stats.renew_failures, self.stats.last_error,
                    len(ids),
                )
            return None
        finally:
            self._in_flight = set()
            stale, self._released_in_flight = self._released_in_flight, set()
        if stale:
            await self.leases.release_ids(sorted(stale))
        self._note(result, len(ids))
        return result

    def _note(self, result: RenewResult, held: int) -> None:
        st = self.stats
        st.renewals += 1
        st.in_use = result.in_use
        if result.reregistered:
            st.reregistered += len(result.reregistered)
            log.warning(
                "Redis had lost %d of this bridge's %d lease(s) (restarted, or an outage or stall longer "
                "than the TTL); re-registered: house at %d of %d",
                len(result.reregistered), held, result.in_use, self.slots,
            )
        over = result.in_use > self.slots
        if over and not st.over_capacity:
            log.warning("house over capacity (%d of %d): new calls are refused until it is under %d",
                        result.in_use, self.slots, self.slots)
        elif st.over_capacity and not over:
            log.info("house back within capacity (%d of %d)", result.in_use, self.slots)
        st.over_capacity = over
        st.last_error = None
        self.renewed.set()

    async def run(self) -> None:
        """Renew until cancelled: every ``renew_every_s``, or ``retry_every_s`` after a failed round."""
        while True:
            result = await self.renew_once() if self.held else _IDLE
            await asyncio.sleep(self.renew_every_s if result is not None else self.retry_every_s)

    def snapshot(self) -> dict[str, object]:
        st = self.stats
        return {
            "held": len(self.held), "in_use": st.in_use, "slots": self.slots,
            "over_capacity": st.over_capacity, "renewals": st.renewals,
            "renew_failures": st.renew_failures, "reregistered": st.reregistered,
            "refused_full": st.refused_full, "last_error": st.last_error,
        }


_IDLE = RenewResult(0, [])


def _reraise_if_cancelling(exc: BaseException) -> None:
    """redis-py can turn a cancellation into a connection error: never swallow our own cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
