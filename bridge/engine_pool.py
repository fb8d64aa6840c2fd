"""Several engines (one per GPU) as one appliance: each call goes to an engine with a free slot.

:class:`EnginePlacement` is the sans-IO core: it keeps, per engine URL, the free slots its ``/health`` last
reported and whether it is down, and answers in which order to try the engines for a new call (most free
slots first; engines down or full last, so a call is never refused while another engine could take it).
A refused open (``full``) or a failed connection updates it at once; the health poller of
:class:`EnginePool` corrects it every ``poll_s``. A dead engine is retried after a backoff that doubles up
to ``max_backoff_s`` (``bridge.backoff.Backoff``, unjittered; time stays an argument here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from bridge.backoff import Backoff
from bridge.engine_client import EngineError, EngineFull, EngineMux, EngineSession, EngineUnavailable
from engine.protocol import PersonaParams

log = logging.getLogger(__name__)


@dataclass
class EngineStatus:
    url: str
    free: int | None = None  # from /health; None: not known yet
    total: int | None = None
    down_until: float = 0.0  # not tried before this (monotonic seconds)
    failures: int = 0
    last_error: str | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 10.0, jitter=False))

    def up(self, now: float) -> bool:
        return now >= self.down_until


class EnginePlacement:
    def __init__(self, urls: list[str], min_backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        if not urls:
            raise ValueError("at least one engine URL is needed")
        self.engines = {url: EngineStatus(url, backoff=Backoff(min_backoff_s, max_backoff_s, jitter=False))
                        for url in dict.fromkeys(urls)}
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s

    def order(self, now: float) -> list[str]:
        """Engines to try for a new call, best first: up with most free slots; unknown counts in between;
        full ones, then down ones last (they may have recovered since)."""
        def rank(status: EngineStatus) -> tuple[int, int]:
            if not status.up(now):
                return (3, 0)
            if status.free is None:
                return (1, 0)
            return (0 if status.free > 0 else 2, -status.free)

        return [s.url for s in sorted(self.engines.values(), key=rank)]

    def opened(self, url: str) -> None:
        status = self.engines[url]
        status.failures, status.down_until, status.last_error = 0, 0.0, None
        status.backoff.reset()
        if status.free is not None:
            status.free = max(0, status.free - 1)

    def full(self, url: str) -> None:
        self.engines[url].free = 0

    def failed(self, url: str, now: float, error: str) -> None:
        status = self.engines[url]
        status.failures += 1
        status.last_error = error
        status.down_until = now + status.backoff.next_delay()

    def health(self, url: str, free: int, total: int, now: float) -> None:
        status = self.engines[url]
        status.free, status.total = free, total
        status.failures, status.down_until, status.last_error = 0, 0.0, None
        status.backoff.reset()

    def unreachable(self, url: str, now: float, error: str) -> None:
        status = self.engines[url]
        status.free = None
        self.failed(url, now, error)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        return [{"url": s.url, "up": s.up(now) and s.last_error is None, "free": s.free, "total": s.total,
                 "error": s.last_error} for s in self.engines.values()]


def health_url(engine_url: str) -> tuple[str, Callable[[], aiohttp.BaseConnector | None]]:
    """The engine's /health URL (and a connector factory) for its session URL (ws://, wss://, unix://)."""
    parts = urlsplit(engine_url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        return "http://localhost/health", lambda: aiohttp.UnixConnector(path=path)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    return f"{scheme}://{parts.netloc}/health", lambda: None


async def fetch_health(engine_url: str, timeout_s: float) -> dict[str, object]:
    url, connector = health_url(engine_url)
    async with (
        aiohttp.ClientSession(connector=connector(), timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
        http.get(url) as resp,
    ):
        if resp.status != 200:
            raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status)
        body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise ValueError("health is not a JSON object")
        return body


class EnginePool:
    """Owns the health poller (``async with pool.running()``) and opens sessions on the best engine."""

    def __init__(self, urls: list[str], *, poll_s: float = 1.0, open_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, mux: bool = False) -> None:
        self.placement = EnginePlacement(urls)
        self.poll_s, self.open_timeout_s = poll_s, open_timeout_s
        self._clock = clock
        # mux: sessions as channels of one WebSocket per engine (bridge.engine_mux; engine/mux.py)
        self._muxes: dict[str, EngineMux] | None = {url: EngineMux(url) for url in urls} if mux else None

    @property
    def urls(self) -> list[str]:
        return list(self.placement.engines)

    async def poll_once(self) -> None:
        async def one(url: str) -> None:
            try:
                body = await fetch_health(url, timeout_s=min(2.0, self.poll_s * 2))
                slots = body.get("slots")
                if not isinstance(slots, dict):
                    raise ValueError("no slots in health")
                total, busy = int(slots.get("total", 0)), int(slots.get("busy", 0))
                self.placement.health(url, int(slots.get("free", total - busy)), total, self._clock())
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError) as exc:
                self.placement.unreachable(url, self._clock(), f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(one(url) for url in self.urls))

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EnginePool]:
        """The health poller runs while the context is open (one engine: no polling needed)."""
        try:
            if len(self.urls) == 1:
                yield self
                return
            task = asyncio.create_task(self._poll_forever(), name="aziza-engine-pool-health")
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the engine muxes' sockets (their sessions read engine_gone; normally none is left)."""
        for mux in (self._muxes or {}).values():
            await mux.aclose()

    async def open(self, persona: PersonaParams | None, call_id: str) -> EngineSession:
        """A session on the best engine; EngineFull when every engine is full, EngineUnavailable when none
        could be reached (after trying each once)."""
        full: EngineFull | None = None
        last: EngineError | None = None
        for url in self.placement.order(self._clock()):
            try:
                if self._muxes is not None:
                    session = await self._muxes[url].open(persona, call_id, timeout=self.open_timeout_s)
                else:
                    session = await EngineSession.open(url, persona, call_id, timeout=self.open_timeout_s)
            except EngineFull as exc:
                self.placement.full(url)
                full = exc
                continue
            except EngineUnavailable as exc:
                self.placement.failed(url, self._clock(), str(exc)[:200])
                log.warning("engine %s unavailable for call %s: %s", url, call_id, exc)
                last = exc
                continue
            self.placement.opened(url)
            return session
        if full is not None:
            raise full
        raise last if last is not None else EngineUnavailable("no engine configured")
