"""One phone call under ARI control: setup, in-call control and teardown.

A ``Call`` owns one ``asyncio.TaskGroup`` holding: event processing (this call's ARI events, in
order), the setup-then-media task (``CallMedia.run``, which owns the engine receive loop) and the
goodbye watchdog. Its capacity lease is renewed by the capacity gate (one task for all calls), and a
lease Redis loses is put back, never a reason to end the call. Whatever ends the call — caller hang-up,
our hang-up, transfer, engine death, media timeout, an ARI error — goes through ``end(reason)``; ``run``
then cancels the group and tears everything down exactly once (media socket, engine session, bridge,
media channel, caller channel when it is still ours, lease, call record), bounded by
``TEARDOWN_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.ari.errors import AriError, AriNotFound, AriUnprocessable
from bridge.ari.models import (
    AriEvent,
    Channel,
    ChannelDestroyed,
    ChannelDtmfReceived,
    ChannelHangupRequest,
    ChannelHold,
    ChannelUnhold,
    PlaybackFinished,
    StasisEnd,
    StasisStart,
)
from bridge.backoff import Backoff
from bridge.call_deps import CallInfo, CallRoute, EngineCannotTakeCall, EngineLink, MediaLink

if TYPE_CHECKING:
    from bridge.controller import CallController

log = logging.getLogger(__name__)

MEDIA_CHANNEL_PREFIX = "aziza-media-"
BRIDGE_PREFIX = "aziza-bridge-"
TEARDOWN_TIMEOUT_S = 3.0
MEDIA_STASIS_TIMEOUT_S = 5.0
ADD_CHANNEL_RETRIES = 3
GOODBYE_MAX_S = 5.0


class CallState(enum.Enum):
    SETUP = "setup"
    ACTIVE = "active"
    HELD = "held"
    ENDING = "ending"
    ENDED = "ended"


class CallStateError(Exception):
    """A control action that the call's current state does not allow (e.g. hold while setting up)."""


