"""Call records written behind the call: enqueue now, write later, in order, surviving database outages.

A call never waits for PostgreSQL. ``record_*`` put an item on a bounded queue and return at once (the
time is stamped then, so late writes keep true times); one writer task drains the queue in batches, each
in one transaction. If the database is unreachable the writer keeps the batch, backs off and retries the
same batch, so nothing is lost and order is kept. Every write is idempotent (upserts keyed by the call id,
events by a client-made uuid), so a batch retried after a lost commit acknowledgement does not double.
When the queue is full new items are dropped and counted (``status()``): the call goes on regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bridge.backoff import Backoff

log = logging.getLogger(__name__)


def _dumps(obj: Any) -> str:
    # Whatever a call puts in its summary or event data is stored: odd values become their str().
    return json.dumps(obj, default=str)


@dataclass(frozen=True)
class CallStart:
    call_id: str
    did: str | None
    caller: str | None
    persona: str | None
    started_at: datetime | None = None  # None: stamped when recorded


@dataclass(frozen=True)
class _Write:
    """One queued write: a SQL statement and its parameters."""

    sql: str
    params: tuple[Any, ...]
    call_id: str
    kind: str


_UPSERT_START = (
    "INSERT INTO calls (id, did, caller, persona, started_at) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET did = EXCLUDED.did, caller = EXCLUDED.caller, "
    "persona = EXCLUDED.persona, started_at = EXCLUDED.started_at"
)
# answer/end/refused upsert too: if the start was dropped (full queue) the rest of the record still lands.
_UPSERT_ANSWER = (
    "INSERT INTO calls (id, started_at, answered_at) VALUES (%s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET answered_at = EXCLUDED.answered_at"
)
_UPSERT_END = (
    "INSERT INTO calls (id, started_at, ended_at, end_cause, latency_summary, transcript, dtmf_digits) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at, "
    "end_cause = EXCLUDED.end_cause, latency_summary = EXCLUDED.latency_summary, "
    "transcript = EXCLUDED.transcript, dtmf_digits = EXCLUDED.dtmf_digits"
)
_UPSERT_REFUSED = (
    "INSERT INTO calls (id, did, caller, persona, started_at, ended_at, end_cause, refused) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, true) ON CONFLICT (id) DO UPDATE SET refused = true, "
    "ended_at = EXCLUDED.ended_at, end_cause = EXCLUDED.end_cause"
)
_UPSERT_ENGINE = (
    "INSERT INTO calls (id, started_at, engine_url, engine_seed, warnings) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET engine_url = EXCLUDED.engine_url, engine_seed = EXCLUDED.engine_seed, "
    "warnings = EXCLUDED.warnings"
)
_INSERT_EVENT = (
    "INSERT INTO call_events (id, call_id, at, kind, data) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (id) DO NOTHING"
)


@dataclass
class RecorderStats:
    enqueued: int = 0
    written: int = 0
    dropped_full: int = 0  # refused because the queue was full
    rejected: int = 0  # the database refused the row itself (bad data); skipped, logged
    lost_at_stop: int = 0  # still queued when stop()'s drain timeout ran out
    retries: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    db_up: bool | None = None  # None: not tried yet


class CallRecorder:
    """Owns one writer task (``start()``/``stop()``); the ``record_*`` methods never block or raise."""

    def __init__(
        self,
        database_url: str,
        max_queue: int = 10000,
        *,
        batch_size: int = 200,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._database_url = database_url
        self._queue: asyncio.Queue[_Write] = asyncio.Queue(maxsize=max_queue)
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._now = now
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[_Write] = []  # the batch being written (kept across retries)
        self.stats = RecorderStats()

    # --- the call side: enqueue and return ---------------------------------------------------------

    def record_start(self, call: CallStart) -> None:
        started = call.started_at or self._now()
        self._put(
            _UPSERT_START, (call.call_id, call.did, call.caller, call.persona, started), call.call_id, "start"
        )

    def record_answer(self, call_id: str, answered_at: datetime | None = None) -> None:
        at = answered_at or self._now()
        self._put(_UPSERT_ANSWER, (call_id, at, at), call_id, "answer")

    def record_end(
        self,
        call_id: str,
        cause: str,
        latency_summary: dict[str, Any] | None = None,
        transcript: str | None = None,
        dtmf_digits: str = "",
        ended_at: datetime | None = None,
    ) -> None:
        at = ended_at or self._now()
        summary = Jsonb(latency_summary, dumps=_dumps) if latency_summary is not None else None
        self._put(_UPSERT_END, (call_id, at, at, cause, summary, transcript, dtmf_digits), call_id, "end")

    def record_refused(
        self,
        call_id: str,
        did: str | None,
        caller: str | None,
        cause: str = "capacity",
        persona: str | None = None,
    ) -> None:
        at = self._now()
        self._put(_UPSERT_REFUSED, (call_id, did, caller, persona, at, at, cause), call_id, "refused")

    def record_engine(
        self, call_id: str, engine_url: str | None, seed: int | None, warnings: list[str]
    ) -> None:
        """The engine session a call got: where, its sampling seed, and the engine's warnings."""
        self._put(_UPSERT_ENGINE, (call_id, self._now(), engine_url, seed, list(warnings)), call_id, "engine")

    def record_event(self, call_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        params = (uuid.uuid4(), call_id, self._now(), kind, Jsonb(data or {}, dumps=_dumps))
        self._put(_INSERT_EVENT, params, call_id, f"event:{kind}")

    def _put(self, sql: str, params: tuple[Any, ...], call_id: str, kind: str) -> None:
        try:
            self._queue.put_nowait(_Write(sql, params, call_id, kind))
        except asyncio.QueueFull:
            self.stats.dropped_full += 1
            if self.stats.dropped_full == 1 or self.stats.dropped_full % 1000 == 0:
                log.error(
                    "call record queue full (%d): dropped %s for call %s", self._max_queue, kind, call_id
                )
        else:
            self.stats.enqueued += 1

    # --- the writer -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="call-recorder")

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Write what is queued (up to ``drain_timeout`` seconds), then stop; what is left is counted lost."""
        if self._writer is None:
            return
        try:
            async with asyncio.timeout(drain_timeout):
                while self.depth() > 0:
                    if self._writer.done():
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        self.stats.lost_at_stop += self.depth()
        if self.stats.lost_at_stop:
            log.error("call recorder stopped with %d records unwritten", self.stats.lost_at_stop)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def depth(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "db_up": s.db_up,
            "queue_depth": self.depth(),
            "queue_max": self._max_queue,
            "enqueued": s.enqueued,
            "written": s.written,
            "dropped_full": s.dropped_full,
            "rejected": s.rejected,
            "lost_at_stop": s.lost_at_stop,
            "retries": s.retries,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at.isoformat() if s.last_error_at else None,
        }

    async def _run(self) -> None:
        backoff = Backoff(self._backoff_min_s, self._backoff_max_s)
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
                while len(self._pending) < self._batch_size and not self._queue.empty():
                    self._pending.append(self._queue.get_nowait())
            try:
                await self._write_batch(self._pending)
            except psycopg.OperationalError as exc:
                # The database (or the way to it) is down: keep the batch, back off, retry it.
                self._note_error(exc)
                self.stats.retries += 1
                await self._drop_connection()
                await asyncio.sleep(backoff.next_delay())
                continue
            except Exception as exc:
                # The database is up but refuses some row (or a row cannot be encoded): write the batch
                # row by row and skip the bad ones, so one bad record never stops the others.
                self._note_error(exc)
                try:
                    await self._write_one_by_one(self._pending)
                except psycopg.OperationalError as down:
                    self._note_error(down)
                    await self._drop_connection()
                    await asyncio.sleep(backoff.next_delay())
                    continue
            else:
                self.stats.written += len(self._pending)
            self.stats.db_up = True
            backoff.reset()
            self._pending = []

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._database_url, connect_timeout=max(1, int(self._connect_timeout_s))
            )
        return self._conn

    async def _write_batch(self, batch: list[_Write]) -> None:
        conn = await self._connection()
        async with asyncio.timeout(self._connect_timeout_s * 2):
            try:
                # Pipeline mode: the whole batch goes out in one round trip, committed as one transaction.
                async with conn.transaction(), conn.pipeline():
                    for item in batch:
                        await conn.execute(item.sql.encode(), item.params)
            except TimeoutError:
                raise psycopg.OperationalError("database write timed out") from None

    async def _write_one_by_one(self, batch: list[_Write]) -> None:
        """Write ``batch`` item by item, removing each from it once done (written or rejected), so a
        connection lost half-way resumes where it stopped."""
        conn = await self._connection()
        while batch:
            item = batch[0]
            try:
                async with conn.transaction():
                    await conn.execute(item.sql.encode(), item.params)
                self.stats.written += 1
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                self.stats.rejected += 1
                log.error(
                    "call record %s for call %s rejected by the database: %s", item.kind, item.call_id, exc
                )
            batch.pop(0)

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    def _note_error(self, exc: Exception) -> None:
        self.stats.db_up = False if isinstance(exc, psycopg.OperationalError) else self.stats.db_up
        self.stats.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.stats.last_error_at = self._now()
        log.warning("call record writer: %s", self.stats.last_error)
