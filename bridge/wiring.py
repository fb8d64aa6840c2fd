"""Wiring the real pieces into a call's dependencies (``CallDeps``): the engine client, the per-call
media path, and the appliance state (routes from PostgreSQL, Redis capacity leases, call records)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from bridge.call_deps import (
    CallDeps,
    EngineCannotTakeCall,
    EngineLink,
    EngineOpener,
    MediaFactory,
    MediaLink,
)
from bridge.config import BridgeSettings, Settings
from bridge.control_api import HealthProbe
from engine.protocol import PersonaParams

if TYPE_CHECKING:
    from bridge.browser_ws import TalkDeps
    from bridge.engine_pool import EnginePool
    from bridge.state_adapters import OpenState, StateSink

log = logging.getLogger(__name__)


def engine_opener(engines: str | EnginePool, *, timeout_s: float = 5.0) -> EngineOpener:
    """Open an engine session per call (on the pool's best engine); every engine full or unreachable
    becomes ``EngineCannotTakeCall`` so the call is refused (congestion) before it is answered."""
    from bridge.engine_client import EngineError, EngineFull
    from bridge.engine_pool import EnginePool

    pool = engines if isinstance(engines, EnginePool) else EnginePool([engines], open_timeout_s=timeout_s)

    async def open_engine(persona: PersonaParams, call_id: str) -> EngineLink:
        try:
            return await pool.open(persona, call_id)
        except EngineFull as exc:
            raise EngineCannotTakeCall("engine_full", str(exc)) from exc
        except EngineError as exc:
            raise EngineCannotTakeCall("engine_unavailable", str(exc)) from exc

    return open_engine


def media_factory(settings: BridgeSettings) -> MediaFactory:
    from bridge.engine_client import EngineSession
    from bridge.media.call_media import CallMedia

    def make_media(engine: EngineLink, call_id: str) -> MediaLink:
        # The engine link is the EngineSession engine_opener() opened for this call.
        session = cast(EngineSession, engine)
        return CallMedia(settings, session, call_id, inbound_format=settings.inbound_format)

    return make_media


def watched_media(factory: MediaFactory, sink: StateSink) -> MediaFactory:
    """``factory``, with each call's media handed to the sink's live monitor (its latency on the call's
    live hash, for `aziza-admin calls live`): the call itself needs to know nothing of it."""

    def make_media(engine: EngineLink, call_id: str) -> MediaLink:
        media = factory(engine, call_id)
        sink.watch(call_id, media)
        return media

    return make_media


@dataclass
class Wired:
    deps: CallDeps
    health_probe: HealthProbe | None = None
    routes: list[web.RouteDef] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def production_deps(settings: Settings) -> AsyncIterator[Wired]:
    """Everything a production bridge needs, opened and closed in order."""
    from bridge.engine_pool import EnginePool
    from bridge.state_adapters import open_state

    async with contextlib.AsyncExitStack() as stack:
        state = await stack.enter_async_context(open_state(settings))
        pool = await stack.enter_async_context(
            EnginePool(settings.bridge.engines(), mux=settings.bridge.engine_mux).running())
        open_engine, make_media = engine_opener(pool), media_factory(settings.bridge)
        if settings.bridge.media_workers:
            from bridge.media.metrics_fanin import MEDIA_FANIN
            from bridge.media.workers import MediaWorkerPool

            workers = MediaWorkerPool(settings.bridge, settings.bridge.media_workers, metrics=MEDIA_FANIN)
            await stack.enter_async_context(workers.running())
            open_engine, make_media = workers.open_engine, workers.make_media
            log.info("phone calls' media runs in %d media worker processes", settings.bridge.media_workers)
        deps = CallDeps(
            routes=state.routes,
            capacity=state.capacity,
            sink=state.sink,
            open_engine=open_engine,
            make_media=watched_media(make_media, state.sink),
        )
        routes: list[web.RouteDef] = []
        try:
            from bridge.browser_ws import browser_routes

            routes = list(browser_routes(settings, talk_deps(settings, state, pool)))
        except ImportError as exc:  # the browser channel is optional for phone calls
            log.warning("browser WebSocket routes unavailable: %s", exc)
        yield Wired(deps, health_probe=state.health_probe, routes=routes)


def talk_deps(settings: Settings, state: OpenState, pool: EnginePool | None = None) -> TalkDeps:
    """The browser channel admitted like a phone call: personas from PostgreSQL, the same capacity gate
    and call records/live state, talk links checked with the key of the current control token."""
    from bridge.browser_ws import PersonaUnknown, TalkDeps
    from bridge.http_guard import TokenSource
    from bridge.state.routing import persona_params
    from bridge.talk_token import talk_key

    tokens = TokenSource(settings.bridge.control_token_file)

    async def persona(name: str) -> PersonaParams:
        found = await state.db.persona_by_name(name)
        if found is None:
            raise PersonaUnknown(name)
        return persona_params(found)

    def key() -> bytes | None:
        token, _ = tokens.current()
        return talk_key(token) if token is not None else None

    return TalkDeps(personas=persona, capacity=state.capacity, sink=state.sink, talk_key=key,
                    open_engine=pool.open if pool is not None else None)
