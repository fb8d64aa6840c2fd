"""The appliance state (bridge.state: PostgreSQL routes and records, Redis leases and live calls) behind
the narrow interfaces a call uses (bridge.call_deps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.call_deps import CallInfo, CallRoute, CapacityReport
from bridge.config import Settings
from bridge.control_api import HealthProbe
from bridge.media.metrics import media_gauges
from bridge.state.db import StateDB
from bridge.state.health import check_health
from bridge.state.leases import CapacityLeases, Lease, LeaseKeeper
from bridge.state.live import CallEvent, LiveCalls
from bridge.state.records import CallRecorder, CallStart
from bridge.state.routing import RouteResolver

log = logging.getLogger(__name__)

LIVE_QUEUE_MAX = 10_000
LIVE_REFRESH_S = 20.0  # well inside LiveCalls' TTL, so a long call never drops off `calls live`
LIVE_GAUGES_S = 2.0  # how often a phone call's latency reaches its live hash (`calls live`)


class DbRoutes:
    """RouteResolver (cached, never raises for DB errors) as a RouteSource."""

    def __init__(self, resolver: RouteResolver) -> None:
        self.resolver = resolver

    async def resolve(self, did: str) -> CallRoute:
        return await self.resolver.resolve(did)


class RedisCapacity:
    """A LeaseKeeper as a CapacityGate: admission by Redis lease (CapacityUnavailable propagates: the call
    is refused), renewal by the keeper's one task for all calls, never ending a live call."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self.keeper = keeper

    async def acquire(self, call_id: str) -> object | None:
        return await self.keeper.acquire(call_id)

    async def release(self, lease: object) -> None:
        await self.keeper.release(cast(Lease, lease))

    def capacity_report(self) -> CapacityReport:
        st = self.keeper.stats
        return CapacityReport(slots=self.keeper.slots, held=len(self.keeper.held),
                              refused_full=st.refused_full, leases_lost=st.reregistered,
                              renew_failures=st.renew_failures)


