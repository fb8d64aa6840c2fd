"""A media worker process (``python -m bridge.media.worker``): the media of the calls the bridge places on
it, each a :class:`~bridge.media.call_media.CallMedia` with its own engine session, as in the bridge
itself. The bridge's controller (ARI, routing, capacity, records) stays in the bridge; it speaks to this
process over stdin/stdout (``bridge/media/worker_wire.py``). With N workers the media path uses N cores.

The worker never outlives the bridge: end of stdin (the bridge exited or closed it) stops every call's
media, closes every engine session and exits. A request about a call this worker does not hold is
answered ``unknown_call``; nothing a request carries ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from bridge.config import BridgeSettings
from bridge.engine_client import EngineError, EngineFull, EngineSession
from bridge.engine_pool import EnginePool
from bridge.media.call_media import CallMedia, MediaBindError
from bridge.media.metrics import Histogram, media_gauges
from bridge.media.prometheus import MEDIA_METRICS
from bridge.media.worker_wire import MAX_LINE, Message, WireError, decode, encode
from bridge.startup import freeze_startup_heap, media_scheduling
from engine.protocol import PersonaParams

log = logging.getLogger("aziza.media.worker")

LIVE_EVERY_S = 1.0
# Reports (live, ended) leave this far into a media-clock tick: its calls' sends are out by then, and the
# report's work (about 0.7 ms at 64 calls) is done before the next tick. At a random instant it held a tick
# up: a 1 s beat of one tick's packets off the grid by 1.2-2.6 ms (bench media --calls 128 --workers 2).
REPORT_TICK_PHASE = 0.25


@dataclass
class _Call:
    engine: EngineSession | None = None
    media: CallMedia | None = None
    run: asyncio.Task[None] | None = None
    dropped: bool = False


class Worker:
    """The worker's state and its request handlers; I/O is two byte streams."""

    def __init__(self, settings: BridgeSettings, writer: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.pool = EnginePool(settings.engines(), mux=settings.engine_mux)
        self.calls: dict[str, _Call] = {}
        self._writer = writer
        self._tasks: set[asyncio.Task[Any]] = set()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(MEDIA_METRICS)
        self._ends: list[tuple[str, dict[str, Any]]] = []
        self._ends_flush: asyncio.TimerHandle | None = None

    # -- output ------------------------------------------------------------------------------------------

    def say(self, op: str, call: str = "", id: int | None = None, **fields: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(op, call, id, **fields))

    def answer(self, msg: Message, **fields: Any) -> None:
        if msg.id is not None:
            self.say("answer", msg.call, msg.id, ok=True, **fields)

    def refuse(self, msg: Message, error: str, detail: str = "") -> None:
        if msg.id is not None:
            self.say("answer", msg.call, msg.id, error=error, detail=detail[:300])

    def live(self) -> None:
        gauges = {cid: media_gauges(c.media) for cid, c in self.calls.items() if c.media is not None}
        self.say("live", calls=gauges, metrics=generate_latest(self._registry).decode())

    def between_ticks(self, at: float) -> float:
        """The first instant from ``at`` (time.monotonic) that is ``REPORT_TICK_PHASE`` into a media-clock
        tick (the clock's ticks are the multiples of ``media_tick_ms``); ``at`` itself with no tick."""
        tick = self.settings.media_tick_ms / 1000.0
        if tick <= 0.0:
            return at
        return at + (tick * REPORT_TICK_PHASE - at % tick) % tick

    def _report_end(self, call: str, fields: dict[str, Any]) -> None:
        """Say a call's ``ended`` between two ticks, after a live report with its last counts (the ends of a
        tick share one)."""
        self._ends.append((call, fields))
        if self._ends_flush is None:
            loop = asyncio.get_running_loop()
            self._ends_flush = loop.call_at(self.between_ticks(loop.time()), self.flush_ends)

    def flush_ends(self) -> None:
        """The pending ``ended`` reports, after a live report (so /metrics counts the calls as ended)."""
        if self._ends_flush is not None:
            self._ends_flush.cancel()
            self._ends_flush = None
        ends, self._ends = self._ends, []
        if not ends:
            return
        try:
            self.live()
        except Exception:
            log.exception("media worker: live report failed")
        finally:  # whatever failed above, the bridge hears that the calls' media is over
            for call, fields in ends:
                self.say("ended", call, **fields)

    # -- dispatch ----------------------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """One request: the quick ones here, the ones that wait (engine, socket) in a task of their own."""
        handler = _HANDLERS.get(msg.op)
        if handler is None:
            self.refuse(msg, "unknown_op", msg.op)
            return
        call = self.calls.get(msg.call)
        if msg.op == "open":
            if call is not None:
                self.refuse(msg, "duplicate_call")
                return
            call = self.calls[msg.call] = _Call()
        elif call is None:
            self.refuse(msg, "unknown_call")
            return
        self._spawn(handler(self, msg, call), msg)

    def _spawn(self, coro: Any, msg: Message) -> None:
        task = asyncio.create_task(self._guard(coro, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Any, msg: Message) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one request: answered and logged, the worker goes on
            log.exception("media worker: %s for call %s failed", msg.op, msg.call)
            self.refuse(msg, "internal_error", f"{type(exc).__name__}: {exc}")

    # -- requests ----------------------------------------------------------------------------------------

    async def open(self, msg: Message, call: _Call) -> None:
        persona = PersonaParams(**msg.fields.get("persona", {}))
        try:
            engine = await self.pool.open(persona, msg.call)
        except EngineFull as exc:
            self.calls.pop(msg.call, None)
            self.refuse(msg, "engine_full", str(exc))
            return
        except EngineError as exc:
            self.calls.pop(msg.call, None)
            self.refuse(msg, "engine_unavailable", str(exc))
            return
        except BaseException:
            self.calls.pop(msg.call, None)
            raise
        if call.dropped:  # the bridge gave the call up while this was opening
            await engine.close()
            self.calls.pop(msg.call, None)
            return
        call.engine = engine
        ready = engine.ready
        self.answer(msg, url=engine.url, seed=ready.seed, warnings=list(ready.warnings))

    async def bind(self, msg: Message, call: _Call) -> None:
        if call.engine is None:
            self.refuse(msg, "no_engine")
            return
        if call.media is None:
            fmt = msg.fields.get("inbound_format", self.settings.inbound_format)
            call.media = CallMedia(self.settings, call.engine, msg.call, inbound_format=fmt)
        try:
            host, port = await call.media.bind()
        except MediaBindError as exc:
            self.refuse(msg, "bind_failed", str(exc))
            return
        self.answer(msg, host=host, port=port)

    async def lock(self, msg: Message, call: _Call) -> None:
        if call.media is not None:
            call.media.lock_remote(str(msg.fields["host"]), int(msg.fields["port"]))

    async def run(self, msg: Message, call: _Call) -> None:
        media = call.media
        if media is None or call.run is not None:
            self.say("ended", msg.call, reason="not_bound" if media is None else "already_running")
            return
        call.run = asyncio.current_task()
        reason = "internal_error"
        try:
            reason = await media.run()
        finally:
            snapshot: dict[str, Any] = {}
            histograms: dict[str, Any] = {}
            try:
                snapshot = media.snapshot()
                histograms = {name: value.to_sparse() for name, value in media.stats.items()
                              if isinstance(value, Histogram)}
            finally:  # whatever failed above, the bridge hears that the call's media is over
                self._report_end(msg.call, {"reason": reason, "snapshot": snapshot, "histograms": histograms,
                                            "text": list(media.stats.engine_text)})

    async def pause(self, msg: Message, call: _Call) -> None:
        if call.media is not None:
            call.media.pause()

    async def resume(self, msg: Message, call: _Call) -> None:
        if call.media is not None:
            call.media.resume()

    async def event(self, msg: Message, call: _Call) -> None:
        if call.engine is None:
            self.refuse(msg, "no_engine")
            return
        try:
            await call.engine.send_event(str(msg.fields.get("name", "")), str(msg.fields.get("value", "")))
        except EngineError as exc:
            self.refuse(msg, "engine_gone", str(exc))
            return
        self.answer(msg)

    async def stop(self, msg: Message, call: _Call) -> None:
        if call.media is not None:
            await call.media.stop()
        self.answer(msg)

    async def close(self, msg: Message, call: _Call) -> None:
        call.dropped = True
        try:
            if call.media is not None:
                await call.media.stop()
            if call.run is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(call.run)
            if call.engine is not None:
                await call.engine.close()
        finally:
            if self.calls.get(msg.call) is call:
                del self.calls[msg.call]
        self.answer(msg)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(Message("close", cid), c) for cid, c in list(self.calls.items())),
                             return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        self.flush_ends()


_HANDLERS = {
    "open": Worker.open, "bind": Worker.bind, "lock": Worker.lock, "run": Worker.run,
    "pause": Worker.pause, "resume": Worker.resume, "event": Worker.event, "stop": Worker.stop,
    "close": Worker.close, "drop": Worker.close,
}


async def _live_loop(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        await asyncio.sleep(worker.between_ticks(now + LIVE_EVERY_S) - now)
        worker.live()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests from ``reader`` until it ends; answers and reports go to ``writer``."""
    hello = decode(await reader.readline())
    if hello.op != "hello":
        raise SystemExit(f"media worker: expected hello, got {hello.op!r}")
    settings = BridgeSettings.model_validate(hello.fields.get("settings", {}))
    logging.getLogger().setLevel(str(hello.fields.get("log_level", "INFO")))
    worker = Worker(settings, writer)
    freeze_startup_heap()
    log.info("media scheduling: %s", media_scheduling(settings.media_realtime_priority))
    async with worker.pool.running():
        live = asyncio.create_task(_live_loop(worker))
        try:
            while line := await reader.readline():
                try:
                    msg = decode(line)
                except WireError as exc:
                    log.warning("media worker: bad line skipped: %s", exc)
                    continue
                worker.handle(msg)
        finally:
            live.cancel()
            await worker.close_all()
            with contextlib.suppress(ConnectionError):
                await writer.drain()


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # The wire is the real stdout; anything printed goes to stderr (the bridge's journal), not the wire.
    wire = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wire)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    await serve(reader, writer)


def main() -> None:
    # The bridge ends its workers (by closing their stdin) after its own orderly shutdown has hung up the
    # calls; SIGTERM from systemd to the whole group, or Ctrl-C to a terminal's process group, must not
    # cut the media first. The bridge's death closes the pipe, so no worker outlives it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s")
    asyncio.run(_main())


if __name__ == "__main__":
    main()
