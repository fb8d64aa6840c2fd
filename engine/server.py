"""aziza-engine: the aiohttp server around the frame scheduler.

Routes: ``GET /session`` (one WebSocket per session, protocol in ``engine/protocol.py``), ``GET /mux`` (many
sessions over one WebSocket, each a channel with the same rules: ``engine/mux.py``), ``GET /health`` (JSON),
``GET /metrics`` (Prometheus text, this app's own registry).

Session rules (decided here, relied on by clients):
* the first message must be ``open`` (anything else: ``error protocol`` or ``bad_message``, then close);
* a full house answers ``error full`` and closes, the slot table untouched;
* a bad binary frame answers ``error bad_frame`` and is dropped; the session continues (one corrupt frame
  must not end a phone call). Garbage text answers ``error bad_message`` and the session continues too;
* ``close`` answers ``closed{client_close}``; a dropped socket (even mid-frame) frees the slot at once;
* no frames for ``idle_timeout_s`` while not paused: ``error idle_timeout``, ``closed{idle_timeout}``;
* a backend failure for the slot: ``error internal``, ``closed{internal}``; the other sessions go on;
* engine shutdown (SIGTERM): ``closed{shutdown}`` to every session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from engine.assets import DEFAULT_DATA_DIR, AssetStore
from engine.backend import BatchBackend
from engine.config import EngineConfigError, EngineSettings, config_warnings, get_engine_config
from engine.metrics import EngineMetrics
from engine.mux import Mux, MuxChannel
from engine.protocol import (
    MUX_WS_MAX_MSG_SIZE,
    Close,
    Closed,
    Error,
    Event,
    Gap,
    Lag,
    Open,
    Pause,
    ProtocolError,
    Ready,
    Resume,
    Text,
    clip_for_log,
    decode_audio,
    decode_client_control,
    encode_audio,
    encode_control,
    float_to_int16,
    int16_to_float,
)
from engine.scheduler import Delivery, FrameScheduler, OpenFailed, SlotLease, SlotsFull

log = logging.getLogger(__name__)

# Output frames buffered per session when its client does not read; beyond that audio is dropped (counted).
OUTBOX_AUDIO_LIMIT = 32
MAX_MESSAGE_BYTES = 1 << 16  # an audio frame is 3845 bytes; control messages are small

# A session's socket: a WebSocket of its own (/session) or a channel of a multiplexed one (/mux).
SessionSocket = web.WebSocketResponse | MuxChannel

SCHEDULER_KEY = web.AppKey("scheduler", FrameScheduler)
SETTINGS_KEY = web.AppKey("settings", EngineSettings)


def build_backend(settings: EngineSettings, data_dir: Path | None = None) -> BatchBackend:
    if settings.backend == "echo":
        from engine.echo import EchoBackend

        return EchoBackend(settings.num_slots, delay_frames=settings.echo_delay_frames)
    if settings.backend == "moshi":
        from engine.moshi.backend import build_backend as build_moshi  # heavy: import only when asked

        backend: BatchBackend = build_moshi(settings, AssetStore(data_dir or DEFAULT_DATA_DIR))
        return backend
    raise ValueError(f"unknown engine backend {settings.backend!r}")


@dataclass(frozen=True)
class _End:
    """Ends a session's writer: optional error to send first, then ``closed{reason}`` (None: just close)."""

    reason: str | None
    error: Error | None = None


