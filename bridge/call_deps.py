"""The narrow interfaces a call needs from the rest of the bridge (routing, capacity, records, engine,
media), so the call controller can be read — and tested — on its own terms. ``bridge.app`` wires the
real implementations (bridge.state.*, bridge.engine_client, bridge.media.call_media) into ``CallDeps``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from bridge.state.models import DEFAULT_DTMF_ACTIONS
from engine.protocol import PersonaParams


@dataclass(frozen=True)
class CallRoute:
    """Where a DID leads: the persona, the "press 0" target and what each DTMF digit does."""

    did: str
    persona: PersonaParams = field(default_factory=PersonaParams)
    transfer_target: str | None = None
    # digit -> transfer | hangup | hold | engine; digits not here go to the engine as events.
    dtmf_actions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DTMF_ACTIONS))
    source: Literal["db", "cache", "default"] = "default"


@dataclass(frozen=True)
class CallInfo:
    """What is known of a call when it arrives (for its record)."""

    call_id: str
    did: str
    caller: str
    persona: str
    channel_name: str
    language: str = ""
    kind: Literal["phone", "browser"] = "phone"


class RouteSource(Protocol):
    async def resolve(self, did: str) -> CallRoute: ...


class CapacityGate(Protocol):
    """One slot per live call (Redis leases in production). Admission may refuse (None: full; an exception:
    cannot tell); once granted, a lease is the gate's to keep alive until ``release``: a live call is
    never ended over its lease."""

    async def acquire(self, call_id: str) -> object | None: ...

    async def release(self, lease: object) -> None: ...


@dataclass(frozen=True)
class CapacityReport:
    """How a capacity gate stands, read when ``/metrics`` is scraped (counters count since start)."""

    slots: int  # the configured N
    held: int  # leases this bridge holds now (its calls and browser talks)
    refused_full: int  # admissions refused because every slot was taken
    leases_lost: int  # leases the store had lost, put back by renewal
    renew_failures: int  # renewal rounds that could not reach the store


@runtime_checkable
class CapacityReporting(Protocol):
    """A gate that can report itself (the Redis one); stand-in gates need not."""

    def capacity_report(self) -> CapacityReport: ...


class CallSink(Protocol):
    """Where call lifecycle facts go (call records + live state). Methods must not block."""

    def started(self, info: CallInfo) -> None: ...

    def refused(self, info: CallInfo, reason: str) -> None: ...

    def answered(self, call_id: str) -> None: ...

    def event(self, call_id: str, kind: str, data: dict[str, Any]) -> None: ...

    def ended(
        self, call_id: str, cause: str, summary: dict[str, Any], transcript: str, dtmf_digits: str
    ) -> None: ...


class EngineLink(Protocol):
    """The engine session of one call (bridge.engine_client.EngineSession)."""

    async def send_event(self, name: str, value: str) -> None: ...

    async def close(self) -> None: ...


class MediaLink(Protocol):
    """The media path of one call (bridge.media.call_media.CallMedia)."""

    async def bind(self) -> tuple[str, int]: ...

    def lock_remote(self, host: str, port: int) -> None: ...

    async def run(self) -> Any: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    async def stop(self) -> None: ...


class MediaUnavailable(Exception):
    """The call's media cannot be set up (no free RTP port, its media worker gone): the call is refused
    like a full engine, before it is answered."""


class EngineCannotTakeCall(Exception):
    """The engine cannot take this call: ``reason`` is "engine_full" or "engine_unavailable"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


EngineOpener = Callable[[PersonaParams, str], Awaitable[EngineLink]]
MediaFactory = Callable[[EngineLink, str], MediaLink]


@dataclass
class CallDeps:
    routes: RouteSource
    capacity: CapacityGate
    sink: CallSink
    open_engine: EngineOpener
    make_media: MediaFactory
