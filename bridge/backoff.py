"""The one backoff, sans-IO: exponential from ``min_s`` to ``max_s``, jittered within [ceiling/2, ceiling].

Used by every retry loop: the ARI event stream's reconnects, the call-record writer's retries while the
database is down, a call's retries of ``addChannel`` (Asterisk's 422 before the media channel is in
Stasis), media workers' restarts, and a dead engine's retry time in the engine pool (unjittered there:
its placement is one process's own, nothing to spread)."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, min_s: float, max_s: float, *, factor: float = 2.0, rng: random.Random | None = None,
                 jitter: bool = True):
        if min_s <= 0 or max_s < min_s:
            raise ValueError(f"bad backoff bounds: min {min_s}, max {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng or random.Random()
        self.jitter = jitter
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt

    def next_delay(self) -> float:
        """The wait before the next attempt; grows until ``max_s``, jittered in [ceiling/2, ceiling]."""
        ceiling = min(self.max_s, self.min_s * self.factor**self._attempt)
        self._attempt += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2 if self.jitter else ceiling

    def reset(self) -> None:
        """After a successful connection the next failure starts from ``min_s`` again."""
        self._attempt = 0
