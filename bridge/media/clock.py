"""Injectable clocks for the sans-IO media cores.

Every core that needs time takes either an explicit ``now`` argument or a :data:`Clock`; production code
passes :data:`monotonic`, tests pass a :class:`VirtualClock` so that timing behaviour is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A clock returns monotonic seconds (never goes backwards; the epoch is arbitrary).
Clock = Callable[[], float]

#: The real clock: ``time.monotonic``.
monotonic: Clock = time.monotonic


class VirtualClock:
    """A manually advanced clock for tests: ``clock()`` and ``clock.now()`` return the same value."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move time forward by ``dt`` seconds (must be >= 0) and return the new time."""
        if dt < 0:
            raise ValueError(f"a monotonic clock cannot go back (dt={dt})")
        self._now += dt
        return self._now
