"""Small real implementations of the call's dependencies, for tests that exercise call control only
(the e2e test uses the real engine, CallMedia, PostgreSQL and Redis instead).

``UdpEchoMedia`` is a real UDP endpoint: it binds, accepts only the locked remote, and echoes each RTP
packet back (or nothing while paused). ``MemorySink`` keeps lifecycle facts in lists for asserts.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from bridge.call_deps import (
    CallDeps,
    CallInfo,
    CallRoute,
    EngineCannotTakeCall,
    EngineLink,
    MediaLink,
    MediaUnavailable,
)
from engine.protocol import PersonaParams


class StaticRoutes:
    def __init__(self, routes: dict[str, CallRoute] | None = None) -> None:
        self.routes = routes or {}

    async def resolve(self, did: str) -> CallRoute:
        return self.routes.get(did) or CallRoute(did=did)


class SlotCapacity:
    """N slots in process memory (the e2e test uses Redis leases)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.held: set[str] = set()
        self.released: list[str] = []

    async def acquire(self, call_id: str) -> object | None:
        if len(self.held) >= self.slots:
            return None
        self.held.add(call_id)
        return call_id

    async def release(self, lease: object) -> None:
        self.held.discard(str(lease))
        self.released.append(str(lease))


@dataclass
class MemorySink:
    started_calls: list[CallInfo] = field(default_factory=list)
    refused_calls: list[tuple[CallInfo, str]] = field(default_factory=list)
    answered_calls: list[str] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    ended_calls: dict[str, tuple[str, dict[str, Any], str]] = field(default_factory=dict)

    def started(self, info: CallInfo) -> None:
        self.started_calls.append(info)

    def refused(self, info: CallInfo, reason: str) -> None:
        self.refused_calls.append((info, reason))

    def answered(self, call_id: str) -> None:
        self.answered_calls.append(call_id)

    def event(self, call_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events.append((call_id, kind, data))

    def ended(
        self, call_id: str, cause: str, summary: dict[str, Any], transcript: str, dtmf_digits: str
    ) -> None:
        self.ended_calls[call_id] = (cause, summary, dtmf_digits)


class RecordingEngine:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.closed = False
        self.gate: asyncio.Event | None = None  # when set up, send_event blocks until the gate opens

    async def send_event(self, name: str, value: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.events.append((name, value))

    async def close(self) -> None:
        self.closed = True


class UdpEchoMedia:
    def __init__(self, bind_fails: bool = False) -> None:
        self.bind_fails = bind_fails
        self.stopped = False
        self.sock: socket.socket | None = None
        self.remote: tuple[str, int] | None = None
        self.paused = False
        self.echoed = 0
        self.dropped_while_paused = 0
        self._stop = asyncio.Event()

    async def bind(self) -> tuple[str, int]:
        if self.bind_fails:
            raise MediaUnavailable("test: no free RTP port")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def lock_remote(self, host: str, port: int) -> None:
        self.remote = (host, port)

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data, addr = self.sock.recvfrom(2048)
        except OSError:
            return
        if addr != self.remote:
            return
        if self.paused:
            self.dropped_while_paused += 1
            return
        self.sock.sendto(data, addr)
        self.echoed += 1

    async def run(self) -> str:
        await self._stop.wait()
        return "stopped"

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    async def stop(self) -> None:
        self.stopped = True
        self._stop.set()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


@dataclass
class StandinDeps:
    routes: StaticRoutes
    capacity: SlotCapacity
    sink: MemorySink
    engines: list[RecordingEngine] = field(default_factory=list)
    medias: list[UdpEchoMedia] = field(default_factory=list)
    engine_down: bool = False
    media_down: bool = False  # binding the media fails (no RTP port, media worker gone)

    async def open_engine(self, persona: PersonaParams, call_id: str) -> EngineLink:
        if self.engine_down:
            raise EngineCannotTakeCall("engine_unavailable", "test: engine down")
        engine = RecordingEngine()
        self.engines.append(engine)
        return engine

    def make_media(self, engine: EngineLink, call_id: str) -> MediaLink:
        media = UdpEchoMedia(bind_fails=self.media_down)
        self.medias.append(media)
        return media

    def deps(self) -> CallDeps:
        return CallDeps(self.routes, self.capacity, self.sink, self.open_engine, self.make_media)


def standin_deps(slots: int = 10, routes: dict[str, CallRoute] | None = None) -> StandinDeps:
    return StandinDeps(StaticRoutes(routes), SlotCapacity(slots), MemorySink())