class _SetupAbort(Exception):
    """Setup cannot go on; ``reason`` becomes the call's end reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TransferTarget:
    """A parsed transfer target: a dialplan location (``continue``) or an endpoint (``redirect``)."""

    kind: str  # "continue" | "redirect"
    extension: str = ""
    context: str | None = None
    priority: int = 1
    endpoint: str = ""


def parse_transfer_target(target: str, channel_tech: str) -> TransferTarget:
    """Dialplan targets → continue: Goto style ``[context,]exten[,priority]`` (as the DID table stores
    them) or ``exten@context[:priority]``. ``sip:…`` → redirect (REFER/302) through the caller's own
    technology; ``TECH/resource`` → redirect as given."""
    target = target.strip()
    if not target or any(c.isspace() for c in target):
        raise ValueError(f"bad transfer target {target!r}")
    lowered = target.lower()
    if lowered.startswith(("sip:", "sips:")):
        return TransferTarget("redirect", endpoint=f"{channel_tech}/{target}")
    if "/" in target:
        tech, _, resource = target.partition("/")
        if not tech or not resource:
            raise ValueError(f"bad transfer endpoint {target!r}")
        return TransferTarget("redirect", endpoint=target)
    if "," in target:
        parts = target.split(",")
        if len(parts) == 2:
            parts = [*parts, "1"]
        if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
            raise ValueError(f"bad dialplan target {target!r}")
        return TransferTarget("continue", extension=parts[1], context=parts[0], priority=int(parts[2]))
    extension, _, rest = target.partition("@")
    context, _, prio = rest.partition(":")
    if not extension or ("@" in target and not context):
        raise ValueError(f"bad dialplan target {target!r}")
    priority = 1
    if prio:
        if not prio.isdigit():
            raise ValueError(f"bad dialplan priority in {target!r}")
        priority = int(prio)
    return TransferTarget("continue", extension=extension, context=context or None, priority=priority)


class Call:
    def __init__(
        self,
        controller: CallController,
        channel: Channel,
        args: tuple[str, ...],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctl = controller
        self.channel = channel
        self.id = channel.id
        # The DID: first Stasis() argument, else the extension the dialplan matched.
        self.did = (args[0] if args and args[0] else channel.dialplan.exten).strip()
        self.caller_number = channel.caller.number
        suffix = uuid.uuid4().hex[:16]
        self.media_channel_id = MEDIA_CHANNEL_PREFIX + suffix
        self.bridge_id = BRIDGE_PREFIX + suffix
        self.queue: asyncio.Queue[AriEvent] = asyncio.Queue()
        self.state = CallState.SETUP
        self.end_reason: str | None = None
        self.route: CallRoute | None = None
        self.engine: EngineLink | None = None
        self.media: MediaLink | None = None
        self.lease: object | None = None
        self.refused = False
        self.transferred_to: str | None = None
        self._goodbye_playback_id: str | None = None
        self._goodbye_started = asyncio.Event()
        self._transfer_pending: str | None = None  # set before the ARI call: its StasisEnd may come first
        self.dtmf_digits: list[str] = []
        self.far_end_held = False
        self.media_result: Any = None
        self._clock = clock
        self.timeline: dict[str, float] = {"stasis_start": clock()}
        self._ended = asyncio.Event()
        self._media_in_stasis = asyncio.Event()
        self._caller_gone = False  # hung up / left Stasis: not ours to DELETE any more
        self._media_channel_tried = False
        self._media_channel_gone = False
        self._bridge_tried = False
        self._torn_down = False
        self.done = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def owned_ids(self) -> tuple[str, ...]:
        return (self.id, self.media_channel_id, self.bridge_id)

    @property
    def media_channel_ready(self) -> bool:
        return self._media_in_stasis.is_set()

    def note_caller_gone(self) -> None:
        """Asterisk no longer has the caller channel (learned by reconcile)."""
        self._caller_gone = True

    def note_media_channel_gone(self) -> None:
        self._media_channel_gone = True

    def end(self, reason: str) -> None:
        """Ask the call to end (idempotent; the first reason wins)."""
        if self.end_reason is None:
            self.end_reason = reason
            self.timeline["end_requested"] = self._clock()
            if self.state is not CallState.ENDED:
                self.state = CallState.ENDING
            log.info("call %s ending: %s", self.id, reason)
        self._ended.set()

    def _claim_end_reason(self, reason: str) -> None:
        """Fix why the call ends without ending it yet (setup still has a request to finish)."""
        if self.end_reason is None:
            self.end_reason = reason
            self.timeline["end_requested"] = self._clock()
            log.info("call %s ending: %s", self.id, reason)

    async def run(self) -> None:
        """The call's whole life. Never raises (except CancelledError on shutdown, after teardown)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._guard(self._process_events), name=f"call-{self.id}-events"),
                    tg.create_task(self._guard(self._setup_and_run), name=f"call-{self.id}-media"),
                    tg.create_task(self._guard(self._goodbye_watchdog), name=f"call-{self.id}-goodbye"),
                ]
                await self._ended.wait()
                for task in tasks:
                    task.cancel()
        finally:
            try:
                async with asyncio.timeout(TEARDOWN_TIMEOUT_S + 2):
                    await self._teardown()
            except TimeoutError:
                log.error("call %s: teardown did not finish in time", self.id)
            finally:
                self.state = CallState.ENDED
                self.done.set()

    async def _guard(self, body: Callable[[], Awaitable[None]]) -> None:
        """A task body's unexpected error ends the call instead of tearing down the task group."""
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("call %s: %s failed", self.id, getattr(body, "__name__", body))
            self.end(f"internal_error:{type(exc).__name__}")

    # ---- setup ---------------------------------------------------------------------------------

    async def _setup_and_run(self) -> None:
        try:
            await self._setup()
        except _SetupAbort as abort:
            self.end(abort.reason)
            return
        except AriError as exc:
            log.warning("call %s: setup failed: %s", self.id, exc)
            self.end(f"ari_error:{exc.status or 'unreachable'}")
            return
        assert self.media is not None
        self.media_result = await self.media.run()
        self.end(f"media:{_reason_text(self.media_result)}")

    async def _setup(self) -> None:
        ctl, ari = self.ctl, self.ctl.ari
        self.route = await ctl.resolve_route(self.did)
        info = CallInfo(self.id, self.did, self.caller_number, self.route.persona.name, self.channel.name)
        try:
            self.lease = await ctl.deps.capacity.acquire(self.id)
        except Exception as exc:  # Redis down: we cannot promise a slot, so refuse like a full house
            _reraise_if_cancelling()
            log.error("call %s: capacity check failed: %s", self.id, exc)
            await self._refuse(info, "capacity_unavailable", "congestion")
        if self.lease is None:
            await self._refuse(info, "capacity_full", ctl.settings.ari.refuse_reason)
        try:
            self.engine = await ctl.deps.open_engine(self.route.persona, self.id)
        except EngineCannotTakeCall as exc:
            await self._refuse(info, exc.reason, "congestion")
        ctl.deps.sink.started(info)
        ready = getattr(self.engine, "ready", None)
        if ready is not None:  # the engine's seed (replay) and warnings go on the call record
            ctl.deps.sink.event(self.id, "engine", {"url": getattr(self.engine, "url", None),
                                                    "seed": ready.seed, "warnings": list(ready.warnings)})
            for warning in ready.warnings:
                log.warning("call %s: engine: %s", self.id, warning)
        await ari.answer(self.id)
        self.timeline["answered"] = self._clock()
        assert self.engine is not None
        self.media = ctl.deps.make_media(self.engine, self.id)
        _, local_port = await self.media.bind()
        self._bridge_tried = True
        await ari.create_bridge(self.bridge_id, name=f"aziza-{self.id}")
        self._media_channel_tried = True
        ctl.register_channel(self.media_channel_id, self)
        bridge_settings = ctl.settings.bridge
        media_channel = await ari.external_media(
            channel_id=self.media_channel_id,
            app=ctl.settings.ari.app,
            external_host=f"{bridge_settings.rtp_advertise_host}:{local_port}",
            audio_format=bridge_settings.inbound_format,
        )
        host = media_channel.channelvars.get("UNICASTRTP_LOCAL_ADDRESS", "")
        port = media_channel.channelvars.get("UNICASTRTP_LOCAL_PORT", "")
        if not host or not port.isdigit():
            raise _SetupAbort("media_channel_without_address")
        self.media.lock_remote(host, int(port))
        # addChannel right after externalMedia can 422 ("not in Stasis"): wait for its StasisStart.
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (call ended
            # meanwhile) that races with the event, and setup would go on into media.run().
            async with asyncio.timeout(MEDIA_STASIS_TIMEOUT_S):
                await self._media_in_stasis.wait()
        except TimeoutError:
            raise _SetupAbort("media_channel_never_entered_stasis") from None
        await self._add_channels()
        self.state = CallState.ACTIVE
        self.timeline["media_up"] = self._clock()
        ctl.deps.sink.answered(self.id)
        ctl.deps.sink.event(self.id, "media_up", {"rtp_remote": f"{host}:{port}", "local_port": local_port})

    async def _add_channels(self) -> None:
        backoff = Backoff(0.02, 0.08)
        for attempt in range(ADD_CHANNEL_RETRIES):
            try:
                await self.ctl.ari.add_channel(self.bridge_id, [self.id, self.media_channel_id])
                return
            except AriUnprocessable:
                if attempt == ADD_CHANNEL_RETRIES - 1:
                    raise
                await asyncio.sleep(backoff.next_delay())

    async def _refuse(self, info: CallInfo, reason: str, hangup_reason: str) -> None:
        """Refuse BEFORE answering: the caller hears busy (486) or congestion (503)."""
        self.refused = True
        # Claim the end reason before the DELETE: its ChannelHangupRequest can be handled before the
        # DELETE's own answer, and would otherwise record our refusal as "caller_hangup".
        self._claim_end_reason(f"refused:{reason}")
        self.ctl.deps.sink.refused(info, reason)
        try:
            await self.ctl.ari.hangup(self.id, reason=hangup_reason)
        except AriNotFound:
            pass
        self._caller_gone = True
        raise _SetupAbort(f"refused:{reason}")

    # ---- events --------------------------------------------------------------------------------

    async def _process_events(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await self._on_event(event)
            except AriError as exc:
                log.warning("call %s: handling %s: %s", self.id, event.type, exc)

    async def _on_event(self, event: AriEvent) -> None:
        if isinstance(event, PlaybackFinished):
            if event.playback.id == self._goodbye_playback_id:
                self.end("dtmf_hangup")
            return
        if not isinstance(event, StasisStart | StasisEnd | ChannelHangupRequest | ChannelDestroyed |
                          ChannelDtmfReceived | ChannelHold | ChannelUnhold):
            return
        channel_id = event.channel.id
        if channel_id == self.media_channel_id:
            if isinstance(event, StasisStart):
                self._media_in_stasis.set()
            elif isinstance(event, StasisEnd | ChannelDestroyed | ChannelHangupRequest):
                self._media_channel_gone = True
                self.end("media_channel_gone")
            return
        if channel_id != self.id:
            return
        if isinstance(event, ChannelHangupRequest | ChannelDestroyed):
            self._caller_gone = True
            self.end("caller_hangup")
        elif isinstance(event, StasisEnd):
            self._caller_gone = True
            self.end("transferred" if self._transfer_pending else "caller_left_stasis")
        elif isinstance(event, ChannelDtmfReceived):
            await self._on_dtmf(event.digit, event.duration_ms)
        elif isinstance(event, ChannelHold):
            self.far_end_held = True
            self._pause_media("far_end_hold")
        elif isinstance(event, ChannelUnhold):
            self.far_end_held = False
            if self.state is CallState.ACTIVE:
                self._resume_media("far_end_unhold")

    async def _on_dtmf(self, digit: str, duration_ms: int) -> None:
        self.dtmf_digits.append(digit)
        self.ctl.deps.sink.event(self.id, "dtmf", {"digit": digit, "duration_ms": duration_ms})
        if self.state not in (CallState.ACTIVE, CallState.HELD):
            return
        action = (self.route.dtmf_actions if self.route else {}).get(digit, "engine")
        if action == "transfer" and self.route is not None and self.route.transfer_target:
            try:
                await self.transfer(self.route.transfer_target)
            except (ValueError, CallStateError) as exc:
                log.warning("call %s: DTMF transfer: %s", self.id, exc)
        elif action == "hangup":
            await self._hang_up_politely()
        elif action == "hold":
            try:
                await (self.hold() if self.state is CallState.ACTIVE else self.unhold())
            except CallStateError as exc:
                log.warning("call %s: DTMF hold: %s", self.id, exc)
        elif self.engine is not None:
            try:
                await self.engine.send_event("dtmf", digit)
            except Exception as exc:  # a dead engine ends the call through media.run(), not here
                log.warning("call %s: DTMF to engine: %s", self.id, exc)

    async def _hang_up_politely(self) -> None:
        """"#": play the configured goodbye (engine audio paused), hang up when it finishes (or after
        GOODBYE_MAX_S); without a goodbye sound, or if Asterisk cannot play it, hang up at once."""
        sound = self.ctl.settings.ari.goodbye_sound
        if not sound or self._goodbye_playback_id is not None:
            self.end("dtmf_hangup")
            return
        self._goodbye_playback_id = f"aziza-goodbye-{uuid.uuid4().hex[:12]}"
        self._pause_media("goodbye")
        try:
            await self.ctl.ari.play(self.id, sound, self._goodbye_playback_id)
        except AriError as exc:
            log.warning("call %s: goodbye playback failed: %s", self.id, exc)
            self.end("dtmf_hangup")
            return
        self._goodbye_started.set()

    async def _goodbye_watchdog(self) -> None:
        await self._goodbye_started.wait()
        await asyncio.sleep(GOODBYE_MAX_S)
        self.end("dtmf_hangup")

    # ---- control -------------------------------------------------------------------------------

    def _pause_media(self, why: str) -> None:
        if self.media is not None:
            self.media.pause()
            self.ctl.deps.sink.event(self.id, "hold", {"by": why})

    def _resume_media(self, why: str) -> None:
        if self.media is not None:
            self.media.resume()
            self.ctl.deps.sink.event(self.id, "unhold", {"by": why})

    async def hold(self) -> None:
        if self.state is not CallState.ACTIVE:
            raise CallStateError(f"call is {self.state.value}, not active")
        self.state = CallState.HELD
        self._pause_media("operator")
        try:
            await self.ctl.ari.hold(self.id)
            await self.ctl.ari.start_moh(self.id, self.ctl.settings.ari.moh_class)
        except AriError:
            # Asterisk said no: the call goes on as it was (a half-applied hold is undone best-effort).
            with contextlib.suppress(AriError):
                await self.ctl.ari.unhold(self.id)
            self.state = CallState.ACTIVE
            if not self.far_end_held:
                self._resume_media("hold_failed")
            raise

    async def unhold(self) -> None:
        if self.state is not CallState.HELD:
            raise CallStateError(f"call is {self.state.value}, not held")
        await self.ctl.ari.stop_moh(self.id)
        await self.ctl.ari.unhold(self.id)
        self.state = CallState.ACTIVE
        if not self.far_end_held:
            self._resume_media("operator")

    async def transfer(self, target: str) -> None:
        """Blind transfer; the engine session ends and the slot frees (teardown), the caller lives on."""
        if self.state not in (CallState.ACTIVE, CallState.HELD):
            raise CallStateError(f"call is {self.state.value}, cannot transfer")
        tech = self.channel.name.partition("/")[0] or "PJSIP"
        parsed = parse_transfer_target(target, tech)
        if self.state is CallState.HELD:
            await self.ctl.ari.stop_moh(self.id)
            await self.ctl.ari.unhold(self.id)
        self._transfer_pending = target
        try:
            if parsed.kind == "continue":
                await self.ctl.ari.continue_in_dialplan(
                    self.id, context=parsed.context, extension=parsed.extension, priority=parsed.priority
                )
            else:
                await self.ctl.ari.redirect(self.id, parsed.endpoint)
        except AriError:
            self._transfer_pending = None
            raise
        self.transferred_to = target
        self._caller_gone = True  # Asterisk has it now: teardown must not hang it up
        self.ctl.deps.sink.event(self.id, "transfer", {"target": target, "how": parsed.kind})
        self.end("transferred")

    def hangup(self) -> None:
        self.end("hangup_requested")

    # ---- teardown ------------------------------------------------------------------------------

    async def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        if self.end_reason is None:
            self.end("shutdown")
        ari = self.ctl.ari
        steps: list[Awaitable[Any]] = [self._stop_media_then_engine()]
        if not self._caller_gone:
            steps.append(_gone_ok(ari.hangup(self.id, reason="normal")))
        if self._bridge_tried:
            steps.append(_gone_ok(ari.destroy_bridge(self.bridge_id)))
        if self._media_channel_tried and not self._media_channel_gone:
            steps.append(_gone_ok(ari.hangup(self.media_channel_id, reason="normal")))
        if self.lease is not None:
            steps.append(self.ctl.deps.capacity.release(self.lease))
        results = await asyncio.gather(
            *(_bounded(s, TEARDOWN_TIMEOUT_S) for s in steps), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("call %s: teardown step failed: %s: %s", self.id, type(result).__name__, result)
        self.timeline["torn_down"] = self._clock()
        if not self.refused:
            self.ctl.deps.sink.ended(
                self.id,
                self.end_reason or "unknown",
                self.summary(),
                _transcript(self.media),
                "".join(self.dtmf_digits),
            )
        self.ctl.forget(self)

    async def _stop_media_then_engine(self) -> None:
        # In this order: the media's engine-receive loop must be gone before close() reads the socket.
        try:
            if self.media is not None:
                await self.media.stop()
        finally:
            if self.engine is not None:
                await self.engine.close()

    def summary(self) -> dict[str, Any]:
        """JSON-able: timings (ms since StasisStart) and the media stats."""
        start = self.timeline["stasis_start"]
        out: dict[str, Any] = {
            "timeline_ms": {k: round((v - start) * 1000, 2) for k, v in self.timeline.items()},
            "end_reason": self.end_reason,
        }
        if self.media is not None:
            snapshot = getattr(self.media, "snapshot", None)
            out["media"] = snapshot() if callable(snapshot) else _jsonable(getattr(self.media, "stats", None))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "call_id": self.id,
            "did": self.did,
            "caller": self.caller_number,
            "state": self.state.value,
            "persona": self.route.persona.name if self.route else None,
            "route_source": self.route.source if self.route else None,
            "dtmf": "".join(self.dtmf_digits),
            "end_reason": self.end_reason,
            "media_channel_id": self.media_channel_id,
            "bridge_id": self.bridge_id,
        }


def _reraise_if_cancelling() -> None:
    """redis-py can turn a cancellation into a ConnectionError; a task being cancelled must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _bounded(aw: Awaitable[Any], limit_s: float) -> Any:
    async with asyncio.timeout(limit_s):
        return await aw


async def _gone_ok(aw: Awaitable[None]) -> None:
    """Teardown of an ARI object that may already be gone: 404 is success."""
    try:
        await aw
    except AriNotFound:
        pass


def _reason_text(result: Any) -> str:
    if isinstance(result, enum.Enum):
        return str(result.value)
    return str(getattr(result, "reason", result))


def _transcript(media: MediaLink | None) -> str:
    """The agent's text as the engine decoded it (CallMedia keeps it in ``stats.engine_text``)."""
    pieces = getattr(getattr(media, "stats", None), "engine_text", None)
    return "".join(p for p in pieces if isinstance(p, str)) if isinstance(pieces, list) else ""


def _jsonable(stats: Any) -> Any:
    if stats is None:
        return None
    for attr in ("to_json", "as_dict", "to_dict"):
        fn = getattr(stats, attr, None)
        if callable(fn):
            return fn()
    try:
        from dataclasses import asdict, is_dataclass

        if is_dataclass(stats) and not isinstance(stats, type):
            return asdict(stats)
    except TypeError:
        pass
    return stats if isinstance(stats, dict) else str(stats)
