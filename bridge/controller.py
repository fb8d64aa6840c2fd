"""The Stasis app: turns ARI events into calls, keeps them, reconciles after reconnects.

Event routing is the only thing done inline on the event-socket reader (cheap, in arrival order);
each call processes its own events in order on its own task, so calls never wait for each other.
The controller owns one TaskGroup holding every live call's task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.ari.client import AriClient
from bridge.ari.errors import AriError, AriNotFound
from bridge.ari.models import AriEvent, Channel, ChannelEvent, Dial, PlaybackFinished, StasisStart
from bridge.call import BRIDGE_PREFIX, MEDIA_CHANNEL_PREFIX, TRANSFER_APP_ARG, TRANSFER_CHANNEL_PREFIX, Call
from bridge.call_deps import CallDeps, CallRoute, CapacityReport, CapacityReporting
from bridge.config import Settings
from bridge.media.metrics_fanin import MEDIA_FANIN

log = logging.getLogger(__name__)


class UnknownCall(KeyError):
    """No live call with that id."""


class ControllerMetrics:
    """Prometheus metrics on a registry of their own (one per controller, so tests can run many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("aziza_ari_events_total", "ARI events received", ["type"], registry=r)
        self.events_unrouted = Counter(
            "aziza_ari_events_unrouted_total", "ARI events for channels of no live call", registry=r
        )
        self.calls = Counter("aziza_calls_total", "Calls by how they ended", ["outcome"], registry=r)
        self.active = Gauge("aziza_calls_active", "Live calls", registry=r)
        self.setup_s = Histogram(
            "aziza_call_setup_seconds", "StasisStart to media up", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.teardown_s = Histogram(
            "aziza_call_teardown_seconds", "End requested to torn down", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3),
        )
        self.reconciles = Counter(
            "aziza_ari_reconcile_total", "Reconciliations after (re)connect", ["result"], registry=r
        )
        r.register(MEDIA_FANIN)  # the media path's numbers (bridge/media/prometheus.py), workers' included
        self._capacity: Callable[[], CapacityReport] | None = None
        r.register(_CapacityCollector(self))

    def watch_capacity(self, report: Callable[[], CapacityReport]) -> None:
        """Where the scrape reads the capacity gate (the gate keeps its own counts: the refusals and lost
        leases happen in it, for phone calls and browser talks alike)."""
        self._capacity = report


class _CapacityCollector(Collector):
    """The ``aziza_capacity_*`` families, absent when the gate cannot report (test stand-ins)."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        read = self._metrics._capacity
        if read is None:
            return
        rep = read()
        yield GaugeMetricFamily("aziza_capacity_slots", "Configured capacity: slots (calls + browser talks)",
                                value=rep.slots)
        yield GaugeMetricFamily("aziza_capacity_leases_held", "Capacity leases this bridge holds now",
                                value=rep.held)
        yield CounterMetricFamily("aziza_capacity_refused_full", "Calls and talks refused: every slot taken",
                                  value=rep.refused_full)
        yield CounterMetricFamily("aziza_capacity_leases_lost", "Leases Redis had lost, put back by renewal",
                                  value=rep.leases_lost)
        yield CounterMetricFamily("aziza_capacity_renew_failures",
                                  "Lease renewal rounds Redis did not answer", value=rep.renew_failures)


@dataclass
class ReconcileReport:
    ended_calls: list[str]
    deleted_channels: list[str]
    deleted_bridges: list[str]
    adopted_calls: list[str]


class CallController:
    def __init__(
        self,
        settings: Settings,
        ari: AriClient,
        deps: CallDeps,
        *,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ari = ari
        self.deps = deps
        self.metrics = metrics or ControllerMetrics()
        if isinstance(deps.capacity, CapacityReporting):
            self.metrics.watch_capacity(deps.capacity.capacity_report)
        self.clock = clock
        self.calls: dict[str, Call] = {}
        self._owner: dict[str, Call] = {}  # caller and media channel ids -> call
        self._tg: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        self.finished: list[dict[str, Any]] = []  # recent ended calls (bounded), for /calls and tests
        self.events_handled = 0

    # ---- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the calls' TaskGroup until cancelled; cancelling tears every live call down."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._running.set()
            try:
                await asyncio.Future()
            finally:
                self._running.clear()
                self._tg = None

    async def wait_running(self) -> None:
        await self._running.wait()

    async def end_all(self, reason: str = "shutdown", wait_s: float = 5.0) -> None:
        calls = list(self.calls.values())
        for call in calls:
            call.end(reason)
        waiters = [asyncio.ensure_future(c.done.wait()) for c in calls]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=wait_s)
            for waiter in pending:
                waiter.cancel()

    # ---- events --------------------------------------------------------------------------------

    async def handle_event(self, event: AriEvent) -> None:
        """Route one event (called in arrival order by the event stream; never blocks, never raises)."""
        self.events_handled += 1
        self.metrics.events.labels(event.type).inc()
        if isinstance(event, PlaybackFinished | Dial):
            key = event.playback.channel_id if isinstance(event, PlaybackFinished) else event.peer.id
            owner = self._owner.get(key or "")
            if owner is not None:
                owner.queue.put_nowait(event)
            return
        if not isinstance(event, ChannelEvent):
            return
        channel = event.channel
        call = self._owner.get(channel.id)
        if call is not None:
            call.queue.put_nowait(event)
            return
        if isinstance(event, StasisStart) and event.args[:1] == (TRANSFER_APP_ARG,):
            # A transfer target that answered after its call was gone: nobody to join.
            self._hang_up_orphan(channel.id)
            return
        if isinstance(event, StasisStart) and not channel.is_unicast_rtp:
            self._start_call(channel, event.args)
            return
        self.metrics.events_unrouted.inc()

    def _start_call(self, channel: Channel, args: tuple[str, ...]) -> Call | None:
        if self._tg is None:
            log.error("call %s arrived before the controller runs; ignored", channel.id)
            return None
        call = Call(self, channel, args, clock=self.clock)
        self.calls[call.id] = call
        self._owner[call.id] = call
        self.metrics.active.set(len(self.calls))
        self._tg.create_task(self._supervise(call), name=f"call-{call.id}")
        return call

    async def _supervise(self, call: Call) -> None:
        """A call's failure is that call's problem only: never let it cancel the other calls."""
        try:
            await call.run()
        except Exception:
            log.exception("call %s crashed", call.id)
            self.forget(call)

    def _hang_up_orphan(self, channel_id: str) -> None:
        if self._tg is not None:
            self._tg.create_task(_ignore_gone(self.ari.hangup(channel_id)), name=f"orphan-{channel_id}")

    def register_channel(self, channel_id: str, call: Call) -> None:
        """A call's media channel: its events (from its own StasisStart on) go to the call."""
        self._owner[channel_id] = call

    def forget(self, call: Call) -> None:
        """Called by a call at the end of its teardown (idempotent)."""
        if self.calls.get(call.id) is not call:
            return
        del self.calls[call.id]
        for key in (call.id, call.media_channel_id, call.transfer_channel_id):
            if key is not None and self._owner.get(key) is call:
                del self._owner[key]
        self.metrics.active.set(len(self.calls))
        outcome = "refused" if call.refused else (call.end_reason or "unknown").split(":")[0]
        self.metrics.calls.labels(outcome).inc()
        tl = call.timeline
        if "media_up" in tl:
            self.metrics.setup_s.observe(tl["media_up"] - tl["stasis_start"])
        if "end_requested" in tl and "torn_down" in tl:
            self.metrics.teardown_s.observe(tl["torn_down"] - tl["end_requested"])
        self.finished.append(call.describe() | {"summary": call.summary(), "refused": call.refused})
        del self.finished[:-200]

    async def resolve_route(self, did: str) -> CallRoute:
        try:
            return await self.deps.routes.resolve(did)
        except Exception as exc:  # the resolver should not raise; never let it cost the call
            log.error("route for %s failed (%s); default persona", did, exc)
            return CallRoute(did=did)

    # ---- control API ---------------------------------------------------------------------------

    def get(self, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall(call_id)
        return call

    def live_calls(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.calls.values()]

    # ---- reconnect -----------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """After (re)connecting: end calls whose channels vanished while we were deaf, delete our
        orphaned media channels and bridges, and adopt callers who entered Stasis meanwhile."""
        report = ReconcileReport([], [], [], [])
        try:
            channels = await self.ari.list_channels()
            bridges = await self.ari.list_bridges()
        except (AriError, ValueError) as exc:  # unreachable, or an answer we cannot parse
            self.metrics.reconciles.labels("failed").inc()
            log.error("reconcile failed: %s", exc)
            return report
        present = {c.id for c in channels}
        owned: set[str] = set()
        for call in list(self.calls.values()):
            owned.update(call.owned_ids)
            if call.id not in present:
                call.note_caller_gone()
                call.end("caller_gone_while_disconnected")
                report.ended_calls.append(call.id)
            elif call.media_channel_ready and call.media_channel_id not in present:
                call.note_media_channel_gone()
                call.end("media_channel_gone_while_disconnected")
                report.ended_calls.append(call.id)
        cleanups: list[asyncio.Task[None]] = []
        for ch in channels:
            if ch.id.startswith((MEDIA_CHANNEL_PREFIX, TRANSFER_CHANNEL_PREFIX)) and ch.id not in owned:
                report.deleted_channels.append(ch.id)
                cleanups.append(asyncio.ensure_future(_ignore_gone(self.ari.hangup(ch.id))))
            elif (
                not ch.is_unicast_rtp
                and ch.id not in self._owner
                and ch.dialplan.app_name.lower() == "stasis"
                and ch.dialplan.app_data.split(",")[0].strip() == self.settings.ari.app
            ):
                args = tuple(a.strip() for a in ch.dialplan.app_data.split(",")[1:])
                if self._start_call(ch, args) is not None:
                    report.adopted_calls.append(ch.id)
        for br in bridges:
            if br.id.startswith(BRIDGE_PREFIX) and br.id not in owned:
                report.deleted_bridges.append(br.id)
                cleanups.append(asyncio.ensure_future(_ignore_gone(self.ari.destroy_bridge(br.id))))
        if cleanups:
            await asyncio.gather(*cleanups)
        self.metrics.reconciles.labels("ok").inc()
        if report.ended_calls or report.deleted_channels or report.deleted_bridges or report.adopted_calls:
            log.info("reconcile: %s", report)
        return report


async def _ignore_gone(aw: Any) -> None:
    try:
        await aw
    except AriNotFound:
        pass
    except AriError as exc:
        log.warning("reconcile cleanup: %s", exc)