class _Session:
    """One WebSocket session. All sends go through ``outbox`` so only the writer task touches the socket."""

    def __init__(
        self, ws: SessionSocket, metrics: EngineMetrics, release: Callable[[], Awaitable[None]]
    ) -> None:
        self.ws = ws
        self._release = release
        self.metrics = metrics
        self.id = uuid.uuid4().hex
        self.outbox: asyncio.Queue[bytes | str | _End] = asyncio.Queue()
        self._audio_queued = 0
        self.end_reason = "disconnect"

    # SessionSink
    def on_output(self, delivery: Delivery) -> None:
        if self._audio_queued >= OUTBOX_AUDIO_LIMIT:
            self.metrics.output_dropped.inc()
            return
        self._audio_queued += 1
        self.outbox.put_nowait(encode_audio(delivery.seq, float_to_int16(delivery.output.pcm)))
        if delivery.output.text:
            self.outbox.put_nowait(encode_control(Text(seq=delivery.seq, text=delivery.output.text)))

    def on_failed(self, message: str) -> None:
        self.end(_End("internal", Error("internal", message)))

    def send(self, msg: Error | Lag | Gap | Closed) -> None:
        self.outbox.put_nowait(encode_control(msg))

    def end(self, end: _End) -> None:
        self.outbox.put_nowait(end)

    async def writer(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, _End):
                    # The slot is free before the client hears ``closed``: it may reopen at once.
                    await self._release()
                    if item.reason is not None:
                        self.end_reason = item.reason
                        if item.error is not None:
                            await self.ws.send_str(encode_control(item.error))
                        await self.ws.send_str(encode_control(Closed(reason=item.reason)))
                    return
                if isinstance(item, bytes):
                    self._audio_queued -= 1
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            log.debug("session %s: send failed: %s", self.id, exc)
            self.end_reason = "send_failed"
            # A channel of a mux that is still open closes without a word to the client (a session's own
            # WebSocket sends its close frame): say ``closed`` on it, or the call talks to nobody and never
            # knows. On a broken socket this send fails too, and the socket's end tells the client instead.
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                if not self.ws.closed:
                    await self.ws.send_str(encode_control(Closed(reason=self.end_reason)))
        finally:
            # Free the slot first: the close handshake may wait on a client that no longer reads.
            await self._release()
            await self.ws.close()  # also wakes the reader


class _LiveSessions:
    """The open sessions of one app (shutdown tells each of them; /health counts them)."""

    def __init__(self) -> None:
        self.live: set[_Session] = set()
        self.muxes: set[Mux] = set()  # the open /mux sockets


SESSIONS_KEY = web.AppKey("sessions", _LiveSessions)


async def _refuse(ws: SessionSocket, code: str, message: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(encode_control(Error(code, message)))
    await ws.close()


async def _read_open(ws: SessionSocket, wait_s: float) -> Open | Error | None:
    """The first message: an Open, an Error to send back, or None when the client left."""
    try:
        msg = await ws.receive(timeout=wait_s)
    except TimeoutError:
        return Error("idle_timeout", f"no open within {wait_s:g} s")
    if msg.type == aiohttp.WSMsgType.BINARY:
        return Error("protocol", "audio before open")
    if msg.type != aiohttp.WSMsgType.TEXT:
        return None
    try:
        first = decode_client_control(msg.data)
    except ProtocolError as exc:
        return Error(exc.code, exc.message)
    if not isinstance(first, Open):
        return Error("protocol", f"the first message must be open, got {first.type!r}")
    return first


async def session_handler(request: web.Request) -> web.WebSocketResponse:
    # timeout: how long a close waits for the peer's close reply; no deflate: PCM does not compress.
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=None, timeout=2.0, compress=False)
    await ws.prepare(request)
    await _serve_session(ws, request.app)
    return ws


async def mux_handler(request: web.Request) -> web.WebSocketResponse:
    """Many sessions over one WebSocket (engine/mux.py): each channel the client opens is served as a
    session of its own, by the same code as ``/session``; the socket's end ends them all."""
    ws = web.WebSocketResponse(max_msg_size=MUX_WS_MAX_MSG_SIZE, heartbeat=None, timeout=2.0,
                               compress=False)
    await ws.prepare(request)
    app = request.app
    try:
        async with asyncio.TaskGroup() as tg:

            def serve(channel: MuxChannel) -> None:
                tg.create_task(_serve_session(channel, app), name=f"engine-mux-channel-{channel.channel}")

            metrics = app[SCHEDULER_KEY].metrics

            def bad(binary: bool) -> None:
                (metrics.bad_frames if binary else metrics.bad_messages).inc()

            mux = Mux(ws, on_new=serve, on_bad=bad)
            app[SESSIONS_KEY].muxes.add(mux)
            try:
                await mux.run()
            finally:
                app[SESSIONS_KEY].muxes.discard(mux)
    except Exception:  # (each session guards itself; this is the mux's own bug: its sessions end with it)
        log.exception("engine mux failed")
    finally:
        await ws.close()
    return ws


