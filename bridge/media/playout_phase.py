"""Where a call's 20 ms output grid sits relative to the engine's 80 ms frame arrivals (sans-IO).

Every engine frame has a *margin*: the tick its first packet is due on, minus the moment it arrived
(negative: it came after its tick, and silence went out in its place). The engine's arrivals jitter (batching
window, CPU contention, a GPU step that varies), so the grid must sit after nearly all of them, but not more:
every millisecond of margin is a millisecond of the caller's delay.

The controller keeps the margins of the last ``window`` frames and steers the grid so that the ``rank``-th
smallest of them is ``target_s``: the grid sits just after the ``rank - 1`` latest arrivals it will give up on
(``window=50, rank=2``: about the 98th percentile of 4 s of arrivals). A single outlier does not move it; a
second late frame within the window does, at once; a lasting gain of margin moves it earlier once it clears
a hysteresis band.

A frame late by more than a whole frame came out of a stall and is not observed: a stall is not a new
phase, and following it would hold the whole delay of the stall for the length of the window. (Telling
stalls by the gap between arrivals does not work: input jitter alone spaces frames 80 ± 60 ms.)

The caller applies the shifts to the grid gradually (the pacing stays within 20 ± 0.5 ms); margins measured
while a shift is still being applied are given as if it were done (``pending_s``).

It replaced a rule of thumb (move later after 2 late frames in 12, earlier when all of the last 12 waited
more than 6 ms) that oscillated: with 50 calls the grid went early after each quiet second, and 3 % of the
output packets were dropped as late.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class PlayoutPhaseStats:
    later_moves: int = 0
    stall_frames: int = 0  # frames not observed: late by more than a frame
    earlier_moves: int = 0
    shift_s: float = 0.0  # total grid shift so far (positive: later)


class PlayoutPhase:
    """See the module docstring."""

    def __init__(
        self,
        *,
        window: int = 50,
        rank: int = 2,
        target_s: float = 0.0015,
        hysteresis_s: float = 0.002,
        min_frames_to_advance: int = 12,
        frame_s: float = 0.080,
    ) -> None:
        if not 1 <= rank <= window:
            raise ValueError("rank must be in 1..window")
        self.window = window
        self.rank = rank
        self.target_s = target_s
        self.hysteresis_s = hysteresis_s
        self.min_frames_to_advance = min_frames_to_advance
        self.frame_s = frame_s
        # Margins as they would be at zero shift: adding stats.shift_s gives today's margin.
        self._margins: deque[float] = deque(maxlen=window)
        self.stats = PlayoutPhaseStats()

    def observe(self, margin_s: float, pending_s: float = 0.0) -> float:
        """One engine frame's margin (seconds; negative: late), measured on the grid as it is now, with
        ``pending_s`` of shift still to be applied to it. Returns the further shift the grid needs (positive:
        later), 0.0 for none."""
        if margin_s + pending_s < -self.frame_s:
            self.stats.stall_frames += 1
            return 0.0
        stored = margin_s + pending_s - self.stats.shift_s
        self._margins.append(stored)
        if len(self._margins) < self.rank:
            return 0.0
        kth = sorted(self._margins)[self.rank - 1] + self.stats.shift_s
        if kth < 0.0:
            delta = self.target_s - kth
            self.stats.later_moves += 1
        elif kth > self.target_s + self.hysteresis_s and len(self._margins) >= self.min_frames_to_advance:
            delta = self.target_s - kth
            self.stats.earlier_moves += 1
        else:
            return 0.0
        self.stats.shift_s += delta
        return delta

    def moved(self, shift_s: float) -> None:
        """The caller moved the grid by ``shift_s`` on its own (positive: later), e.g. by playing a late
        frame one slot later instead of dropping its audio."""
        self.stats.shift_s += shift_s
