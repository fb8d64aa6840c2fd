"""Shared helpers for the media I/O tests: a real in-process echo engine, a call wired to a SimLeg, and a
scriptable fake engine for failure cases. Real sockets everywhere (TCP/Unix WebSocket, UDP on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import pytest
from aiohttp import web

from bridge.config import BridgeSettings
from bridge.engine_client import EngineMux, EngineSession
from bridge.media.assets import load_speech_8k
from bridge.media.call_media import CallMedia
from bridge.media.simleg import SimLeg
from engine.config import EngineSettings
from engine.server import run_engine
from tests.http_server import serve_on_loopback

FakeEngineHandler = Callable[[web.WebSocketResponse], Awaitable[None]]


@pytest.fixture
async def engine_url() -> AsyncIterator[str]:
    """A real aziza-engine (echo backend, 4 slots) on an ephemeral loopback port."""
    async with run_engine(EngineSettings(port=0, num_slots=4, batch_window_ms=5)) as url:
        yield url


@pytest.fixture
def speech_8k() -> np.ndarray:
    return load_speech_8k()


def bridge_settings(**overrides: object) -> BridgeSettings:
    base: dict[str, object] = {"rtp_port_min": 30000, "rtp_port_max": 39999, "media_timeout_s": 5.0}
    base.update(overrides)
    return BridgeSettings.model_validate(base)


@dataclass
class Call:
    media: CallMedia
    leg: SimLeg
    engine: EngineSession
    run_task: asyncio.Task[str]


@contextlib.asynccontextmanager
async def wired_call(
    engine_url: str, audio_8k: np.ndarray, *, settings: BridgeSettings | None = None, mux: bool = False,
    **leg_kwargs: object
) -> AsyncIterator[Call]:
    """An engine session + CallMedia + SimLeg locked onto each other, media running; all closed after.
    ``mux``: the session is a channel of the engine's /mux (as the bridge opens them), else a WebSocket."""
    engine_mux = EngineMux(engine_url) if mux else None
    if engine_mux is not None:
        engine = await engine_mux.open(None, "test-call")
    else:
        engine = await EngineSession.open(engine_url, None, "test-call")
    media = CallMedia(settings or bridge_settings(), engine, "test-call")
    leg = SimLeg(None, audio_8k, **leg_kwargs)  # type: ignore[arg-type]
    try:
        leg.set_remote(await media.bind())
        media.lock_remote(*(await leg.bind()))
        task = asyncio.create_task(media.run())
        try:
            yield Call(media, leg, engine, task)
        finally:
            await media.stop()
            await task
    finally:
        leg.close()
        await engine.close()
        if engine_mux is not None:
            assert engine_mux.mux is None  # (its only session closed it)


@contextlib.asynccontextmanager
async def fake_engine(handler: FakeEngineHandler) -> AsyncIterator[str]:
    """An aiohttp WebSocket server at /session whose behaviour after the handshake is ``handler``."""

    async def session(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await handler(ws)
        return ws

    app = web.Application()
    app.router.add_get("/session", session)
    async with serve_on_loopback(app, shutdown_timeout=0.5) as port:
        yield f"ws://127.0.0.1:{port}/session"


def best_correlation(sent: np.ndarray, received: np.ndarray, max_lag: int = 8000) -> tuple[float, int]:
    """Peak normalised cross-correlation of ``received`` against ``sent`` over lags 0..max_lag (FFT)."""
    a = sent.astype(np.float64)
    b = received.astype(np.float64)
    if len(b) < 800:
        return 0.0, 0
    size = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    xcorr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)[: max_lag + 1]
    lag = int(np.argmax(xcorr))
    n = min(len(a), len(b) - lag)
    if n <= 0:
        return 0.0, lag
    x, y = a[:n], b[lag : lag + n]
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return (float(np.dot(x, y) / denom) if denom > 0 else 0.0), lag


def segment_correlations(sent: np.ndarray, received: np.ndarray, segment: int = 4000) -> list[float]:
    """Best correlation of each ``segment``-sample piece of ``sent`` found anywhere in ``received``: robust
    to the timeline shifting by a concealed slot (a loaded machine), unlike one global correlation."""
    out: list[float] = []
    for start in range(0, len(sent) - segment + 1, segment):
        piece = sent[start : start + segment]
        if np.abs(piece.astype(np.int32)).max() < 1000:
            continue  # silence correlates with nothing
        corr, _ = best_correlation(piece, received[start:], max_lag=min(16000, len(received) - start))
        out.append(corr)
    return out
