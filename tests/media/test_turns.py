"""Caller turns and TTFB (bridge/media/turns.py) on scripted frame schedules, virtual time."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.media.metrics import LatencyLedger, MediaStats
from bridge.media.prometheus import TTFB_BUCKETS_S, MediaMetrics, _ttfb_counts
from bridge.media.turns import TurnTracker

FRAME_S = 0.080


def _run_echo(tracker: TurnTracker, voiced_inputs: list[bool], delay_s: float, lag_frames: int = 0) -> None:
    """Input frame n is complete at n * 80 ms; output frame n (voiced as input n - lag_frames) plays
    ``delay_s`` after it."""
    events: list[tuple[float, int, str]] = []
    for n, _ in enumerate(voiced_inputs):
        events.append((n * FRAME_S, 0, f"in:{n}"))
        events.append((n * FRAME_S + delay_s, 1, f"out:{n}"))
    for at, _, what in sorted(events):
        kind, n_text = what.split(":")
        n = int(n_text)
        if kind == "in":
            tracker.input_frame(n, voiced_inputs[n], at)
        else:
            src = n - lag_frames
            tracker.output_played(n, src >= 0 and voiced_inputs[src], at)


def test_echo_turn_ttfb_is_the_round_trip_of_the_last_voiced_frame() -> None:
    tracker = TurnTracker()
    speech = [True] * 10 + [False] * 10 + [True] * 5 + [False] * 10
    _run_echo(tracker, speech, delay_s=0.065)
    assert tracker.stats.turns == 2
    assert tracker.stats.unanswered == 0
    assert tracker.stats.ttfb_ms == pytest.approx([65.0, 65.0])


def test_answer_played_before_the_end_was_known_still_counts() -> None:
    # The end is known 4 frames (320 ms) after the last voiced frame; a 100 ms answer played long before.
    tracker = TurnTracker(end_silence_frames=4)
    _run_echo(tracker, [True] * 6 + [False] * 8, delay_s=0.100)
    assert tracker.stats.ttfb_ms == pytest.approx([100.0])


def test_a_model_that_answers_after_the_turn() -> None:
    # The agent speaks 5 frames after the caller's last voiced frame: TTFB = 5 frames + path delay.
    tracker = TurnTracker()
    voiced_in = [True] * 8 + [False] * 20
    for n in range(len(voiced_in)):
        tracker.input_frame(n, voiced_in[n], n * FRAME_S)
        # output n answers input n; the agent talks in frames 12..18
        tracker.output_played(n, 12 <= n <= 18, n * FRAME_S + 0.030)
    assert tracker.stats.ttfb_ms == pytest.approx([(12 - 7) * 80.0 + 30.0])


def test_short_pauses_are_inside_a_turn_and_clicks_are_not_turns() -> None:
    tracker = TurnTracker(min_turn_frames=2, end_silence_frames=4)
    speech = [True] * 5 + [False] * 3 + [True] * 5 + [False] * 6 + [True] + [False] * 6
    _run_echo(tracker, speech, delay_s=0.05)
    assert tracker.stats.turns == 1  # the 3-frame pause did not end it; the lone voiced frame is a click
    assert tracker.stats.ttfb_ms == pytest.approx([50.0])


def test_no_answer_before_the_next_turn_is_unanswered() -> None:
    tracker = TurnTracker()
    voiced_in = [True] * 5 + [False] * 6 + [True] * 5 + [False] * 6
    for n in range(len(voiced_in)):
        tracker.input_frame(n, voiced_in[n], n * FRAME_S)
        tracker.output_played(n, False, n * FRAME_S + 0.02)  # a silent agent
    tracker.finish()
    assert tracker.stats.turns == 2
    assert tracker.stats.unanswered == 2
    assert tracker.stats.ttfb_ms == []


def test_an_answer_older_than_the_turn_does_not_count() -> None:
    # The agent spoke (answering frame 2) during the turn, then went quiet: no answer to frames >= 4.
    tracker = TurnTracker(answer_timeout_s=1.0)
    voiced_in = [True] * 5 + [False] * 30
    for n in range(len(voiced_in)):
        tracker.input_frame(n, voiced_in[n], n * FRAME_S)
        tracker.output_played(n, n == 2, n * FRAME_S + 0.02)
    assert tracker.stats.turns == 1
    assert tracker.stats.unanswered == 1  # timed out after 1 s


def test_ledger_feeds_the_tracker_through_voiced_levels() -> None:
    stats = MediaStats()
    ledger = LatencyLedger(stats)
    voiced = [True] * 4 + [False] * 6
    for n, v in enumerate(voiced):
        ledger.sent(n, 0.001, n * FRAME_S - 0.06, voiced=v, last_arrival=n * FRAME_S)
        ledger.output_level(n, v)
        ledger.played(n, 0.002, True, n * FRAME_S + 0.045)
    assert stats.turns.turns == 1
    assert stats.turns.ttfb_ms == pytest.approx([45.0])


def test_prometheus_ttfb_histogram_and_sessions() -> None:
    metrics = MediaMetrics()
    stats = MediaStats()
    stats.turns.turns = 3
    stats.turns.ttfb_ms = [50.0, 120.0, 130.0]

    class _Inbound:
        lost_packets = 0

    metrics.call_started(stats, _Inbound())
    metrics.session_started("sales", "ru", "phone")
    metrics.session_started("sales", "ru", "phone")
    families = {f.name: f for f in metrics.collect()}
    assert families["aziza_active_sessions"].samples[0].value == 1
    buckets = {s.labels["le"]: s.value for s in families["aziza_ttfb_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.1"] == 1 and buckets["0.12"] == 2 and buckets["0.15"] == 3 and buckets["+Inf"] == 3
    sessions = [s for s in families["aziza_sessions"].samples if s.name == "aziza_sessions_total"]
    assert [(s.labels["persona"], s.labels["language"], s.labels["channel"], s.value) for s in sessions] == [
        ("sales", "ru", "phone", 2)]
    metrics.call_ended(stats)  # folded into the ended totals: the same histogram after the call
    families = {f.name: f for f in metrics.collect()}
    assert families["aziza_active_sessions"].samples[0].value == 0
    after = {
        s.labels["le"]: s.value for s in families["aziza_ttfb_seconds"].samples if s.name.endswith("_bucket")
    }
    assert after == buckets


def test_persona_labels_are_bounded() -> None:
    metrics = MediaMetrics()
    for i in range(200):
        metrics.session_started(f"p{i}", "en", "browser")
    families = {f.name: f for f in metrics.collect()}
    personas = {s.labels["persona"] for s in families["aziza_sessions"].samples}
    assert len(personas) == 65 and "other" in personas


def test_ttfb_bucket_edges_are_le() -> None:
    counts = _ttfb_counts([120.0, 120.0001, 0.0, 99999.0])
    assert counts.sum() == 4
    assert counts[list(TTFB_BUCKETS_S).index(0.12)] == 1
    assert counts[-1] == 1
    assert np.all(counts >= 0)
