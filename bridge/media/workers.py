"""Media workers: the bridge's calls' media spread over N processes, so the media path uses N cores.

The controller (ARI, routes, capacity, records, the browser channel) stays in the bridge process. With
``bridge.media_workers = N`` (N ≥ 1) each phone call is placed on the worker with the fewest calls: its
engine session is opened there and its media (``CallMedia``) runs there, so RTP and engine frames never
cross a process boundary. The call sees the same two seams as in-process media (``EngineLink`` and
``MediaLink`` of ``bridge.call_deps``): :class:`WorkerEngine` and :class:`WorkerMedia` forward each
request over the worker's pipe (``bridge/media/worker_wire.py``).

A worker that dies ends its calls (``media_worker_gone``: the call hangs up, its record says why) and no
other; the pool starts a new one after a backoff, and new calls go to the live workers meanwhile. Its last
counters and histograms stay counted (``metrics_fanin.retire``); its gauges do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from bridge.backoff import Backoff
from bridge.call_deps import EngineCannotTakeCall, EngineLink, MediaLink
from bridge.config import BridgeSettings
from bridge.engine_client import EngineError
from bridge.media.call_media import MediaBindError
from bridge.media.metrics_fanin import MediaMetricsFanIn, retire
from bridge.media.worker_wire import MAX_LINE, Message, WireError, decode, encode
from engine.protocol import PersonaParams

log = logging.getLogger(__name__)

# An engine open has its own 5 s limit: a worker that answers nothing for this long is stuck (its calls' media
# with it) and is killed, which ends its calls and starts a fresh one.
REQUEST_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
GONE = "media_worker_gone"


class MediaWorkerGone(Exception):
    """The worker process holding the call has exited (or never answered)."""


class MediaWorkerError(Exception):
    """The worker refused a request: ``error`` is its reason word."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class EngineReady:
    """What the call record keeps of the engine's ``ready`` (as EngineSession.ready has it)."""

    seed: int
    warnings: tuple[str, ...]


