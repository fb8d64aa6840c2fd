"""The media path's numbers for the bridge's ``/metrics`` (Prometheus), read when scraped.

Nothing here runs per packet: each call already counts into its own :class:`MediaStats` (plain ints and
fixed-bucket histograms), and :class:`MediaMetrics` sums the live calls' stats plus those of the calls that
ended, at scrape time. Labels are bounded: no call ids; the one labelled family (``reason`` of dropped
datagrams) maps every reason outside :data:`DROP_REASONS` to ``other``.

One :data:`MEDIA_METRICS` per process: ``CallMedia.run`` registers its call, the browser channel its talks,
and the controller's registry exposes it (``ControllerMetrics``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from bridge.media.metrics import DEPTH_BUCKETS, Histogram, MediaStats

#: Prometheus bucket upper bounds (seconds) of the latency histograms.
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.030, 0.050, 0.100, 0.200, 0.500)
#: ...of time to first byte (caller turn end -> first agent audio, bridge/media/turns.py): 120 ms is the
#: acceptance threshold, so it is a bound.
TTFB_BUCKETS_S = (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
#: Distinct persona label values kept on the per-persona counter; personas beyond it count as "other"
#: (personas are few and made by admins, but a label must stay bounded whatever the database holds).
MAX_PERSONA_LABELS = 64
#: ...and of the pacing one (how late the bridge's sends left their 20 ms grid).
PACING_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.010, 0.020)
DROP_REASONS = frozenset({
    "foreign_source", "not_locked", "payload_type", "ssrc", "size", "held", "truncated", "oversized",
    "version", "rtcp", "padding", "extension",
})

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    # (metric name, MediaStats field, help)
    ("aziza_media_rtp_in_packets", "rtp_in", "RTP packets accepted from callers"),
    ("aziza_media_rtp_out_packets", "rtp_out", "RTP packets sent to callers"),
    ("aziza_media_slots_concealed", "slots_concealed", "Inbound 20 ms slots concealed (loss, late)"),
    ("aziza_media_input_rephased", "rtp_in_rephased", "Input grid moved earlier: every packet had waited"),
    ("aziza_media_input_slots_won_back", "rtp_in_won_back", "Input slots won back after an underrun"),
    ("aziza_media_output_late_cuts", "rtp_out_late_dropped", "Engine audio packets cut: their slot went"),
    ("aziza_media_output_slots_inserted", "rtp_out_expanded", "Output slots inserted for late frames"),
    ("aziza_media_output_slots_won_back", "rtp_out_shrunk", "Output slots taken out again (quiet first)"),
    ("aziza_media_output_slots_kept", "rtp_out_kept", "Inserted slots kept: the engine's phase moved later"),
    ("aziza_media_output_holds", "rtp_out_waited", "First packets held back up to the grace for their frame"),
    ("aziza_media_output_silence", "rtp_out_silence", "Output packets of silence (nothing from the engine)"),
    ("aziza_media_output_skipped", "rtp_out_skipped", "Output slots skipped after a stall of the bridge"),
    ("aziza_media_output_resyncs", "rtp_out_resyncs", "Engine frame numbering re-anchored on the timeline"),
    ("aziza_media_engine_frames_lost", "engine_frames_lost", "Gaps in the engine's output frame numbers"),
    ("aziza_media_frames_to_engine_dropped", "frames_to_engine_dropped", "Input frames refused (stuck)"),
    ("aziza_media_junk_floods", "junk_floods", "Calls' junk budgets running out (socket polled, not read)"),
)


class JitterDepthSource(Protocol):
    """What the collector reads of a call's input: its jitter buffer's lost-packet count."""

    @property
    def lost_packets(self) -> int: ...


class MediaMetrics(Collector):
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (scrapes may come from another thread than the calls' loop)
        self._live: dict[int, tuple[MediaStats, JitterDepthSource]] = {}
        self._ended = MediaStats()
        self._ended_lost = 0
        self._ended_depths = np.zeros(len(DEPTH_BUCKETS) + 1, dtype=np.int64)
        self._calls_total = 0
        self.browser_talks_active = 0
        self.browser_talks_total = 0
        self._ended_ttfb = np.zeros(len(TTFB_BUCKETS_S) + 1, dtype=np.int64)
        self._ended_ttfb_sum_s = 0.0
        self._ended_turns = 0
        self._ended_unanswered = 0
        self._sessions: dict[tuple[str, str, str], int] = {}  # (persona, language, channel) -> started

    # -- registration ----------------------------------------------------------------------------------

    def call_started(self, stats: MediaStats, inbound: JitterDepthSource) -> None:
        with self._lock:
            self._live[id(stats)] = (stats, inbound)
            self._calls_total += 1

    def call_ended(self, stats: MediaStats) -> None:
        with self._lock:
            entry = self._live.pop(id(stats), None)
            if entry is None:
                return
            _, inbound = entry
            ended = self._ended
            for _, field, _ in _COUNTERS:
                setattr(ended, field, getattr(ended, field) + getattr(stats, field))
            for reason, count in stats.rtp_dropped.items():
                key = reason if reason in DROP_REASONS else "other"
                ended.rtp_dropped[key] = ended.rtp_dropped.get(key, 0) + count
            for name in ("added_latency_ms", "send_lateness_ms", "socket_wait_ms"):
                getattr(ended, name).merge(getattr(stats, name))
            self._ended_lost += inbound.lost_packets
            turns = stats.turns
            self._ended_ttfb += _ttfb_counts(turns.ttfb_ms)
            self._ended_ttfb_sum_s += sum(turns.ttfb_ms) / 1000.0
            self._ended_turns += turns.turns
            self._ended_unanswered += turns.unanswered
            self._ended_depths += np.frombuffer(stats.jitter_depths, dtype=np.int64)

    def session_started(self, persona: str, language: str, channel: str) -> None:
        """A phone call (``channel`` "phone") or browser talk ("browser") got its engine session."""
        with self._lock:
            personas = {key[0] for key in self._sessions}
            if persona not in personas and len(personas) >= MAX_PERSONA_LABELS:
                persona = "other"
            key = (persona, language, channel)
            self._sessions[key] = self._sessions.get(key, 0) + 1

    def browser_talk_started(self) -> None:
        self.browser_talks_active += 1
        self.browser_talks_total += 1

    def browser_talk_ended(self) -> None:
        self.browser_talks_active = max(0, self.browser_talks_active - 1)

    # -- scrape ------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with self._lock:
            live = list(self._live.values())
            every = [self._ended, *(stats for stats, _ in live)]
            lost = self._ended_lost + sum(inbound.lost_packets for _, inbound in live)
            depths = self._ended_depths.copy()
            for stats, _ in live:
                depths += np.frombuffer(stats.jitter_depths, dtype=np.int64)
            calls_total = self._calls_total
            ttfb = self._ended_ttfb.copy()
            ttfb_sum_s = self._ended_ttfb_sum_s
            turns = self._ended_turns
            unanswered = self._ended_unanswered
            for stats, _ in live:
                ttfb += _ttfb_counts(stats.turns.ttfb_ms)
                ttfb_sum_s += sum(stats.turns.ttfb_ms) / 1000.0
                turns += stats.turns.turns
                unanswered += stats.turns.unanswered
            sessions = dict(self._sessions)
        yield GaugeMetricFamily("aziza_active_sessions", "Sessions talking to the engine through this "
                                "bridge: phone calls with media up plus browser talks",
                                value=len(live) + self.browser_talks_active)
        cumulative_ttfb = np.cumsum(ttfb)
        yield HistogramMetricFamily(
            "aziza_ttfb_seconds", "Caller turn end to the first agent audio sent (bridge/media/turns.py)",
            buckets=[*((repr(b), int(c)) for b, c in zip(TTFB_BUCKETS_S, cumulative_ttfb, strict=False)),
                     ("+Inf", int(cumulative_ttfb[-1]))],
            sum_value=ttfb_sum_s,
        )
        yield CounterMetricFamily("aziza_turns", "Caller turns ended", value=turns)
        yield CounterMetricFamily("aziza_turns_unanswered", "Caller turns with no agent audio after them",
                                  value=unanswered)
        by_persona = CounterMetricFamily(
            "aziza_sessions", "Sessions started, by persona, language and channel (phone, browser)",
            labels=["persona", "language", "channel"],
        )
        for (persona, language, channel), count in sorted(sessions.items()):
            by_persona.add_metric([persona, language, channel], count)
        yield by_persona
        yield GaugeMetricFamily("aziza_media_calls_active", "Calls whose media runs in this process",
                                value=len(live))
        yield CounterMetricFamily("aziza_media_calls", "Calls whose media ran in this process",
                                  value=calls_total)
        yield GaugeMetricFamily("aziza_browser_talks_active", "Browser talks open",
                                value=self.browser_talks_active)
        yield CounterMetricFamily("aziza_browser_talks", "Browser talks opened",
                                  value=self.browser_talks_total)
        for name, field, help_text in _COUNTERS:
            yield CounterMetricFamily(name, help_text, value=sum(getattr(s, field) for s in every))
        yield CounterMetricFamily("aziza_media_packets_lost", "Inbound packets lost (never came)", value=lost)
        dropped = CounterMetricFamily("aziza_media_rtp_dropped", "Inbound datagrams dropped, by reason",
                                      labels=["reason"])
        by_reason: dict[str, int] = {}
        for s in every:
            for reason, count in s.rtp_dropped.items():
                key = reason if reason in DROP_REASONS else "other"
                by_reason[key] = by_reason.get(key, 0) + count
        for reason in sorted(by_reason):
            dropped.add_metric([reason], by_reason[reason])
        yield dropped
        yield _histogram("aziza_media_added_latency_seconds",
                         "What the bridge adds to a frame's delay (not framing, not jitter buffer)",
                         [s.added_latency_ms for s in every], LATENCY_BUCKETS_S)
        yield _histogram("aziza_media_pacing_lateness_seconds",
                         "How late output packets left their 20 ms grid (the bridge's own lateness)",
                         [s.send_lateness_ms for s in every], PACING_BUCKETS_S)
        yield _histogram("aziza_media_socket_wait_seconds",
                         "How long inbound RTP waited in its socket (the newest datagram of each read)",
                         [s.socket_wait_ms for s in every], PACING_BUCKETS_S)
        cumulative = np.cumsum(depths)
        yield HistogramMetricFamily(
            "aziza_media_jitter_buffer_depth_packets",
            "Packets the jitter buffer held as a frame's last slot was played",
            buckets=[*((str(b), int(c)) for b, c in zip(DEPTH_BUCKETS, cumulative, strict=False)),
                     ("+Inf", int(cumulative[-1]))],
            sum_value=float(np.dot(depths[:-1], DEPTH_BUCKETS)) + float(depths[-1]) * (DEPTH_BUCKETS[-1] + 1),
        )


def _ttfb_counts(ttfb_ms: list[float]) -> np.ndarray:
    """Per-bucket (not cumulative) counts of TTFB values over TTFB_BUCKETS_S, the last: beyond them."""
    if not ttfb_ms:
        return np.zeros(len(TTFB_BUCKETS_S) + 1, dtype=np.int64)
    idx = np.searchsorted(np.asarray(TTFB_BUCKETS_S), np.asarray(ttfb_ms) / 1000.0, side="left")
    return np.bincount(idx, minlength=len(TTFB_BUCKETS_S) + 1).astype(np.int64)


def _histogram(
    name: str, help_text: str, hists: list[Histogram], bounds_s: tuple[float, ...]
) -> HistogramMetricFamily:
    """Many fixed-bucket millisecond Histograms as one Prometheus histogram with ``bounds_s``."""
    # Only the buckets that can hold counts (up to each histogram's largest value) are added.
    in_use = [h.used_buckets() for h in hists]
    counts = np.zeros(max(1, *in_use), dtype=np.int64)
    total_ms = 0.0
    for h, used in zip(hists, in_use, strict=True):
        if used:
            counts[:used] += h.raw_counts[:used]
        total_ms += h.total_ms
    cumulative = np.cumsum(counts)
    buckets: list[tuple[str, float]] = []
    for bound in bounds_s:
        idx = min(round(bound * 1000.0 / Histogram.BUCKET_MS) - 1, len(cumulative) - 1)
        buckets.append((repr(bound), int(cumulative[idx])))
    buckets.append(("+Inf", int(cumulative[-1])))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total_ms / 1000.0)


#: The process's media metrics.
MEDIA_METRICS = MediaMetrics()

__all__ = ["MEDIA_METRICS", "MediaMetrics"]
