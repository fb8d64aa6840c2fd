"""Outbound pacing on a virtual clock, and the bounded output queue."""

from __future__ import annotations

import random

import pytest

from bridge.media.pacer import Pacer, SlotBuffer


def test_no_drift_over_10000_ticks_with_random_lateness() -> None:
    now = 1000.0  # virtual time
    pacer = Pacer(0.020, start=now, max_burst=3)
    rng = random.Random(3)
    sent = 0
    bursts = []
    for _ in range(10_000):
        # The I/O loop sleeps until the deadline and wakes 0-15 ms late.
        wake = pacer.next_deadline() + rng.uniform(0.0, 0.015)
        now = max(now, wake)
        n = pacer.on_tick(now)
        bursts.append(n)
        sent += n
        # The next deadline is exactly on the grid, whatever the lateness so far.
        assert pacer.next_deadline() == pytest.approx(1000.0 + pacer.next_index * 0.020, abs=1e-9)
    elapsed = now - 1000.0
    assert sent == int(elapsed / 0.020 + 1e-9) + 1  # packet k is due at start + k*20ms, k = 0..
    assert max(bursts) <= 3
    assert pacer.stats.skipped == 0 and pacer.stats.packets == sent


def test_early_wakeup_sends_nothing() -> None:
    pacer = Pacer(0.020, start=0.0)
    assert pacer.on_tick(0.0) == 1
    assert pacer.on_tick(0.0199) == 0
    assert pacer.on_tick(0.020) == 1
    assert pacer.next_deadline() == pytest.approx(0.040)


def test_stall_is_bounded_and_reanchored_on_the_grid() -> None:
    pacer = Pacer(0.020, start=0.0, max_burst=3)
    assert pacer.on_tick(0.0) == 1
    assert pacer.on_tick(0.5037) == 3  # 25 slots overdue: only 3 sent, 22 skipped
    assert pacer.stats.skipped == 22
    assert pacer.next_deadline() == pytest.approx(0.52)  # still on the 20 ms grid
    assert pacer.on_tick(0.52) == 1


def test_pacer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Pacer(0.0, start=0.0)
    with pytest.raises(ValueError):
        Pacer(0.02, start=0.0, max_burst=0)


def test_slot_buffer_plays_by_slot_not_arrival() -> None:
    buf = SlotBuffer(horizon=8)
    assert buf.take() == (0, None) and buf.stats.silence == 1
    # Frame for slots 4..7 arrives before the one for 1..3 (a burst out of order): each plays in its slot.
    for slot in range(4, 8):
        assert buf.put(slot, bytes([slot]) * 160)
    for slot in range(1, 4):
        assert buf.put(slot, bytes([slot]) * 160)
    played = [buf.take() for _ in range(8)]
    assert [s for s, _ in played] == list(range(1, 9))
    assert [p[0] if p else None for _, p in played] == [1, 2, 3, 4, 5, 6, 7, None]
    # Late: slot 3 went out already; dropped and counted, not played later.
    assert buf.put(3, b"\x01" * 160) and buf.stats.late == 1 and buf.depth == 0
    # Beyond the horizon: refused, nothing kept.
    assert not buf.put(buf.next_slot + 8, b"\x01" * 160) and buf.depth == 0
    assert buf.put(buf.next_slot + 7, b"\x01" * 160) and buf.depth == 1
    buf.skip(8)
    assert buf.depth == 0 and buf.stats.skipped == 8
    with pytest.raises(ValueError):
        buf.put(buf.next_slot, b"\x00" * 100)
    with pytest.raises(ValueError):
        SlotBuffer(horizon=0)


def test_slot_buffer_drops_the_quietest_and_closes_the_gap() -> None:
    buf = SlotBuffer(horizon=8)
    for slot, level in zip(range(0, 4), (900, 40, 700, 800), strict=True):
        buf.put(slot, bytes([slot]) * 160, level)
    assert buf.drop_quietest(max_level=10) is None and buf.depth == 4  # nothing that quiet: untouched
    assert buf.drop_quietest(max_level=330) == 1
    played = [buf.take() for _ in range(4)]
    # Slot 1's payload is gone; 2 and 3 moved up one slot, and nothing else moved.
    assert [p[0] if p else None for _, p in played] == [0, 2, 3, None]
    assert buf.stats.dropped_quiet == 1
    assert buf.drop_quietest() is None  # empty