class MediaWorker:
    """One worker process and its pipe: requests out, answers and reports in."""

    def __init__(self, index: int, settings: BridgeSettings, log_level: str = "INFO") -> None:
        self.index = index
        self.settings = settings
        self.log_level = log_level
        self.calls: dict[str, WorkerMedia | None] = {}  # placed calls (None: engine open, no media yet)
        self.metrics_text = ""
        self.live_gauges: dict[str, dict[str, Any]] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._gone = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._gone.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.media.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE,
        )
        self._write(encode("hello", settings=self.settings.model_dump(mode="json"), log_level=self.log_level))
        self._reader = asyncio.create_task(self._read_loop(), name=f"aziza-media-worker-{self.index}")

    async def wait_gone(self) -> None:
        await self._gone.wait()

    async def stop(self) -> None:
        """Close its stdin (it stops its calls and exits), then wait; kill it if it does not go."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def kill(self) -> None:
        """For tests and the supervisor: the process ends as if it had crashed."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    # -- requests ----------------------------------------------------------------------------------------

    def _write(self, line: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing() or self._gone.is_set():
            raise MediaWorkerGone(f"media worker {self.index} is gone")
        proc.stdin.write(line)

    def tell(self, op: str, call: str, **fields: Any) -> None:
        """A request with no answer; dropped if the worker is gone (its calls end through ``run``)."""
        with contextlib.suppress(MediaWorkerGone):
            self._write(encode(op, call, **fields))

    async def request(self, op: str, call: str, **fields: Any) -> dict[str, Any]:
        """A request and its answer's fields; MediaWorkerError if refused, MediaWorkerGone if the worker
        exits (or is stuck for REQUEST_TIMEOUT_S)."""
        ident = next(self._ids)
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[ident] = answer
        try:
            self._write(encode(op, call, ident, **fields))
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                msg = await answer
        except TimeoutError:
            log.error("media worker %d (pid %s) did not answer %s in %.0f s: stuck, killed", self.index,
                      self.pid, op, REQUEST_TIMEOUT_S)
            self.kill()
            raise MediaWorkerGone(f"media worker {self.index} did not answer {op} in time") from None
        finally:
            self._pending.pop(ident, None)
        if "error" in msg.fields:
            raise MediaWorkerError(str(msg.fields["error"]), str(msg.fields.get("detail", "")))
        return msg.fields

    # -- reports -----------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                try:
                    line = await stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):  # an over-long line: skip to the next
                    log.warning("media worker %d: over-long line skipped", self.index)
                    continue
                if not line:
                    break
                try:
                    msg = decode(line)
                except WireError as exc:
                    log.warning("media worker %d: bad line skipped: %s", self.index, exc)
                    continue
                self._on_message(msg)
        finally:
            self._gone.set()
            code = await self._proc.wait()
            if code:
                log.error("media worker %d (pid %s) exited with %s", self.index, self._proc.pid, code)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(MediaWorkerGone(f"media worker {self.index} exited"))
            for media in list(self.calls.values()):
                if media is not None:
                    media.on_ended(GONE, {}, [])

    def _on_message(self, msg: Message) -> None:
        if msg.op == "answer" and msg.id is not None:
            future = self._pending.get(msg.id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif msg.op == "ended":
            media = self.calls.get(msg.call)
            if media is not None:
                text = msg.fields.get("text")
                media.on_ended(str(msg.fields.get("reason", "stopped")), msg.fields.get("snapshot") or {},
                               [str(t) for t in text] if isinstance(text, list) else [],
                               msg.fields.get("histograms") or {})
        elif msg.op == "live":
            text, calls = msg.fields.get("metrics"), msg.fields.get("calls")
            if isinstance(text, str):
                self.metrics_text = text
            if isinstance(calls, dict):
                self.live_gauges = calls


class WorkerEngine:
    """A call's engine session, held by its worker (``EngineLink``)."""

    def __init__(self, worker: MediaWorker, call_id: str, answer: dict[str, Any]) -> None:
        self.worker = worker
        self.call_id = call_id
        self.url = answer.get("url")
        warnings = tuple(str(w) for w in answer.get("warnings", ()))
        self.ready = EngineReady(int(answer.get("seed") or 0), warnings)
        self._closed = False

    async def send_event(self, name: str, value: str) -> None:
        try:
            await self.worker.request("event", self.call_id, name=name, value=value)
        except (MediaWorkerError, MediaWorkerGone) as exc:  # the call takes it as the engine's own error
            raise EngineError(str(exc)) from exc

    async def close(self) -> None:
        """Close media and engine session in the worker, and forget the call there (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.worker.request("close", self.call_id)
        except (MediaWorkerGone, MediaWorkerError):
            pass
        finally:
            self.worker.calls.pop(self.call_id, None)


class _Stats:
    """What the call reads of in-process media's ``stats`` at its end: the engine's text."""

    def __init__(self) -> None:
        self.engine_text: list[str] = []


class WorkerMedia:
    """A call's media, running in its worker (``MediaLink``)."""

    def __init__(self, worker: MediaWorker, call_id: str, inbound_format: str) -> None:
        self.worker = worker
        self.call_id = call_id
        self.inbound_format = inbound_format
        self.stats = _Stats()
        self._snapshot: dict[str, Any] = {}
        self.histograms: dict[str, Any] = {}
        self._ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._running = False
        worker.calls[call_id] = self
        if not worker.alive:
            self.on_ended(GONE, {}, [])

    async def bind(self) -> tuple[str, int]:
        try:
            answer = await self.worker.request("bind", self.call_id, inbound_format=self.inbound_format)
        except (MediaWorkerError, MediaWorkerGone) as exc:
            raise MediaBindError(str(exc)) from exc
        return str(answer["host"]), int(answer["port"])

    def lock_remote(self, host: str, port: int) -> None:
        self.worker.tell("lock", self.call_id, host=host, port=int(port))

    async def run(self) -> str:
        if self._running:
            raise RuntimeError("WorkerMedia.run() can run once")
        self._running = True
        self.worker.tell("run", self.call_id)
        return await asyncio.shield(self._ended)

    def pause(self) -> None:
        self.worker.tell("pause", self.call_id)

    def resume(self) -> None:
        self.worker.tell("resume", self.call_id)

    async def stop(self) -> None:
        """End the media (idempotent); returns once the worker says it has ended, or the worker is gone."""
        if self._ended.done():
            return
        with contextlib.suppress(MediaWorkerGone, MediaWorkerError):
            await self.worker.request("stop", self.call_id)
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(self._ended)

    def on_ended(
        self, reason: str, snapshot: dict[str, Any], text: list[str], histograms: dict[str, Any] | None = None
    ) -> None:
        if self._ended.done():
            return
        self._snapshot = snapshot
        self.histograms = histograms or {}  # the stats' histograms, sparse (Histogram.to_sparse)
        self.stats.engine_text = text
        self._ended.set_result(reason)

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def live_gauges(self) -> dict[str, Any]:
        gauges = self.worker.live_gauges.get(self.call_id)
        return dict(gauges) if isinstance(gauges, dict) else {}


class MediaWorkerPool:
    """N media workers, started and supervised while ``running()`` is open."""

    def __init__(
        self, settings: BridgeSettings, count: int, metrics: MediaMetricsFanIn | None = None,
        log_level: str = "INFO",
    ) -> None:
        if count < 1:
            raise ValueError("a media worker pool needs at least one worker")
        self.settings = settings
        self.log_level = log_level
        self.workers = [MediaWorker(i, settings, log_level) for i in range(count)]
        self.restarts = 0
        self._metrics = metrics
        self._retired_text = ""  # the counts of dead workers, summed into one text (metrics_fanin.retire)

    def metrics_texts(self) -> list[str]:
        texts = [w.metrics_text for w in self.workers if w.metrics_text]
        return [self._retired_text, *texts] if self._retired_text else texts

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MediaWorkerPool]:
        await asyncio.gather(*(w.start() for w in self.workers))
        if self._metrics is not None:
            self._metrics.add_remote(self.metrics_texts)
        supervisors = [asyncio.create_task(self._supervise(i), name=f"aziza-media-worker-{i}-supervisor")
                       for i in range(len(self.workers))]
        try:
            yield self
        finally:
            for task in supervisors:
                task.cancel()
            await asyncio.gather(*supervisors, return_exceptions=True)
            await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
            if self._metrics is not None:
                self._metrics.remove_remote(self.metrics_texts)

    async def _supervise(self, index: int) -> None:
        backoff = Backoff(0.5, 10.0)
        while True:
            worker = self.workers[index]
            await worker.wait_gone()
            if worker.metrics_text:
                self._retired_text = retire(self._retired_text, worker.metrics_text)
            log.error("media worker %d is gone; its calls ended (%s); starting another", index, GONE)
            await asyncio.sleep(backoff.next_delay())
            fresh = MediaWorker(index, self.settings, self.log_level)
            try:
                await fresh.start()
            except OSError as exc:
                log.error("media worker %d could not start: %s", index, exc)
                continue
            self.workers[index] = fresh
            self.restarts += 1
            backoff.reset()

    def place(self) -> MediaWorker:
        """The live worker with the fewest calls; MediaWorkerGone when none is live."""
        live = [w for w in self.workers if w.alive]
        if not live:
            raise MediaWorkerGone("no media worker is running")
        return min(live, key=lambda w: len(w.calls))

    async def open_engine(self, persona: PersonaParams, call_id: str) -> EngineLink:
        """The call's engine session, opened in the worker its media will run in."""
        try:
            worker = self.place()
        except MediaWorkerGone as exc:
            raise EngineCannotTakeCall("engine_unavailable", str(exc)) from exc
        worker.calls[call_id] = None
        fields = {name: getattr(persona, name) for name in persona.__dataclass_fields__}
        try:
            answer = await worker.request("open", call_id, persona=fields)
        except MediaWorkerError as exc:
            worker.calls.pop(call_id, None)
            reason = exc.error if exc.error in ("engine_full", "engine_unavailable") else "engine_unavailable"
            raise EngineCannotTakeCall(reason, exc.detail) from exc
        except MediaWorkerGone as exc:
            worker.calls.pop(call_id, None)
            raise EngineCannotTakeCall("engine_unavailable", str(exc)) from exc
        except asyncio.CancelledError:  # the call ended while its engine was opening: nothing may leak
            worker.calls.pop(call_id, None)
            worker.tell("drop", call_id)
            raise
        return WorkerEngine(worker, call_id, answer)

    def make_media(self, engine: EngineLink, call_id: str) -> MediaLink:
        if not isinstance(engine, WorkerEngine):
            raise TypeError("media workers run media for engine sessions they opened (WorkerEngine)")
        return WorkerMedia(engine.worker, call_id, self.settings.inbound_format)


__all__ = ["GONE", "MediaWorker", "MediaWorkerError", "MediaWorkerGone", "MediaWorkerPool", "WorkerEngine",
           "WorkerMedia"]
