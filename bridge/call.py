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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.ari.errors import AriError, AriNotFound, AriUnprocessable
from bridge.ari.models import (
    AriEvent,
    AriEventError,
    Channel,
    ChannelDestroyed,
    ChannelDtmfReceived,
    ChannelHangupRequest,
    ChannelHold,
    ChannelUnhold,
    Dial,
    PlaybackFinished,
    StasisEnd,
    StasisStart,
)
from bridge.backoff import Backoff
from bridge.call_deps import (
    CallInfo,
    CallRoute,
    EngineCannotTakeCall,
    EngineLink,
    MediaLink,
    MediaUnavailable,
)
from bridge.media.metrics import media_gauges
from bridge.media.prometheus import MEDIA_METRICS

if TYPE_CHECKING:
    from bridge.controller import CallController

log = logging.getLogger(__name__)

MEDIA_CHANNEL_PREFIX = "aziza-media-"
BRIDGE_PREFIX = "aziza-bridge-"
TRANSFER_CHANNEL_PREFIX = "aziza-xfer-"
# First Stasis argument of a transfer target's channel: it joins a call, it is never a call of its own.
TRANSFER_APP_ARG = "aziza-transfer"
TEARDOWN_TIMEOUT_S = 3.0
MEDIA_STASIS_TIMEOUT_S = 5.0
ADD_CHANNEL_RETRIES = 3
GOODBYE_MAX_S = 5.0


class CallState(enum.Enum):
    SETUP = "setup"
    ACTIVE = "active"
    HELD = "held"
    TRANSFERRED = "transferred"  # the caller talks to the transfer target; no agent, no slot
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
    """A parsed transfer target: a dialplan location or an endpoint to dial."""

    kind: str  # "dialplan" | "endpoint"
    extension: str = ""
    context: str | None = None
    priority: int = 1
    endpoint: str = ""

    def dial_string(self, default_context: str) -> str:
        """What the transfer dials. A dialplan target through a Local channel without optimisation
        (``/n``): the channel that answers stays the one we bridged, so its hang-up ends the call."""
        if self.kind == "endpoint":
            return self.endpoint
        return f"Local/{self.extension}@{self.context or default_context}/n"


@dataclass(frozen=True)
class TransferOutcome:
    """How a transfer attempt ended: ``answered``, or the reason the caller is back with the agent."""

    target: str
    answered: bool
    reason: str  # "answered" | invalid_extension | busy | no_answer | unavailable | congestion | ...

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "outcome": "answered" if self.answered else "failed",
                "reason": self.reason}


# Q.850 causes of a target that hung up before answering -> the outcome's reason.
_FAILURE_BY_CAUSE = {
    1: "invalid_extension", 3: "invalid_extension", 17: "busy", 18: "no_answer", 19: "no_answer",
    20: "unavailable", 21: "rejected", 27: "unavailable", 34: "congestion", 38: "congestion",
    41: "congestion", 42: "congestion",
}
# Dial event statuses that end an attempt (ARI's Dial.dialstatus).
_FAILURE_BY_DIALSTATUS = {
    "BUSY": "busy", "NOANSWER": "no_answer", "CHANUNAVAIL": "unavailable", "CONGESTION": "congestion",
    "CANCEL": "no_answer",
}


