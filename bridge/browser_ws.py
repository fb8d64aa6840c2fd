"""Browser WebSocket: a second way in to the same engine sessions as phone calls.

``GET /ws/talk?persona=NAME`` (the bridge's HTTP server mounts :func:`browser_routes`):

* browser -> bridge: binary little-endian int16 mono PCM in chunks of any (even) size, 24 kHz unless a
  ``{"type":"hello","sample_rate":R}`` said otherwise (8..96 kHz is resampled with soxr);
  ``{"type":"close"}`` ends the talk.
* bridge -> browser: ``{"type":"ready",...}`` once, then binary int16 PCM at 24 kHz (80 ms per message) and
  JSON ``{"type":"text","seq","text"}``; ``{"type":"error","code","message"}`` then close on a fatal error.

Errors: bad JSON / unknown type / odd-sized binary -> ``error`` JSON, the chunk is dropped, the talk goes on;
a message over 1 MiB -> ``error too_big`` and close; a full engine -> ``error full`` and close; an unknown
persona -> ``error unknown_persona`` and close. The browser leaving closes the engine session.
``GET /talk`` serves a small test page (``bridge/static/talk.html``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soxr
from aiohttp import web

from bridge.config import Settings
from bridge.engine_client import EngineError, EngineFull, EngineRefused, EngineSession
from bridge.media.prometheus import MEDIA_METRICS
from engine.protocol import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Closed, Error, Lag, PersonaParams, Text

log = logging.getLogger(__name__)

MAX_BROWSER_MESSAGE = 1 << 20  # 1 MiB
MIN_RATE, MAX_RATE = 8_000, 96_000
STATIC_DIR = Path(__file__).with_name("static")

PersonaResolver = Callable[[str], PersonaParams | Awaitable[PersonaParams]]


def default_persona(name: str) -> PersonaParams:
    """Fallback resolver: the persona name with default parameters (no database needed)."""
    return PersonaParams(name=name or "default")


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


async def _resolve(resolver: PersonaResolver, name: str) -> PersonaParams:
    if inspect.iscoroutinefunction(resolver):
        result = await resolver(name)
    else:
        result = await asyncio.to_thread(resolver, name)  # a sync DB lookup must not block the loop
        if inspect.isawaitable(result):
            result = await result
    assert isinstance(result, PersonaParams)
    return result


async def _browser_to_engine(ws: web.WebSocketResponse, engine: EngineSession, framer: PcmFramer) -> None:
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
        elif msg.type == aiohttp.WSMsgType.TEXT:
            try:
                obj = json.loads(msg.data)
                kind = obj.get("type") if isinstance(obj, dict) else None
            except ValueError:
                await ws.send_json(_error("bad_message", "not JSON"))
                continue
            if kind == "hello":
                rate = obj.get("sample_rate", SAMPLE_RATE)
                try:
                    if not isinstance(rate, int) or isinstance(rate, bool):
                        raise ValueError(f"sample_rate must be an integer, got {rate!r}")
                    framer.set_rate(rate)
                except ValueError as exc:
                    await ws.send_json(_error("bad_message", str(exc)))
            elif kind == "close":
                return
            else:
                await ws.send_json(_error("bad_message", f"unknown message type {kind!r}"))
        elif msg.type == aiohttp.WSMsgType.ERROR and isinstance(ws.exception(), aiohttp.WebSocketError):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json(_error("too_big", f"message over {MAX_BROWSER_MESSAGE} bytes"))
            return
        else:  # the browser left
            return


async def _engine_to_browser(ws: web.WebSocketResponse, engine: EngineSession) -> None:
    async for msg in engine.messages():
        if isinstance(msg, AudioFrame):
            await ws.send_bytes(msg.pcm.astype("<i2").tobytes())
        elif isinstance(msg, Text):
            await ws.send_json({"type": "text", "seq": msg.seq, "text": msg.text})
        elif isinstance(msg, Lag):
            await ws.send_json({"type": "lag", "behind_frames": msg.behind_frames})
        elif isinstance(msg, Error):
            await ws.send_json(_error(msg.code, msg.message))
        elif isinstance(msg, Closed):
            await ws.send_json({"type": "closed", "reason": msg.reason})


def browser_routes(settings: Settings, resolve_persona: PersonaResolver | None = None) -> list[web.RouteDef]:
    resolver: PersonaResolver = resolve_persona or default_persona
    engine_url = settings.bridge.engine_url

    async def talk(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_BROWSER_MESSAGE, heartbeat=30.0, timeout=2.0)
        await ws.prepare(request)
        name = request.query.get("persona", "default")
        try:
            persona = await _resolve(resolver, name)
        except Exception as exc:  # LookupError from the DB layer, or anything it raises
            await ws.send_json(_error("unknown_persona", f"persona {name!r}: {exc}"))
            await ws.close()
            return ws
        try:
            engine = await EngineSession.open(engine_url, persona, call_id=f"browser-{id(ws):x}")
        except EngineFull as exc:
            await ws.send_json(_error("full", exc.message))
            await ws.close()
            return ws
        except EngineRefused as exc:
            await ws.send_json(_error(exc.code, exc.message))
            await ws.close()
            return ws
        except EngineError as exc:
            await ws.send_json(_error("engine_unavailable", str(exc)))
            await ws.close()
            return ws
        MEDIA_METRICS.browser_talk_started()
        try:
            await ws.send_json({"type": "ready", "persona": persona.name, "sample_rate": SAMPLE_RATE,
                                "frame_samples": FRAME_SAMPLES})
            await _relay(ws, engine)
        except Exception as exc:  # a talk never takes the bridge down
            log.warning("browser talk ended with %s: %s", type(exc).__name__, exc)
        finally:
            MEDIA_METRICS.browser_talk_ended()
            await engine.close()
            await ws.close()
        return ws

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "talk.html")

    return [web.get("/ws/talk", talk), web.get("/talk", page)]


async def _relay(ws: web.WebSocketResponse, engine: EngineSession) -> None:
    """Both directions in one TaskGroup; whichever ends first (browser gone, engine closed) ends the other."""
    framer = PcmFramer()
    tasks: list[asyncio.Task[None]] = []

    async def run(coro: Awaitable[None]) -> None:
        try:
            await coro
        except EngineError as exc:
            log.info("browser talk: engine side ended: %s", exc)
        finally:
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async with asyncio.TaskGroup() as tg:
        tasks.append(tg.create_task(run(_browser_to_engine(ws, engine, framer))))
        tasks.append(tg.create_task(run(_engine_to_browser(ws, engine))))