async def _serve_session(ws: SessionSocket, app: web.Application) -> None:
    """One session on ``ws`` (a WebSocket of its own, or a mux channel), from ``open`` to its end."""
    scheduler = app[SCHEDULER_KEY]
    settings = app[SETTINGS_KEY]
    metrics = scheduler.metrics
    first = await _read_open(ws, settings.idle_timeout_s)
    if first is None:
        return
    if isinstance(first, Error):
        metrics.sessions_refused.labels(first.code).inc()
        await _refuse(ws, first.code, first.message)
        return

    lease: SlotLease | None = None

    async def release() -> None:
        if lease is not None:
            await scheduler.close_session(lease)

    session = _Session(ws, metrics, release)
    seed = first.seed if first.seed is not None else secrets.randbits(63)
    try:
        lease = await scheduler.open_session(first.persona, session, seed)
    except SlotsFull as exc:
        metrics.sessions_refused.labels("full").inc()
        await _refuse(ws, "full", str(exc))
        return
    except OpenFailed as exc:
        metrics.sessions_refused.labels(exc.code).inc()
        await _refuse(ws, exc.code, exc.message)
        return
    except Exception as exc:  # e.g. the worker is gone during shutdown: refuse, never crash the server
        log.exception("open failed")
        metrics.sessions_refused.labels("internal").inc()
        await _refuse(ws, "internal", f"open failed: {exc}")
        return

    sessions = app[SESSIONS_KEY].live
    sessions.add(session)
    metrics.sessions_opened.inc()
    warnings = tuple(scheduler.start_warnings.get(lease.slot, ()))
    log.info("session %s open: slot %d gen %d persona %s call %s seed %d%s", session.id, lease.slot,
             lease.generation, clip_for_log(first.persona.name), clip_for_log(first.call_id), seed,
             "".join(f"; warning: {w}" for w in warnings))
    try:
        await ws.send_str(encode_control(Ready(session.id, lease.slot, lease.generation, seed=seed,
                                               warnings=warnings)))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(session.writer(), name=f"engine-writer-{session.id}")
            tg.create_task(_reader(session, scheduler, lease, settings),
                           name=f"engine-reader-{session.id}")
    except Exception:  # one session's bug must never reach the other sessions or the server
        log.exception("session %s failed", session.id)
    finally:
        sessions.discard(session)
        await scheduler.close_session(lease)
        await ws.close()
        metrics.sessions_closed.labels(session.end_reason).inc()
        log.info("session %s closed (%s), slot %d free", session.id, session.end_reason, lease.slot)