def parse_transfer_target(target: str, channel_name: str) -> TransferTarget:
    """Dialplan targets: Goto style ``[context,]exten[,priority]`` (as the DID table stores them) or
    ``exten@context[:priority]``; the priority must be 1 (a Local channel starts there). ``sip:…`` is
    dialled through the caller's own endpoint (``PJSIP/<endpoint>/sip:…``); ``TECH/resource`` as given."""
    target = target.strip()
    if not target or any(c.isspace() for c in target):
        raise ValueError(f"bad transfer target {target!r}")
    lowered = target.lower()
    if lowered.startswith(("sip:", "sips:")):
        tech, _, rest = channel_name.partition("/")
        endpoint = rest.rpartition("-")[0] if "-" in rest else rest
        if not tech or not endpoint:
            raise ValueError(f"cannot dial {target!r}: caller channel {channel_name!r} names no endpoint")
        return TransferTarget("endpoint", endpoint=f"{tech}/{endpoint}/{target}")
    if "/" in target:
        tech, _, resource = target.partition("/")
        if not tech or not resource:
            raise ValueError(f"bad transfer endpoint {target!r}")
        return TransferTarget("endpoint", endpoint=target)
    if "," in target:
        parts = target.split(",")
        if len(parts) == 2:
            parts = [*parts, "1"]
        if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
            raise ValueError(f"bad dialplan target {target!r}")
        context, extension, priority = parts[0], parts[1], int(parts[2])
    else:
        extension, _, rest = target.partition("@")
        context_part, _, prio = rest.partition(":")
        if not extension or ("@" in target and not context_part):
            raise ValueError(f"bad dialplan target {target!r}")
        if prio and not prio.isdigit():
            raise ValueError(f"bad dialplan priority in {target!r}")
        context, priority = context_part, int(prio or "1")
    if priority != 1:
        raise ValueError(f"transfer target {target!r}: priority {priority}: a transfer starts at priority 1")
    if any(c in "@/,:" for c in extension + (context or "")):
        raise ValueError(f"bad dialplan target {target!r}")
    return TransferTarget("dialplan", extension=extension, context=context or None)


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
        self.transfer_attempts: list[dict[str, Any]] = []  # every attempt's outcome (on the record)
        self.transfer_channel_id: str | None = None  # the target's channel of the current/last attempt
        self._goodbye_playback_id: str | None = None
        self._goodbye_started = asyncio.Event()
        self._transfer_waiter: asyncio.Future[TransferOutcome] | None = None  # while a target rings
        self._ringing_target: str | None = None
        self._transfer_hint: str | None = None  # a failure reason from the target's Dial event
        self._transfer_channel_gone = False
        self._agent_released = False  # engine, media and slot given up (a completed transfer)
        self._recorded = False  # the call record's end was written
        self._tg: asyncio.TaskGroup | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
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
        extra = (self.transfer_channel_id,) if self.transfer_channel_id else ()
        return (self.id, self.media_channel_id, self.bridge_id, *extra)

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
        elif self.state not in (CallState.ENDING, CallState.ENDED):
            self.state = CallState.ENDING  # a transferred call's reason was fixed when the target answered
            log.info("call %s ending (%s): %s", self.id, self.end_reason, reason)
        self._settle_transfer(TransferOutcome(self._ringing_target or "", False, "call_ended"))
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
                self._tg = tg
                tasks = [
                    tg.create_task(self._guard(self._process_events), name=f"call-{self.id}-events"),
                    tg.create_task(self._guard(self._setup_and_run), name=f"call-{self.id}-media"),
                    tg.create_task(self._guard(self._goodbye_watchdog), name=f"call-{self.id}-goodbye"),
                ]
                await self._ended.wait()
                for task in [*tasks, *self._side_tasks]:
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
        if self.state is CallState.TRANSFERRED:
            return  # stopped on purpose: the caller went on to the transfer target
        self.end(f"media:{_reason_text(self.media_result)}")

    async def _setup(self) -> None:
        ctl, ari = self.ctl, self.ctl.ari
        self.route = await ctl.resolve_route(self.did)
        info = CallInfo(self.id, self.did, self.caller_number, self.route.persona.name, self.channel.name,
                        language=self.route.persona.language)
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
        assert self.engine is not None
        # The media socket before the answer: a call whose media cannot be set up is refused (503), not
        # answered and dropped.
        self.media = ctl.deps.make_media(self.engine, self.id)
        try:
            _, local_port = await self.media.bind()
        except MediaUnavailable as exc:
            log.warning("call %s: media unavailable: %s", self.id, exc)
            await self._refuse(info, "media_unavailable", "congestion")
        ctl.deps.sink.started(info)
        MEDIA_METRICS.session_started(self.route.persona.name, self.route.persona.language, "phone")
        ready = getattr(self.engine, "ready", None)
        if ready is not None:  # the engine's seed (replay) and warnings go on the call record
            ctl.deps.sink.event(self.id, "engine", {"url": getattr(self.engine, "url", None),
                                                    "seed": ready.seed, "warnings": list(ready.warnings)})
            for warning in ready.warnings:
                log.warning("call %s: engine: %s", self.id, warning)
        await ari.answer(self.id)
        self.timeline["answered"] = self._clock()
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
        if isinstance(event, Dial):
            if event.peer.id == self.transfer_channel_id and event.dialstatus in _FAILURE_BY_DIALSTATUS:
                self._transfer_hint = _FAILURE_BY_DIALSTATUS[event.dialstatus]
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
                if not self._agent_released:  # after a transfer we hung it up ourselves
                    self.end("media_channel_gone")
            return
        if channel_id == self.transfer_channel_id:
            self._on_transfer_channel_event(event)
            return
        if channel_id != self.id:
            return
        if isinstance(event, ChannelHangupRequest | ChannelDestroyed):
            self._caller_gone = True
            self.end("caller_hangup")
        elif isinstance(event, StasisEnd):
            self._caller_gone = True
            self.end("caller_left_stasis")
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
            # On its own task: the attempt waits for events this task delivers.
            self._spawn(self._dtmf_transfer(self.route.transfer_target), "transfer")
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
        if self._transfer_waiter is not None:
            raise CallStateError("a transfer is ringing")
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
        if self._transfer_waiter is not None:
            raise CallStateError("a transfer is ringing")
        await self.ctl.ari.stop_moh(self.id)
        await self.ctl.ari.unhold(self.id)
        self.state = CallState.ACTIVE
        if not self.far_end_held:
            self._resume_media("operator")

    async def transfer(self, target: str) -> TransferOutcome:
        """Attended-by-the-bridge blind transfer. The target is dialled while the caller hears music on
        hold and the agent is paused. Answered: the target joins the caller's bridge, the engine session
        ends, the slot frees and the record says "transferred". Anything else (no such extension, busy,
        no answer, unavailable): the caller is back with the agent and the failure is on the record."""
        if self.state not in (CallState.ACTIVE, CallState.HELD):
            raise CallStateError(f"call is {self.state.value}, cannot transfer")
        if self._transfer_waiter is not None:
            raise CallStateError("a transfer is already ringing")
        parsed = parse_transfer_target(target, self.channel.name)
        self._transfer_waiter = asyncio.get_running_loop().create_future()
        self._ringing_target = target
        try:
            outcome = await self._attempt_transfer(target, parsed)
        finally:
            self._transfer_waiter = None
            self._ringing_target = None
        if not outcome.answered:  # (an answered one is listed before the record is written)
            self.transfer_attempts.append(outcome.to_json())
            self.ctl.deps.sink.event(self.id, "transfer_failed", outcome.to_json())
            log.info("call %s: transfer to %s failed (%s); back with the agent", self.id, target,
                     outcome.reason)
        return outcome

    async def _dtmf_transfer(self, target: str) -> None:
        try:
            await self.transfer(target)
        except (ValueError, CallStateError) as exc:
            log.warning("call %s: DTMF transfer: %s", self.id, exc)
            self.ctl.deps.sink.event(self.id, "transfer_failed",
                                     {"target": target, "outcome": "failed", "reason": "refused",
                                      "detail": str(exc)})

    async def _attempt_transfer(self, target: str, parsed: TransferTarget) -> TransferOutcome:
        ari, settings = self.ctl.ari, self.ctl.settings.ari
        default_context = self.channel.dialplan.context
        if parsed.kind == "dialplan":
            # Asterisk would accept a dial into a missing extension and then drop the caller: ask first.
            context = parsed.context or default_context
            try:
                exists = await ari.get_channel_var(
                    self.id, f"DIALPLAN_EXISTS({context},{parsed.extension},1)")
            except (AriError, AriEventError) as exc:
                log.warning("call %s: cannot check %s in the dialplan (%s); dialling anyway", self.id,
                            target, exc)
                exists = "1"
            if exists.strip() != "1":
                return TransferOutcome(target, False, "invalid_extension")
        was_held = self.state is CallState.HELD
        self._pause_media("transfer")
        if not was_held:
            try:
                await ari.start_moh(self.id, settings.moh_class)
            except AriError as exc:  # no music is no reason to give up the transfer
                log.warning("call %s: music while the transfer rings: %s", self.id, exc)
        self.transfer_channel_id = TRANSFER_CHANNEL_PREFIX + uuid.uuid4().hex[:16]
        self._transfer_hint = None
        self._transfer_channel_gone = False
        self.ctl.register_channel(self.transfer_channel_id, self)
        assert self._transfer_waiter is not None
        try:
            await ari.originate(
                endpoint=parsed.dial_string(default_context), app=settings.app,
                app_args=f"{TRANSFER_APP_ARG},{self.id}", channel_id=self.transfer_channel_id,
                caller_id=self.caller_number or None, timeout_s=settings.transfer_timeout_s,
                originator=self.id,
            )
        except AriError as exc:
            log.warning("call %s: transfer to %s: %s", self.id, target, exc)
            self._transfer_channel_gone = True
            outcome = TransferOutcome(target, False, "unavailable")
        else:
            try:
                # Asterisk gives up after transfer_timeout_s itself; this bound only guards a lost event.
                async with asyncio.timeout(settings.transfer_timeout_s + 5):
                    outcome = await asyncio.shield(self._transfer_waiter)
            except TimeoutError:
                outcome = TransferOutcome(target, False, "no_answer")
        if outcome.answered:
            try:
                await self._complete_transfer(target, was_held)
                return outcome
            except AriError as exc:  # the target hung up between answering and joining
                log.warning("call %s: joining the transfer target: %s", self.id, exc)
                outcome = TransferOutcome(target, False, "target_hung_up")
        await self._abandon_transfer(was_held)
        return outcome

    def _on_transfer_channel_event(self, event: AriEvent) -> None:
        if isinstance(event, StasisStart):  # it answered (an originate enters Stasis on answer)
            self._settle_transfer(TransferOutcome(self._ringing_target or "", True, "answered"))
        elif isinstance(event, ChannelHangupRequest | ChannelDestroyed | StasisEnd):
            if isinstance(event, ChannelDestroyed):
                self._transfer_channel_gone = True
            if self.state is CallState.TRANSFERRED:
                self.end("transfer_target_hangup")
                return
            cause = event.cause if isinstance(event, ChannelHangupRequest | ChannelDestroyed) else 0
            reason = self._transfer_hint or _FAILURE_BY_CAUSE.get(cause, f"failed:cause_{cause}")
            self._settle_transfer(TransferOutcome(self._ringing_target or "", False, reason))

    def _settle_transfer(self, outcome: TransferOutcome) -> None:
        waiter = self._transfer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def _complete_transfer(self, target: str, was_held: bool) -> None:
        ari = self.ctl.ari
        assert self.transfer_channel_id is not None
        await ari.add_channel(self.bridge_id, [self.transfer_channel_id])
        with contextlib.suppress(AriError):
            await ari.stop_moh(self.id)
        if was_held:
            with contextlib.suppress(AriError):
                await ari.unhold(self.id)
        self.state = CallState.TRANSFERRED  # before the agent goes: its channel's events must not end us
        self.transferred_to = target
        self._claim_end_reason("transferred")
        self.transfer_attempts.append(TransferOutcome(target, True, "answered").to_json())
        self.ctl.deps.sink.event(self.id, "transfer", {"target": target, "outcome": "answered"})
        log.info("call %s: transferred to %s (answered)", self.id, target)
        await self._release_agent()
        self._record_end()

    async def _abandon_transfer(self, was_held: bool) -> None:
        """Back to the agent: the target's channel goes, the music stops, the agent resumes."""
        ari = self.ctl.ari
        if self.transfer_channel_id is not None and not self._transfer_channel_gone:
            with contextlib.suppress(AriError):
                await _gone_ok(ari.hangup(self.transfer_channel_id, reason="normal"))
        if self.end_reason is not None:
            return  # the call is ending anyway
        if not was_held:
            with contextlib.suppress(AriError):
                await ari.stop_moh(self.id)
            if self.state is CallState.ACTIVE and not self.far_end_held:
                self._resume_media("transfer_failed")

    async def _release_agent(self) -> None:
        """A completed transfer: the engine session, the media path and the slot are given up now; the
        caller and the target stay bridged until one of them hangs up."""
        self._agent_released = True
        steps: list[Awaitable[Any]] = [self._stop_media_then_engine()]
        if self._media_channel_tried and not self._media_channel_gone:
            steps.append(_gone_ok(self.ctl.ari.hangup(self.media_channel_id, reason="normal")))
        if self.lease is not None:
            lease, self.lease = self.lease, None
            steps.append(self.ctl.deps.capacity.release(lease))
        results = await asyncio.gather(
            *(_bounded(step, TEARDOWN_TIMEOUT_S) for step in steps), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("call %s: releasing the agent: %s: %s", self.id, type(result).__name__, result)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        if self._tg is None or self._ended.is_set():
            coro.close()
            return
        task = self._tg.create_task(self._guard_named(coro, what), name=f"call-{self.id}-{what}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _guard_named(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("call %s: %s failed", self.id, what)
            self.end(f"internal_error:{type(exc).__name__}")

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
        steps: list[Awaitable[Any]] = [] if self._agent_released else [self._stop_media_then_engine()]
        if not self._caller_gone:
            steps.append(_gone_ok(ari.hangup(self.id, reason="normal")))
        if self._bridge_tried:
            steps.append(_gone_ok(ari.destroy_bridge(self.bridge_id)))
        if self._media_channel_tried and not self._media_channel_gone:
            steps.append(_gone_ok(ari.hangup(self.media_channel_id, reason="normal")))
        if self.transfer_channel_id is not None and not self._transfer_channel_gone:
            steps.append(_gone_ok(ari.hangup(self.transfer_channel_id, reason="normal")))
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
            self._record_end()
        self.ctl.forget(self)

    def _record_end(self) -> None:
        """The call record's end, written once: at teardown, or when a transfer target answered."""
        if self._recorded:
            return
        self._recorded = True
        self.ctl.deps.sink.ended(
            self.id,
            self.end_reason or "unknown",
            self.summary(),
            _transcript(self.media),
            "".join(self.dtmf_digits),
        )

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
        if self.transfer_attempts:
            out["transfers"] = list(self.transfer_attempts)
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
            "transferred_to": self.transferred_to,
            "transfer_channel_id": self.transfer_channel_id,
        } | (media_gauges(self.media) if self.media is not None else {})  # latency_ms, turns, ttfb_ms


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
