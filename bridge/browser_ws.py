"""Browser WebSocket: a second way in to the same engine sessions as phone calls, admitted like one.

``GET /ws/talk?token=T`` (the bridge's HTTP server mounts :func:`browser_routes`), where ``T`` comes from
``aziza-admin talk-link --persona NAME [--ttl 10m]`` (``bridge/talk_token.py``). Admission, in order:

* the page's ``Origin`` must be allowed (the bridge's own origin, ``bridge.public_url``'s,
  ``bridge.talk_origins``), else HTTP 403 and no WebSocket;
* then, on the WebSocket: the token must be signed with the current control token's key and unexpired
  (``bad_token``, ``expired``); one live talk per link (``link_in_use``); the persona it names must exist in
  PostgreSQL (``unknown_persona``; ``unavailable`` while the database cannot say); a capacity lease from
  the same gate as phone calls (``full``; ``capacity_unavailable`` while Redis cannot say); an engine
  session (``full``, ``engine_unavailable``). A refused talk is recorded as a refused call.

A talk is a call: ``browser-<hex>`` in ``calls live`` and the call records (caller ``browser``, no DID),
its lease renewed and re-registered with the phone calls', released when it ends.

* browser -> bridge: binary little-endian int16 mono PCM in chunks of any (even) size, 24 kHz unless a
  ``{"type":"hello","sample_rate":R}`` said otherwise (8..96 kHz is resampled with soxr);
  ``{"type":"close"}`` ends the talk.
* bridge -> browser: ``{"type":"ready",...}`` once, then binary int16 PCM at 24 kHz (80 ms per message) and
  JSON ``{"type":"text","seq","text"}``; ``{"type":"error","code","message"}`` then close on a fatal error.

Bad JSON (any depth: ``bridge/safe_json.py``), an unknown type or odd-sized binary -> an ``error`` JSON, the
chunk is dropped, the talk goes on; a message over 1 MiB -> ``error too_big`` and close. The browser leaving
closes the engine session. ``GET /talk`` serves the page (``bridge/static/talk.html``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soxr
from aiohttp import web

from bridge.call_deps import CallInfo, CallSink, CapacityGate
from bridge.config import Settings
from bridge.engine_client import EngineError, EngineFull, EngineRefused, EngineSession, answer_limit_frames
from bridge.http_guard import check_origin, talk_origins
from bridge.media.prometheus import MEDIA_METRICS
from bridge.safe_json import BadJson, parse_json_object
from bridge.talk_token import BadTalkToken, TalkGrant, verify
from engine.protocol import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioFrame,
    Closed,
    Error,
    Lag,
    PersonaParams,
    Text,
)

log = logging.getLogger(__name__)

MAX_BROWSER_MESSAGE = 1 << 20  # 1 MiB
MAX_CONTROL_JSON = 4096  # hello / close: a few dozen bytes
MIN_RATE, MAX_RATE = 8_000, 96_000
STATIC_DIR = Path(__file__).with_name("static")

# Persona name -> what the engine gets; raises LookupError for an unknown persona (anything else: the
# lookup itself failed).
PersonaLookup = Callable[[str], Awaitable[PersonaParams]]


class PersonaUnknown(LookupError):
    pass


@dataclass
class TalkDeps:
    """What admitting a talk needs; production wiring builds it from the appliance state."""

    personas: PersonaLookup
    capacity: CapacityGate
    sink: CallSink
    talk_key: Callable[[], bytes | None]  # None: no control token, so no link can be checked
    live_links: set[str] = field(default_factory=set)  # nonces of links in use (one talk per link)
    # Opens the talk's engine session where phone calls go (the engine pool); None: bridge.engine_url.
    open_engine: Callable[[PersonaParams, str], Awaitable[EngineSession]] | None = None


class PcmFramer:
    """Sans-IO: int16 LE byte chunks of any even size (at ``rate``) in, 1920-sample 24 kHz frames out."""

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self._pending: np.ndarray = np.zeros(0, dtype=np.int16)
        self.rate = SAMPLE_RATE
        self._resampler: soxr.ResampleStream | None = None
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ValueError(f"sample_rate must be {MIN_RATE}..{MAX_RATE} Hz, got {rate}")
        self.rate = rate
        self._resampler = (
            None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16")
        )

    def feed(self, chunk: bytes) -> list[np.ndarray]:
        if len(chunk) % 2:
            raise ValueError(f"PCM chunk of {len(chunk)} bytes: int16 samples need an even byte count")
        samples: np.ndarray = np.frombuffer(chunk, dtype="<i2").astype(np.int16)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._pending = np.concatenate([self._pending, samples])
        frames = []
        while len(self._pending) >= FRAME_SAMPLES:
            frames.append(self._pending[:FRAME_SAMPLES].copy())
            self._pending = self._pending[FRAME_SAMPLES:]
        return frames


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


class _Refused(Exception):
    def __init__(self, code: str, message: str, record: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.record = record  # the refusal reason for the call record; None: not a call yet


@dataclass
class _TalkStats:
    # The engine session's ``unanswered`` frames that end the talk as engine_stalled (as a phone call's).
    unanswered_limit: int
    frames_in: int = 0
    frames_out: int = 0
    texts: list[str] = field(default_factory=list)


async def _browser_to_engine(
    ws: web.WebSocketResponse, engine: EngineSession, framer: PcmFramer, stats: _TalkStats
) -> str:
    """Browser -> engine until the browser closes or leaves; returns why the talk ended."""
    while True:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                frames = framer.feed(msg.data)
            except ValueError as exc:
                await ws.send_json(_error("bad_frame", str(exc)))
                continue
            for frame in frames:
                await engine.send_frame(frame)
                stats.frames_in += 1
                if engine.unanswered >= stats.unanswered_limit:
                    await ws.send_json(_error("engine_stalled", "the engine stopped answering"))
                    return "engine_stalled"
        elif msg.type == aiohttp.WSMsgType.TEXT:
            try:
                obj = parse_json_object(msg.data, max_bytes=MAX_CONTROL_JSON)
            except BadJson as exc:
                await ws.send_json(_error("bad_message", str(exc)))
                continue
            kind = obj.get("type")
            if kind == "hello":
                rate = obj.get("sample_rate", SAMPLE_RATE)
                try:
                    if not isinstance(rate, int) or isinstance(rate, bool):
                        raise ValueError(f"sample_rate must be an integer, got {str(rate)[:40]!r}")
                    framer.set_rate(rate)
                except ValueError as exc:
                    await ws.send_json(_error("bad_message", str(exc)))
            elif kind == "close":
                return "browser_close"
            else:
                await ws.send_json(_error("bad_message", f"unknown message type {str(kind)[:40]!r}"))
        elif msg.type == aiohttp.WSMsgType.ERROR and isinstance(ws.exception(), aiohttp.WebSocketError):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json(_error("too_big", f"message over {MAX_BROWSER_MESSAGE} bytes"))
            return "too_big"
        else:  # the browser left
            return "browser_gone"


async def _engine_to_browser(ws: web.WebSocketResponse, engine: EngineSession, stats: _TalkStats) -> str:
    async for msg in engine.messages():
        if isinstance(msg, AudioFrame):
            await ws.send_bytes(msg.pcm.astype("<i2").tobytes())
            stats.frames_out += 1
        elif isinstance(msg, Text):
            stats.texts.append(msg.text)
            await ws.send_json({"type": "text", "seq": msg.seq, "text": msg.text})
        elif isinstance(msg, Lag):
            await ws.send_json({"type": "lag", "behind_frames": msg.behind_frames})
        elif isinstance(msg, Error):
            await ws.send_json(_error(msg.code, msg.message))
        elif isinstance(msg, Closed):
            await ws.send_json({"type": "closed", "reason": msg.reason})
            return f"engine:{msg.reason}"
    return "engine_gone"


def browser_routes(settings: Settings, deps: TalkDeps) -> list[web.RouteDef]:
    b = settings.bridge
    engine_url = b.engine_url

    async def talk(request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else b.http_port
        refusal = check_origin(request.headers, talk_origins(b.http_host, port, b.public_url, b.talk_origins))
        if refusal is not None:
            return web.json_response({"error": refusal.message}, status=refusal.status)
        ws = web.WebSocketResponse(max_msg_size=MAX_BROWSER_MESSAGE, heartbeat=30.0, timeout=2.0)
        await ws.prepare(request)
        call_id = f"browser-{uuid.uuid4().hex[:16]}"
        try:
            await _talk(ws, request.query.get("token", ""), call_id, engine_url, deps,
                        answer_limit_frames(b.engine_answer_timeout_s))
        except Exception as exc:  # a talk never takes the bridge down
            log.warning("browser talk %s ended with %s: %s", call_id, type(exc).__name__, exc)
        finally:
            await ws.close()
        return ws

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "talk.html")

    return [web.get("/ws/talk", talk), web.get("/talk", page)]


async def _admit(token: str, deps: TalkDeps) -> tuple[TalkGrant, PersonaParams]:
    key = deps.talk_key()
    if key is None:
        raise _Refused("unavailable", "talk links are disabled: the bridge has no control token")
    try:
        grant = verify(key, token)
    except BadTalkToken as exc:
        raise _Refused(exc.code, str(exc)) from None
    if grant.nonce in deps.live_links:
        raise _Refused("link_in_use", "this talk link is already in a talk (one talk per link)")
    try:
        persona = await deps.personas(grant.persona)
    except LookupError:
        raise _Refused("unknown_persona", f"no persona {grant.persona!r}") from None
    except Exception as exc:  # the database cannot answer: nothing has started, nothing is lost
        log.warning("talk persona %r lookup failed: %s", grant.persona, exc)
        raise _Refused("unavailable", "personas cannot be read right now; try again") from None
    return grant, persona


async def _talk(
    ws: web.WebSocketResponse, token: str, call_id: str, engine_url: str, deps: TalkDeps, answer_limit: int
) -> None:
    try:
        grant, persona = await _admit(token, deps)
    except _Refused as refused:
        await ws.send_json(_error(refused.code, refused.message))
        return
    info = CallInfo(call_id, "", "browser", persona.name, "WebSocket/talk", persona.language, "browser")
    deps.live_links.add(grant.nonce)
    lease: object | None = None
    engine: EngineSession | None = None
    try:
        try:
            lease, engine = await _take_slot(info, persona, engine_url, deps)
        except _Refused as refused:
            if refused.record is not None:
                deps.sink.refused(info, refused.record)
            await ws.send_json(_error(refused.code, refused.message))
            return
        await _run_talk(ws, engine, info, persona, deps.sink, answer_limit)
    finally:
        deps.live_links.discard(grant.nonce)
        if engine is not None:
            await engine.close()
        if lease is not None:
            await deps.capacity.release(lease)


async def _take_slot(
    info: CallInfo, persona: PersonaParams, engine_url: str, deps: TalkDeps
) -> tuple[object, EngineSession]:
    """A capacity lease exactly as a phone call takes one, then an engine session."""
    try:
        lease = await deps.capacity.acquire(info.call_id)
    except Exception as exc:  # Redis cannot say: refuse, as a phone call is refused
        log.warning("talk %s: capacity check failed: %s", info.call_id, exc)
        raise _Refused("capacity_unavailable", "capacity cannot be checked right now",
                       "capacity_unavailable") from None
    if lease is None:
        raise _Refused("full", "every slot is taken; try again later", "capacity_full")
    try:
        if deps.open_engine is not None:
            engine = await deps.open_engine(persona, info.call_id)
        else:
            engine = await EngineSession.open(engine_url, persona, call_id=info.call_id)
    except BaseException as exc:
        await deps.capacity.release(lease)
        if isinstance(exc, EngineError):  # the detail (engine address, its words) is the operator's
            log.warning("talk %s: engine refused or unavailable: %s", info.call_id, exc)
        if isinstance(exc, EngineFull):
            raise _Refused("full", "every engine slot is taken; try again later", "engine_full") from None
        if isinstance(exc, EngineRefused):
            raise _Refused(exc.code, "the engine refused the session", "engine_unavailable") from None
        if isinstance(exc, EngineError):
            raise _Refused("engine_unavailable", "the engine is unavailable", "engine_unavailable") from None
        raise
    return lease, engine


async def _run_talk(
    ws: web.WebSocketResponse, engine: EngineSession, info: CallInfo, persona: PersonaParams, sink: CallSink,
    answer_limit: int,
) -> None:
    sink.started(info)
    MEDIA_METRICS.browser_talk_started()
    MEDIA_METRICS.session_started(persona.name, persona.language, "browser")
    started = time.monotonic()
    stats = _TalkStats(unanswered_limit=answer_limit)
    cause = "error"
    try:
        await ws.send_json({"type": "ready", "persona": persona.name, "sample_rate": SAMPLE_RATE,
                            "frame_samples": FRAME_SAMPLES, "call_id": info.call_id})
        sink.answered(info.call_id)
        cause = await _relay(ws, engine, stats)
    except Exception as exc:
        cause = f"internal_error:{type(exc).__name__}"
        raise
    finally:
        summary = {"channel": "browser", "duration_s": round(time.monotonic() - started, 3),
                   "frames_in": stats.frames_in, "frames_out": stats.frames_out}
        sink.ended(info.call_id, cause, summary, "".join(stats.texts), "")
        MEDIA_METRICS.browser_talk_ended()


async def _relay(ws: web.WebSocketResponse, engine: EngineSession, stats: _TalkStats) -> str:
    """Both directions in one TaskGroup; whichever ends first (browser gone, engine closed) ends the other.
    Returns why the talk ended."""
    framer = PcmFramer()
    tasks: list[asyncio.Task[None]] = []
    reasons: list[str] = []

    async def run(coro: Awaitable[str]) -> None:
        try:
            reasons.append(await coro)
        except EngineError as exc:
            log.info("browser talk: engine side ended: %s", exc)
            reasons.append("engine_gone")
        finally:
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async with asyncio.TaskGroup() as tg:
        tasks.append(tg.create_task(run(_browser_to_engine(ws, engine, framer, stats))))
        tasks.append(tg.create_task(run(_engine_to_browser(ws, engine, stats))))
    return reasons[0] if reasons else "ended"