class StateSink:
    """Call records (CallRecorder: queued, retried) and live state (Redis hash + pub/sub).

    Every method returns at once. Live-state writes go through a bounded queue drained by one writer
    task that ``run()`` owns; when Redis is slow or down they are dropped and counted, never waited on.
    The same task writes each watched call's latency (``watch``) every ``gauges_every_s``, all calls in
    one pipeline, so the load on Redis grows with the calls, never with their events; the calls
    themselves never wait on Redis, so an outage costs `calls live` its figures, not a call.
    """

    def __init__(
        self, recorder: CallRecorder, live: LiveCalls, *, gauges_every_s: float = LIVE_GAUGES_S,
        refresh_every_s: float = LIVE_REFRESH_S,
    ) -> None:
        self.recorder = recorder
        self.live = live
        self.gauges_every_s = gauges_every_s
        self.refresh_every_s = refresh_every_s
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue(LIVE_QUEUE_MAX)
        self._live_fields: dict[str, dict[str, str | int | float]] = {}
        self._media: dict[str, object] = {}  # call id -> its media, for media_gauges
        self.live_dropped = 0
        self.live_errors = 0
        self._failing = False  # in a Redis outage: logged at its start and its end, not per write
        self._gauge_errors = 0
        self._stopping = False

    def stop(self) -> None:
        """Make ``run`` return after the writes queued so far (a sentinel: a cancelled Redis command
        can swallow the cancellation, so stopping does not rely on it)."""
        self._stopping = False
        try:
            self._queue.put_nowait(("stop", "", {}))
        except asyncio.QueueFull:
            self._stopping = True

    # -- CallSink ----------------------------------------------------------------------------------------

    def started(self, info: CallInfo) -> None:
        self.recorder.record_start(CallStart(info.call_id, info.did or None, info.caller, info.persona))
        self._live_fields[info.call_id] = {
            "did": info.did, "caller": info.caller, "persona": info.persona, "language": info.language,
            "channel": info.kind, "state": "setup", "started_at": round(time.time(), 3),
        }
        self._enqueue("update", info.call_id, {})
        self._enqueue("publish", info.call_id, {"kind": "start", "did": info.did, "caller": info.caller})

    def watch(self, call_id: str, media: object) -> None:
        """Put the call's latency (media_gauges) on its live hash, once it has started, until it ends or is
        refused (its media is made before the answer, so a refused call may have some)."""
        self._media[call_id] = media

    def refused(self, info: CallInfo, reason: str) -> None:
        self._media.pop(info.call_id, None)
        self.recorder.record_refused(info.call_id, info.did or None, info.caller, reason, info.persona)
        self._enqueue("publish", info.call_id, {"kind": "refused", "reason": reason, "did": info.did})

    def answered(self, call_id: str) -> None:
        self.recorder.record_answer(call_id)
        if call_id in self._live_fields:
            self._live_fields[call_id]["state"] = "active"
        self._enqueue("update", call_id, {})
        self._enqueue("publish", call_id, {"kind": "answer"})

    def event(self, call_id: str, kind: str, data: dict[str, Any]) -> None:
        self.recorder.record_event(call_id, kind, data)
        if kind == "engine":  # also on the call's own row: seed (replay) and warnings
            seed = data.get("seed")
            warnings = data.get("warnings") or []
            self.recorder.record_engine(call_id, data.get("url"), seed if isinstance(seed, int) else None,
                                        [str(w) for w in warnings] if isinstance(warnings, list) else [])
        fields = self._live_fields.get(call_id)
        if fields is not None and kind in ("hold", "unhold"):
            fields["state"] = "held" if kind == "hold" else "active"
            self._enqueue("update", call_id, {})
        self._enqueue("publish", call_id, {"kind": kind, **data})

    def ended(
        self, call_id: str, cause: str, summary: dict[str, Any], transcript: str, dtmf_digits: str
    ) -> None:
        self.recorder.record_end(call_id, cause, summary, transcript, dtmf_digits)
        self._live_fields.pop(call_id, None)
        self._media.pop(call_id, None)
        self._enqueue("remove", call_id, {})
        self._enqueue("publish", call_id, {"kind": "end", "cause": cause})

    def _enqueue(self, op: str, call_id: str, data: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((op, call_id, data))
        except asyncio.QueueFull:
            self.live_dropped += 1

    # -- writer ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain live-state writes; every gauges_every_s write the watched calls' latency, and every
        refresh_every_s refresh every live call's TTL. Runs until stopped or cancelled."""
        now = time.monotonic()
        next_gauges, next_refresh = now + self.gauges_every_s, now + self.refresh_every_s
        while not self._stopping:
            now = time.monotonic()
            # Checked before the queue, not only on its timeout: Queue.get() does not yield while
            # events are queued, so a steady stream of them would starve the periodic writes.
            if now >= next_gauges:
                everyone = now >= next_refresh
                batch = self._periodic_batch(everyone)
                if batch:  # an empty write would "succeed" and pass for the end of an outage
                    await self._write_safely(self.live.update_many(batch))
                next_gauges = time.monotonic() + self.gauges_every_s
                if everyone:
                    next_refresh = time.monotonic() + self.refresh_every_s
                continue
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races
                # with its inner result, and this task would never stop.
                async with asyncio.timeout(next_gauges - now):
                    op, call_id, data = await self._queue.get()
            except TimeoutError:
                continue
            if op == "stop":
                return
            await self._write_safely(self._apply(op, call_id, data))

    async def _apply(self, op: str, call_id: str, data: dict[str, Any]) -> None:
        if op == "update":
            fields = self._live_fields.get(call_id)
            if fields is not None:
                await self.live.update(call_id, fields)
        elif op == "remove":
            await self.live.remove(call_id)
        else:
            kind = str(data.pop("kind", op))
            await self.live.publish(CallEvent(call_id, kind, data))

    def _periodic_batch(self, everyone: bool) -> dict[str, dict[str, str | int | float]]:
        """For one pipeline: the watched calls with fresh gauges (and, when ``everyone``, all live calls,
        for their TTL); a call's whole hash is rewritten, so one that expired in an outage comes back
        whole."""
        batch: dict[str, dict[str, str | int | float]] = {}
        for call_id, media in list(self._media.items()):
            fields = self._live_fields.get(call_id)
            if fields is None:
                continue
            try:
                fields.update(media_gauges(media))
            except Exception as exc:  # a figure we cannot read must not stop the live state of all calls
                self._gauge_errors += 1
                if self._gauge_errors == 1:
                    log.warning("call %s: latency figures unreadable for `calls live`: %r", call_id, exc)
            batch[call_id] = fields
        if everyone:
            batch.update(self._live_fields)
        return {call_id: dict(fields) for call_id, fields in batch.items()}

    async def _write_safely(self, aw: Any) -> None:
        try:
            async with asyncio.timeout(2.0):
                await aw
        except Exception as exc:  # Redis down/slow: live state is best-effort, records are not affected
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # redis-py may turn a cancel into an error
                raise asyncio.CancelledError from exc
            self.live_errors += 1
            if not self._failing:  # once per outage: the periodic writes would repeat it every 2 s
                self._failing = True
                log.warning("live call state write failed, calls go on; `calls live` is stale until Redis "
                            "answers (failures are counted in /health): %s", exc)
            return
        if self._failing:
            self._failing = False
            log.warning("live call state writes work again (%d failed)", self.live_errors)


@dataclass
class OpenState:
    routes: DbRoutes
    capacity: RedisCapacity
    sink: StateSink
    health_probe: HealthProbe
    db: StateDB  # persona lookups for the browser channel


@contextlib.asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[OpenState]:
    """Open the database pool, Redis, the call recorder and the live-state writer; close them in order."""
    # A blocking pool: a burst of calls waits briefly for a connection instead of failing with
    # "Too many connections" (which the lease code would turn into refused calls).
    # Retries: after a Redis restart every pooled connection is dead, and the first command on each fails
    # ("Connection closed by server"); retried on a fresh connection it succeeds. Without this, a release
    # after a restart failed (the lease lingered a TTL) and the next call was refused on a full house.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=256, timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError])
    redis = aioredis.Redis(connection_pool=pool)
    db = StateDB(settings.database_url)
    recorder = CallRecorder(settings.database_url)
    await db.open()
    await recorder.start()
    cap = settings.capacity
    leases = CapacityLeases(redis, settings.redis_prefix, cap.slots, cap.lease_ttl_s, cap.renew_every_s)
    keeper = LeaseKeeper(leases)
    sink = StateSink(recorder, LiveCalls(redis, settings.redis_prefix))
    writer = asyncio.create_task(sink.run(), name="live-state-writer")
    renewer = asyncio.create_task(keeper.run(), name="lease-keeper")

    async def probe() -> dict[str, Any]:
        report = await check_health(settings, recorder)
        report["live_state"] = {"dropped": sink.live_dropped, "errors": sink.live_errors}
        report["leases"] = keeper.snapshot()
        return report

    try:
        yield OpenState(DbRoutes(RouteResolver(db)), RedisCapacity(keeper), sink, probe, db)
    finally:
        renewer.cancel()
        await asyncio.wait({renewer}, timeout=3.0)
        sink.stop()
        _, pending = await asyncio.wait({writer}, timeout=3.0)
        if pending:  # Redis hanging: give up on the last live-state writes, never on shutdown
            writer.cancel()
            await asyncio.wait({writer}, timeout=1.0)
        await recorder.stop()
        await db.close()
        await redis.aclose()
