"""The output timeline on virtual time: scripted engine frame arrivals (late ones, jitter, stalls, numbering
jumps, a bridge loop running behind) in, paced datagrams out. Every verdict here is exact: nothing depends
on the machine's load."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bridge.media.outbound import (
    EXPAND_MAX_SLOTS,
    GRID_RANGE_S,
    HOLDS_BURST,
    HOLDS_PER_S,
    LATE_GRACE_S,
    OUTPUT_PHASE_S,
    SHRINK_WAIT_S,
)
from tests.media.timeline_sim import FRAME_S, Arrival, TimelineSim, steady_arrivals


def _audio_in_order(sim: TimelineSim) -> list[tuple[int, int]]:
    """The frames' packets as they went out, silence left out; asserts that no frame was split by silence
    (each frame's packets went out back to back)."""
    audio = [(k, i) for k, i in enumerate(sim.played_ids()) if i is not None]
    for (k0, a), (k1, b) in itertools.pairwise(audio):
        if a[0] == b[0]:
            assert k1 == k0 + 1, f"frame {a[0]} split by silence"
    return [i for _, i in audio]


def test_steady_frames_play_on_an_exact_grid_in_order() -> None:
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 50), until=50 * FRAME_S + 0.1)
    played = _audio_in_order(sim)
    assert played == [(n, j) for n in range(50) for j in range(4)]
    first_audio = next(i for i, p in enumerate(sim.played_ids()) if p is not None)
    assert first_audio == 0  # the grid starts with the first frame's first packet
    assert np.allclose(sim.intervals_ms(), 20.0, atol=1e-6)
    assert np.ptp(sim.rtp_clock_offsets_ms()) < 1e-6  # RTP clock = real time
    assert [s.packet.marker for s in sim.sent[:2]] == [True, False]
    stats = sim.stats
    assert stats.rtp_out_expanded == stats.rtp_out_shrunk == stats.rtp_out_waited == 0
    assert stats.rtp_out_late_dropped == 0
    # Each frame's first packet left OUTPUT_PHASE_S after it arrived.
    assert stats.latency_out_ms.count == 50
    assert stats.latency_out_ms.percentile(99) == pytest.approx(OUTPUT_PHASE_S * 1000.0, abs=0.06)


def test_a_frame_a_few_ms_late_is_waited_for_not_played_a_slot_later() -> None:
    """Two frames come back 9 ms late, 55 frames apart: each misses its first tick by 4 ms, and its first
    packet is held back until it arrives (within LATE_GRACE_S): played whole, in its place."""
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 90, late={15: 0.009, 70: 0.009}), until=90 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_waited == 2 and stats.rtp_out_wait_expired == 0
    assert stats.rtp_out_expanded == 0 and stats.rtp_out_late_dropped == 0
    # Every frame's latency is counted, the two waited for included (they used to be left out).
    assert stats.latency_out_ms.count == 90 and stats.added_latency_ms.count == 90
    assert stats.latency_out_ms.max_seen_ms <= (OUTPUT_PHASE_S + LATE_GRACE_S) * 1000.0
    assert _audio_in_order(sim) == [(n, j) for n in range(90) for j in range(4)]
    deviation = np.abs(sim.intervals_ms() - 20.0)
    assert deviation.max() <= LATE_GRACE_S * 1000.0 + 1e-6
    assert np.count_nonzero(deviation > 0.5 + 1e-6) == 2  # only the two held packets are off the slew bound
    assert max(abs(o) for o in sim.grid_offsets) <= GRID_RANGE_S + 1e-9


def test_a_frame_whose_input_is_late_is_not_waited_for() -> None:
    """The engine does not have the input yet (the caller's packets are late): no hold, the frame is played
    a slot later instead."""
    sim = TimelineSim(input_frames=lambda t: int((t - 1000.0) / FRAME_S))  # one frame behind the output
    sim.run(steady_arrivals(sim.t0, 40, late={15: 0.009}), until=40 * FRAME_S + 0.1)
    assert sim.stats.rtp_out_waited == 0 and sim.stats.rtp_out_wait_expired == 0
    assert sim.stats.rtp_out_expanded == 1


def _won_back_within(sim: TimelineSim) -> list[float]:
    """For each slot inserted (in order), how long until the matching slot was taken out (inf: never)."""
    inserted: list[float] = []
    won_back: list[float] = []
    for (t, expanded, shrunk), (_, expanded0, shrunk0) in zip(sim.history[1:], sim.history, strict=False):
        inserted += [t] * (expanded - expanded0)
        won_back += [t] * (shrunk - shrunk0)
    return [won_back[k] - t if k < len(won_back) else float("inf") for k, t in enumerate(inserted)]