async def _reader(
    session: _Session, scheduler: FrameScheduler, lease: SlotLease, settings: EngineSettings
) -> None:
    ws, metrics = session.ws, session.metrics
    idle_timeout_s, pause_max_s = settings.idle_timeout_s, settings.pause_max_s
    paused = False
    last_frame = time.monotonic()  # or the moment of the pause, while paused
    while True:
        limit = pause_max_s if paused else idle_timeout_s
        try:
            msg = await ws.receive(timeout=max(0.0, limit - (time.monotonic() - last_frame)))
        except TimeoutError:
            if paused:
                session.end(_End("pause_timeout", Error("pause_timeout", f"paused for {pause_max_s:g} s")))
            else:
                session.end(_End("idle_timeout", Error("idle_timeout", f"no audio for {idle_timeout_s:g} s")))
            return
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                frame = decode_audio(msg.data)
            except ProtocolError as exc:
                metrics.bad_frames.inc()
                session.send(Error(exc.code, exc.message))
                continue
            if paused:
                continue  # a hold consumes nothing; frames sent during it do not end the pause
            last_frame = time.monotonic()
            try:
                pushed = scheduler.push(lease, int16_to_float(frame.pcm), frame.seq)
            except KeyError:
                continue  # the backend failed this slot; the writer is ending the session
            for gap in pushed.gaps:
                metrics.input_gaps.labels(gap.reason).inc(gap.count)
                session.send(gap)
            if pushed.lag_frames is not None:
                log.warning("session %s is %d frames behind (%d dropped so far)", session.id,
                            pushed.lag_frames, scheduler.planner.dropped(lease))
                session.send(Lag(pushed.lag_frames))
        elif msg.type == aiohttp.WSMsgType.TEXT:
            try:
                ctl = decode_client_control(msg.data)
            except ProtocolError as exc:
                metrics.bad_messages.inc()
                session.send(Error(exc.code, exc.message))
                continue
            if isinstance(ctl, Close):
                session.end(_End("client_close"))
                return
            if isinstance(ctl, Pause | Resume):
                paused = isinstance(ctl, Pause)
                last_frame = time.monotonic()
                with contextlib.suppress(KeyError):
                    scheduler.set_paused(lease, paused)
            elif isinstance(ctl, Event):
                try:
                    if not await scheduler.send_event(lease, ctl.name, ctl.value):
                        log.info("session %s event %s=%s (backend takes no events)", session.id,
                                 clip_for_log(ctl.name, 32), clip_for_log(ctl.value, 32))
                except Exception as exc:
                    log.warning("session %s: backend on_event failed: %s", session.id,
                                clip_for_log(str(exc), 200))
            else:  # a second open
                session.send(Error("protocol", f"unexpected {ctl.type!r} in an open session"))
        elif msg.type == aiohttp.WSMsgType.ERROR and isinstance(ws.exception(), aiohttp.WebSocketError):
            # e.g. a message over MAX_MESSAGE_BYTES: aiohttp is already closing the socket (1009)
            metrics.bad_frames.inc()
            session.end(_End("bad_frame", Error("bad_frame", f"WebSocket error: {ws.exception()}")))
            return
        else:  # CLOSE / CLOSING / CLOSED / ERROR: the client is gone (possibly mid-frame)
            session.end(_End(None))
            return


