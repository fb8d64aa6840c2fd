"""The output grid's phase controller, driven by simulated engine frame arrivals (no I/O, no clock)."""

from __future__ import annotations

import random

import pytest

from bridge.media.playout_phase import PlayoutPhase


class Grid:
    """The grid's offset from the engine's nominal frame times, moved by what the controller asks."""

    def __init__(self, phase: PlayoutPhase) -> None:
        self.phase = phase
        self.offset = 0.0015
        self.margins: list[float] = []

    def arrive(self, lateness_s: float) -> float:
        margin = self.offset - lateness_s
        self.margins.append(margin)
        delta = self.phase.observe(margin)
        self.offset += delta
        return delta


def test_jittery_engine_late_rarely_and_waits_only_the_spread() -> None:
    rng = random.Random(7)
    grid = Grid(PlayoutPhase())
    for _ in range(3000):
        grid.arrive(rng.uniform(0.0, 0.010))
    settled = grid.margins[100:]
    late = sum(1 for m in settled if m < 0) / len(settled)
    assert late < 0.04  # rank 2 of 50: about 2 %
    waits = sorted(m for m in settled if m >= 0)
    assert waits[int(0.99 * len(waits))] < 0.010 + 0.0015 + 0.002 + 0.001  # spread + target + hysteresis


def test_one_outlier_does_not_move_the_grid() -> None:
    grid = Grid(PlayoutPhase())
    for _ in range(60):
        grid.arrive(0.0)
    assert grid.arrive(0.030) == 0.0
    for _ in range(10):
        assert grid.arrive(0.0) == 0.0


def test_follows_a_later_engine_phase_at_the_second_late_frame() -> None:
    grid = Grid(PlayoutPhase())
    for _ in range(60):
        grid.arrive(0.0)
    assert grid.arrive(0.015) == 0.0
    delta = grid.arrive(0.015)
    assert delta == pytest.approx(0.015, abs=1e-9)
    assert all(grid.arrive(0.015) == 0.0 for _ in range(20))
    assert grid.margins[-1] == pytest.approx(0.0015)
    assert grid.phase.stats.later_moves == 1


def test_moves_earlier_once_the_window_has_seen_the_gain() -> None:
    phase = PlayoutPhase(window=50)
    grid = Grid(phase)
    for _ in range(60):
        grid.arrive(0.020)  # the first frame set the grid; the engine settles 20 ms late
    for _ in range(60):
        grid.arrive(0.0)  # ...then comes back
    assert phase.stats.earlier_moves >= 1
    assert grid.margins[-1] == pytest.approx(0.0015, abs=1e-6)


def test_stall_frames_are_not_observed() -> None:
    phase = PlayoutPhase()
    grid = Grid(phase)
    for _ in range(60):
        grid.arrive(0.0)
    # 300 ms with nothing, then the frames held up come at once, the first ones late by more than a frame.
    assert grid.arrive(0.300) == 0.0
    assert grid.arrive(0.220) == 0.0
    assert grid.arrive(0.140) == 0.0
    assert phase.stats.stall_frames == 3 and phase.stats.later_moves == 0


def test_pending_shift_is_not_asked_for_twice() -> None:
    phase = PlayoutPhase()
    for _ in range(60):
        phase.observe(0.0015)
    first = phase.observe(-0.010)
    second = phase.observe(-0.010)
    assert first == 0.0 and second == pytest.approx(0.0115)
    # The grid has not moved yet (the caller slews it in), so the next frame is still measured late; given
    # as pending, it asks for nothing more.
    assert phase.observe(-0.010, pending_s=second) == 0.0


def test_rank_must_fit_the_window() -> None:
    with pytest.raises(ValueError):
        PlayoutPhase(window=4, rank=5)