def test_every_inserted_slot_is_won_back_within_a_bounded_time() -> None:
    """Frames late by 25 ms (beyond the grace, within two slots) now and then: each is played whole one slot
    later, and that slot is won back (a quiet slot taken out, or the quietest after SHRINK_WAIT_S) before
    long: at the end the round trip is the start's."""
    late = {n: 0.025 for n in (30, 90, 150, 210)}
    quiet = set(range(95, 100))  # one pause between words; the other insertions meet none
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 260, late=late, quiet=quiet), until=260 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_expanded == 4
    assert stats.rtp_out_shrunk == 4 and stats.rtp_out_kept == 0
    assert sim.timeline.owed_slots == 0
    assert max(_won_back_within(sim)) <= SHRINK_WAIT_S + FRAME_S
    end_vs_start = sim.ledger.round_trip_end_vs_start_ms()
    assert end_vs_start is not None and abs(end_vs_start) <= 1.0
    assert np.ptp(sim.rtp_clock_offsets_ms()) <= 2 * GRID_RANGE_S * 1000.0


def test_late_frames_close_together_move_the_grid_then_give_the_delay_back() -> None:
    """Two late frames within the controller's 4 s window read as the engine's phase moving later: the
    inserted slot is kept while they are in the window, and won back once they have left it."""
    late = {30: 0.025, 50: 0.025}
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 200, late=late), until=200 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_kept >= 1
    assert sim.timeline.owed_slots == 0
    window_s = sim.timeline.phase.window * FRAME_S
    assert max(_won_back_within(sim)) <= window_s + 2 * SHRINK_WAIT_S
    end_vs_start = sim.ledger.round_trip_end_vs_start_ms()
    assert end_vs_start is not None and abs(end_vs_start) <= 1.0


def test_an_engine_whose_phase_moved_for_good_keeps_the_slot() -> None:
    """From frame 30 on, every frame comes 25 ms later than before (the engine's step got slower): the
    inserted slot is kept rather than won back and lost again every half second."""
    late = {n: 0.025 for n in range(30, 120)}
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 120, late=late), until=120 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_expanded + stats.rtp_out_shrunk <= 4  # no insert/win-back cycle
    assert stats.rtp_out_late_dropped == 0
    tail = sim.stats.latency_out_ms  # frames after the move wait no more than the margins need
    assert tail.max_seen_ms < 20.0 + OUTPUT_PHASE_S * 1000.0 + GRID_RANGE_S * 1000.0


def test_engine_jitter_moves_the_timeline_in_slots_without_clock_drift() -> None:
    """Frames jitter by 0-35 ms at random: the grid stays within its ±10 ms range, late frames are played
    whole a slot later (not cut), the RTP clock keeps real time, and the inserted slots are won back."""
    rng = np.random.default_rng(3)
    arrivals = [Arrival(1000.0 + n * FRAME_S + 0.002 + float(rng.uniform(0.0, 0.035)), n) for n in range(75)]
    sim = TimelineSim()
    sim.run(arrivals, until=75 * FRAME_S + 0.1)
    stats = sim.stats
    assert max(abs(o) for o in sim.grid_offsets) <= GRID_RANGE_S + 1e-9
    assert stats.rtp_out_expanded > 0
    assert stats.rtp_out_late_dropped == 0
    assert stats.rtp_out_expanded - stats.rtp_out_shrunk - stats.rtp_out_kept == sim.timeline.owed_slots
    assert sim.timeline.owed_slots <= EXPAND_MAX_SLOTS
    offsets = sim.rtp_clock_offsets_ms()
    assert abs(np.median(offsets[-50:]) - np.median(offsets[:50])) <= 2 * GRID_RANGE_S * 1000.0
    assert np.all(np.diff([s.packet.sequence for s in sim.sent]) == 1)