async def health_handler(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER_KEY]
    backend_health = getattr(scheduler.backend, "health", None)
    return web.json_response({
        "status": "ok",
        "backend": scheduler.backend.name,
        "slots": {"total": scheduler.table.total, "busy": scheduler.busy, "free": scheduler.table.free},
        **({"model": backend_health()} if backend_health is not None else {}),
        "sessions": len(request.app[SESSIONS_KEY].live),
        "ticks": scheduler.ticks,
        "lagging_sessions": scheduler.lagging,
        "batch_window_ms": scheduler.planner.window_s * 1e3,
    })


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[SCHEDULER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(settings: EngineSettings, backend: BatchBackend | None = None,
               data_dir: Path | None = None) -> web.Application:
    """The engine's aiohttp app. ``backend`` defaults to the one ``settings.backend`` names; persona assets
    (voice prompts, adapters) are looked up under ``data_dir``."""
    app = web.Application()
    inline = backend is None and settings.backend == "echo"
    backend = backend if backend is not None else build_backend(settings, data_dir)
    app[SETTINGS_KEY] = settings
    app[SESSIONS_KEY] = _LiveSessions()

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        scheduler = FrameScheduler(backend, batch_window_s=settings.batch_window_ms / 1000.0,
                                   metrics=EngineMetrics(backend.num_slots), inline_backend=inline,
                                   max_gap_fill=settings.max_gap_fill_frames)
        app[SCHEDULER_KEY] = scheduler
        await scheduler.start()
        yield
        await scheduler.stop()

    async def on_shutdown(app: web.Application) -> None:
        # Tell every session why it ends; the handlers then free their slots.
        live = app[SESSIONS_KEY]
        for session in list(live.live):
            session.end(_End("shutdown"))
        if live.muxes:
            # A mux socket stays open while its client holds it: once its sessions have sent ``closed``
            # (each leaves the live set after), close it, rather than wait out the shutdown timeout.
            for _ in range(100):
                if not live.live:
                    break
                await asyncio.sleep(0.01)
            for mux in list(live.muxes):
                with contextlib.suppress(Exception):
                    await mux.ws.close()

    app.cleanup_ctx.append(scheduler_ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/session", session_handler)
    app.router.add_get("/mux", mux_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app


@contextlib.asynccontextmanager
async def run_engine(settings: EngineSettings, backend: BatchBackend | None = None,
                     data_dir: Path | None = None) -> AsyncIterator[str]:
    """Run an engine in this event loop; yields its session URL (``ws://host:port/session`` with the real
    port when ``settings.port`` is 0, or ``unix://PATH``). Tests, demos and benchmarks use it."""
    app = create_app(settings, backend, data_dir)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site: web.BaseSite
        if settings.unix_socket:
            site = web.UnixSite(runner, settings.unix_socket)
            await site.start()
            yield f"unix://{settings.unix_socket}"
        else:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            host, port = runner.addresses[0][:2]
            yield f"ws://{host}:{port}/session"
    finally:
        await runner.cleanup()


def _version() -> str:
    try:
        return metadata.version("aziza")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aziza-engine", description="Aziza batched speech-model engine; flags "
                                "override the [engine] settings (AZIZA_ENGINE__* / aziza.toml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--unix-socket")
    p.add_argument("--backend", choices=["echo", "moshi"])
    p.add_argument("--slots", type=int, dest="num_slots")
    p.add_argument("--echo-delay-frames", type=int)
    p.add_argument("--batch-window-ms", type=float)
    p.add_argument("--idle-timeout-s", type=float)
    p.add_argument("--model", help="moshi backend: weights directory or cached Hugging Face repo id")
    p.add_argument("--device", help="moshi backend: auto | cpu | cuda | cuda:N")
    p.add_argument("--instance", type=int, help="aziza-engine@N: listen on port + N, use GPU N")
    p.add_argument("--version", action="version", version=f"aziza-engine {_version()}")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()  # --help/--version exit here, before any configuration is read
    args = parser.parse_args(argv)
    try:
        base = get_engine_config()
    except EngineConfigError as exc:
        parser.error(str(exc))
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = EngineSettings.model_validate({**base.engine.model_dump(), **overrides}).for_instance(
            os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValidationError as exc:
        parser.error(_errors(exc))
    logging.basicConfig(level=base.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in config_warnings():
        log.warning("configuration: %s", warning)
    try:
        app = create_app(settings, data_dir=base.data_dir)
    except Exception as exc:  # no weights, bad model dir...: one clear line, not a traceback
        raise SystemExit(f"aziza-engine: cannot start the {settings.backend} backend: {exc}") from None
    log.info("aziza-engine: backend %s, %d slots, window %.0f ms", settings.backend, settings.num_slots,
             settings.batch_window_ms)
    # Move the startup heap (torch, numpy, aiohttp...) out of the collector's reach: full collections
    # walking it would stall the tick loop for tens of ms, which every call hears.
    gc.collect()
    gc.freeze()
    # run_app turns SIGTERM/SIGINT into a graceful shutdown: on_shutdown tells sessions, cleanup stops ticks.
    if settings.unix_socket:
        web.run_app(app, path=settings.unix_socket, shutdown_timeout=5.0, print=None)
    else:
        web.run_app(app, host=settings.host, port=settings.port, shutdown_timeout=5.0, print=None)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())


if __name__ == "__main__":
    main()
