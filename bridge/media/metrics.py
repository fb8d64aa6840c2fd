"""Per-call media counters and fixed-bucket histograms, JSON-able and mergeable across calls."""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from bridge.media.turns import TurnStats, TurnTracker


class Histogram:
    """Milliseconds in fixed 0.05 ms buckets up to ``max_ms`` (values above land in the last bucket), so a
    call of any length costs the same memory and histograms of many calls add up exactly."""

    BUCKET_MS: ClassVar[float] = 0.05

    def __init__(self, max_ms: float = 1000.0) -> None:
        self.max_ms = max_ms
        # array('q'), not a list: add() is on the per-packet path, and an array holds no Python objects, so
        # the garbage collector never walks it (a list of 20k ints per histogram × 5 × 50 calls made every
        # full collection a pause of tens of ms, which showed up as RTP pacing jitter).
        self._counts = array("q", bytes(8 * (int(max_ms / self.BUCKET_MS) + 1)))
        self.count = 0
        self.total_ms = 0.0
        self.max_seen_ms = 0.0

    def add(self, ms: float) -> None:
        # (comparisons, not max/min calls: this runs several times per packet)
        if ms < 0.0:
            ms = 0.0
        counts = self._counts
        bucket = int(ms / self.BUCKET_MS)
        last = len(counts) - 1
        counts[bucket if bucket < last else last] += 1
        self.count += 1
        self.total_ms += ms
        if ms > self.max_seen_ms:
            self.max_seen_ms = ms

    def used_buckets(self) -> int:
        """How many leading buckets can hold counts (the rest are zero): the scrape and merge paths add only
        those, not all 20,001 (at 65 calls, three histograms each made one scrape 2.5 ms of additions, a
        stall of the media loop every second in a media worker)."""
        if not self.count:
            return 0
        return min(int(self.max_seen_ms / self.BUCKET_MS) + 1, len(self._counts))

    def merge(self, other: Histogram) -> None:
        if len(other._counts) != len(self._counts):
            raise ValueError("histograms with different ranges cannot be merged")
        used = other.used_buckets()
        if used:  # (in place, through the array's buffer)
            mine = np.frombuffer(self._counts, dtype=np.int64)
            mine[:used] += np.frombuffer(other._counts, dtype=np.int64)[:used]
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_seen_ms = max(self.max_seen_ms, other.max_seen_ms)

    @property
    def raw_counts(self) -> np.ndarray:
        """The bucket counts (a read-only view, no copy): bucket i holds [i, i+1) x BUCKET_MS."""
        view = np.frombuffer(self._counts, dtype=np.int64)
        view.flags.writeable = False
        return view

    def to_sparse(self) -> dict[str, Any]:
        """A JSON-able form (non-empty buckets only), for histograms that cross a process boundary."""
        counts = np.asarray(self._counts)
        nonzero = np.flatnonzero(counts)
        return {"max_ms": self.max_ms, "buckets": {int(i): int(counts[i]) for i in nonzero},
                "total_ms": self.total_ms, "max_seen_ms": self.max_seen_ms}

    @classmethod
    def from_sparse(cls, data: dict[str, Any]) -> Histogram:
        hist = cls(float(data["max_ms"]))
        for idx, count in data["buckets"].items():
            hist._counts[int(idx)] = int(count)
            hist.count += int(count)
        hist.total_ms = float(data["total_ms"])
        hist.max_seen_ms = float(data["max_seen_ms"])
        return hist

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100), as the upper edge of its bucket; 0.0 when empty."""
        if self.count == 0:
            return 0.0
        rank = int(np.ceil(q / 100.0 * self.count))
        idx = int(np.searchsorted(np.cumsum(self._counts), max(rank, 1)))
        if idx >= len(self._counts) - 1:  # the overflow bucket: only the max is known exactly
            return self.max_seen_ms
        return min((idx + 1) * self.BUCKET_MS, self.max_seen_ms)

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": round(self.percentile(50), 3),
            "p90": round(self.percentile(90), 3),
            "p99": round(self.percentile(99), 3),
            "max": round(self.max_seen_ms, 3),
            "mean": round(self.total_ms / self.count, 3) if self.count else 0.0,
        }


#: Upper bounds of the jitter-buffer depth buckets (packets held as a slot is played); one more: beyond.
DEPTH_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 10)
_DEPTH_INDEX = [
    next((i for i, b in enumerate(DEPTH_BUCKETS) if d <= b), len(DEPTH_BUCKETS)) for d in range(64)
]


def depth_bucket(depth: int) -> int:
    """The DEPTH_BUCKETS index a jitter-buffer depth counts in."""
    return _DEPTH_INDEX[depth] if depth < 64 else len(DEPTH_BUCKETS)


@dataclass
class MediaStats:
    """Everything one CallMedia counts. Latencies in ms; see call_media's docstring for their definitions."""

    # inbound RTP
    rtp_in: int = 0  # datagrams accepted into the jitter buffer
    rtp_in_rephased: int = 0  # times the input grid moved earlier because every packet waited (inbound.py)
    rtp_in_won_back: int = 0  # input slots won back: a quiet packet cut while the stream was behind
    # reason -> count: foreign_source, not_locked, payload_type, held and the RTP parse reasons
    rtp_dropped: dict[str, int] = field(default_factory=dict)
    ssrc_changes: int = 0
    slots_played: int = 0  # 20 ms slots taken from the jitter buffer
    slots_concealed: int = 0  # of which concealed (loss)
    decode_errors: int = 0
    # engine
    frames_to_engine: int = 0
    frames_to_engine_dropped: int = 0  # input frames dropped while the engine socket was stuck
    frames_from_engine: int = 0
    engine_frames_lost: int = 0  # gaps in the engine's output sequence numbers
    engine_text: list[str] = field(default_factory=list)
    engine_lag_reports: int = 0
    # outbound RTP
    rtp_out: int = 0
    rtp_out_silence: int = 0  # packets sent with nothing from the engine to send (underrun or idle)
    rtp_out_skipped: int = 0  # pacer slots given up after an event-loop stall
    rtp_out_late_dropped: int = 0  # engine audio packets that arrived after their slot went out (as silence)
    rtp_out_expanded: int = 0  # slots the output timeline moved later to play slightly late frames whole
    rtp_out_shrunk: int = 0  # quiet slots taken out of the timeline to win those back
    rtp_out_kept: int = 0  # inserted slots kept instead: the engine's phase had moved later for good
    rtp_out_waited: int = 0  # first packets held back for their frame (LATE_GRACE_S) that it came in time for
    rtp_out_wait_expired: int = 0  # ...and those whose frame did not come in time (silence went out)
    rtp_out_resyncs: int = 0  # engine frame numbering re-anchored on the call's timeline (skips, far ahead)
    margins_unobserved: int = 0  # engine frames received while the bridge's loop ran behind (phase not fed)
    send_errors: int = 0
    holds: int = 0
    # latency histograms (ms)
    latency_in_ms: Histogram = field(default_factory=Histogram)
    latency_out_ms: Histogram = field(default_factory=Histogram)
    added_latency_ms: Histogram = field(default_factory=Histogram)
    jitter_delay_ms: Histogram = field(default_factory=Histogram)
    send_lateness_ms: Histogram = field(default_factory=Histogram)
    socket_wait_ms: Histogram = field(default_factory=Histogram)  # arrival → read, the newest of each read
    # caller turns and their time to first byte (bridge/media/turns.py)
    turns: TurnStats = field(default_factory=TurnStats)
    # inbound junk: datagrams dropped (any reason but "held") and the times the budget ran out
    junk_floods: int = 0
    # jitter-buffer depth when each frame's last slot was played, counted in DEPTH_BUCKETS (the last: beyond)
    jitter_depths: array[int] = field(default_factory=lambda: array("q", bytes(8 * (len(DEPTH_BUCKETS) + 1))))
    # algorithmic delay of the two resamplers (what soxr holds back), reported, not timed
    resampler_delay_ms: float = 0.0
    end_reason: str | None = None

    def items(self) -> list[tuple[str, Any]]:
        """(name, value) of every field (``vars()`` is not there when the module is compiled)."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def count_drop(self, reason: str) -> None:
        self.rtp_dropped[reason] = self.rtp_dropped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.items():
            if isinstance(value, Histogram):
                out[key] = value.summary()
            elif isinstance(value, dict):
                out[key] = dict(value)
            elif isinstance(value, array):
                out[key] = value.tolist()
            else:
                out[key] = value
        out["engine_text"] = "".join(self.engine_text)
        return out


def merge_histograms(stats: list[MediaStats], name: str) -> Histogram:
    """One histogram over many calls (the benchmark's p50/p99 over all frames of all calls)."""
    merged = Histogram()
    for s in stats:
        merged.merge(getattr(s, name))
    return merged


class LatencyLedger:
    """Pairs each input frame handed to the engine with the output frame that answers it (the same sequence
    number), for the call's latency figures:

    * ``latency_in_ms``, ``latency_out_ms`` and ``added_latency_ms`` in :class:`MediaStats` (see call_media);
    * the *round trip* of each frame inside the bridge: its first RTP packet's arrival → its answer's first
      packet sent (jitter buffer, framing, engine, output timeline). The first ``WINDOW`` frames and the last
      ``WINDOW`` are kept, so that delay the call gained and never gave back shows as end minus start.
    """

    WINDOW: ClassVar[int] = 25  # frames: 2 s
    _MAX_PENDING: ClassVar[int] = 64  # input frames the engine never answered are forgotten beyond this

    def __init__(self, stats: MediaStats) -> None:
        self.stats = stats
        self._pending: dict[int, tuple[float, float]] = {}  # seq -> (input latency s, first arrival)
        self._out_voiced: dict[int, bool] = {}  # output seq -> carries agent speech (until it plays)
        self.turns = TurnTracker(stats=stats.turns)
        self.first_round_trips_s: list[float] = []
        self.last_round_trips_s: deque[float] = deque(maxlen=self.WINDOW)

    def sent(
        self, seq: int, latency_in_s: float, first_arrival: float, *, voiced: bool = False,
        last_arrival: float | None = None,
    ) -> None:
        """Input frame ``seq`` went to the engine ``latency_in_s`` after it was complete; its first packet
        arrived at ``first_arrival``, its last at ``last_arrival``; ``voiced``: it carries caller speech."""
        self.turns.input_frame(seq, voiced, first_arrival if last_arrival is None else last_arrival)
        pending = self._pending
        if len(pending) >= self._MAX_PENDING:
            pending.pop(next(iter(pending)))
        pending[seq] = (latency_in_s, first_arrival)
        self.stats.latency_in_ms.add(latency_in_s * 1000.0)

    def played(self, seq: int, latency_out_s: float, whole: bool, now: float) -> None:
        """Output frame ``seq``'s first packet left at ``now``, ``latency_out_s`` after the frame arrived;
        ``whole``: none of its packets was late."""
        self.stats.latency_out_ms.add(latency_out_s * 1000.0)
        self.turns.output_played(seq, self._out_voiced.pop(seq, False), now)
        entry = self._pending.pop(seq, None)
        if entry is None:
            return
        latency_in_s, first_arrival = entry
        if whole:
            self.stats.added_latency_ms.add((latency_in_s + latency_out_s) * 1000.0)
        round_trip = now - first_arrival
        if len(self.first_round_trips_s) < self.WINDOW:
            self.first_round_trips_s.append(round_trip)
        else:
            self.last_round_trips_s.append(round_trip)

    def output_level(self, seq: int, voiced: bool) -> None:
        """Output frame ``seq`` came from the engine; ``voiced``: it carries agent speech."""
        out = self._out_voiced
        if len(out) >= self._MAX_PENDING:  # frames that never played (resynced away) are forgotten
            out.pop(next(iter(out)))
        out[seq] = voiced

    def recent_round_trip_ms(self) -> float | None:
        """Median round trip inside the bridge over the call's last WINDOW frames (its current latency)."""
        recent = self.last_round_trips_s or self.first_round_trips_s
        return float(np.median(recent)) * 1000.0 if recent else None

    def round_trip_end_vs_start_ms(self) -> float | None:
        """Median round trip of the call's last WINDOW frames minus its first WINDOW's (None: too short)."""
        if len(self.first_round_trips_s) < self.WINDOW or len(self.last_round_trips_s) < self.WINDOW:
            return None
        start = float(np.median(self.first_round_trips_s))
        end = float(np.median(self.last_round_trips_s))
        return (end - start) * 1000.0


def media_gauges(media: object) -> dict[str, str | int | float]:
    """A call's current latency figures for its live hash, read from its media (CallMedia's ``ledger``
    and ``stats.turns``); figures not known yet are left out. Duck-typed: stand-in media has neither."""
    live = getattr(media, "live_gauges", None)
    if callable(live):  # media in a worker process: the figures it last sent
        return dict(live())
    gauges: dict[str, str | int | float] = {}
    ledger = getattr(media, "ledger", None)
    if ledger is not None and (round_trip := ledger.recent_round_trip_ms()) is not None:
        gauges["latency_ms"] = round(float(round_trip), 1)
    turns = getattr(getattr(media, "stats", None), "turns", None)
    if turns is not None:
        gauges["turns"] = int(turns.turns)
        if (ttfb := turns.last_ttfb_ms) is not None:
            gauges["ttfb_ms"] = round(float(ttfb), 1)
    return gauges