def test_an_engine_stall_costs_audio_once_not_lasting_delay() -> None:
    """One engine step takes 350 ms: the frames held up come in a burst. Their late packets are dropped once
    and the timeline is back to a frame's worth of queue, with the round trip of the start."""
    arrivals = steady_arrivals(1000.0, 100)
    stall_end = 1000.0 + 40 * FRAME_S + 0.010 + 0.350
    for a in arrivals:
        if 40 <= a.seq and a.at < stall_end:
            a.at = stall_end + 0.0005 * a.seq  # the burst, in order
    sim = TimelineSim()
    sim.run(arrivals, until=100 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_late_dropped >= 4
    assert sim.timeline.owed_slots == 0
    # A second after the burst, the queue holds at most a frame and a packet: the stall is not kept as delay.
    assert max(d for t, d in sim.depths if t > stall_end + 1.0) <= 5
    end_vs_start = sim.ledger.round_trip_end_vs_start_ms()
    assert end_vs_start is not None and abs(end_vs_start) <= 1.0
    assert np.all(np.diff([s.packet.sequence for s in sim.sent]) == 1)


def test_a_stall_of_the_bridge_itself_is_cut_not_kept_as_delay() -> None:
    """Frames handled while the bridge's own loop ran behind (received late, not sent late): their late
    packets are cut, the timeline is not moved a slot later, the controller does not learn those margins."""
    behind = {20, 21, 40, 41}
    late = {n: 0.030 for n in behind}  # received 30 ms late: past their first tick and the grace
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 60, late=late, loop_behind=behind), until=60 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_expanded == 0
    assert stats.margins_unobserved == 4
    assert stats.rtp_out_late_dropped > 0
    assert abs(sim.timeline.phase.stats.shift_s) < GRID_RANGE_S


def test_engine_numbering_jump_resyncs_the_output() -> None:
    """An engine whose frame numbers jump by 1000 mid-call: the output re-anchors on the new numbering and
    plays on, in order, instead of waiting for slots 80 s away."""
    arrivals = steady_arrivals(1000.0, 40)
    for a in arrivals[11:]:
        a.seq += 999
    sim = TimelineSim()
    sim.run(arrivals, until=40 * FRAME_S + 0.1)
    stats = sim.stats
    assert stats.rtp_out_resyncs == 1
    assert stats.engine_frames_lost == 999
    played_frames = [seq for seq, j in _audio_in_order(sim) if j == 0]
    assert played_frames == [a.seq for a in arrivals]  # every frame played, in order
    assert np.all(np.diff([s.packet.sequence for s in sim.sent]) == 1)


def test_holds_come_out_of_a_pacing_budget() -> None:
    """Every frame due and late by 60 ms for 20 s, while the loop runs behind (the grid is not steered):
    HOLDS_BURST holds, then one per 1 / HOLDS_PER_S seconds, so held packets put at most ~0.5 % of the
    intervals off the grid."""
    frames = 250
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, frames, late={n: 0.060 for n in range(1, frames)},
                            loop_behind=set(range(1, frames))), until=frames * FRAME_S)
    holds = sim.stats.rtp_out_waited + sim.stats.rtp_out_wait_expired
    assert holds == pytest.approx(HOLDS_BURST + (frames - 1) * FRAME_S * HOLDS_PER_S, abs=1)


def test_a_late_poll_catches_up_without_drift_and_skips_a_stall() -> None:
    """Polls served up to 15 ms late send what is due (a small burst) on the same grid; a 200 ms stall of
    the loop skips the slots whose time has gone, with the RTP timestamp moved over them."""
    rng = np.random.default_rng(5)
    sim = TimelineSim(poll_lateness=lambda t: 0.2 if 1001.0 < t < 1001.02 else float(rng.uniform(0.0, 0.015)))
    sim.run(steady_arrivals(sim.t0, 40), until=40 * FRAME_S)
    stats = sim.stats
    assert stats.rtp_out_skipped > 0
    assert stats.send_lateness_ms.max_seen_ms >= 199.0
    # Timestamps jump exactly over the skipped slots, never by anything else.
    ts_steps = np.diff([s.packet.timestamp for s in sim.sent]) % 2**32
    assert set(ts_steps.tolist()) <= {160 * k for k in range(1, 12)}
    assert int(sum(ts_steps) // 160) == len(sim.sent) - 1 + stats.rtp_out_skipped


def test_pause_stops_packets_and_resume_marks_and_skips_the_hold() -> None:
    sim = TimelineSim()
    sim.run(steady_arrivals(sim.t0, 10), until=10 * FRAME_S)
    sent_before = len(sim.sent)
    last_ts = sim.sent[-1].packet.timestamp
    sim.timeline.pause(sim.now)
    assert sim.timeline.next_deadline() is None
    assert sim.timeline.on_frame(10, [b"\x00" * 160] * 4, [0] * 4, sim.now + 0.01) == []
    sim.timeline.resume(sim.now + 1.0)
    sim.run(steady_arrivals(sim.now + 1.0, 5, first_seq=11), until=10 * FRAME_S + 1.5)
    resumed = sim.sent[sent_before]
    assert resumed.packet.marker
    assert (resumed.packet.timestamp - last_ts) % 2**32 >= 8000  # a second of hold is a second of RTP time
