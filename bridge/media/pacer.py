"""Outbound pacing: exactly one packet per ptime from a monotonic clock, sans-IO.

Asterisk's UnicastRTP channel has no jitter buffer, so the bridge must emit the return audio on a steady
20 ms grid. :class:`Pacer` holds the grid ``start + k * ptime`` (k = 0, 1, 2, ...): packet k is due at
``start + k * ptime``. Deadlines are computed from ``start`` every time, never by adding ``ptime`` to the
previous deadline, so rounding errors and late wake-ups do not accumulate: after any number of ticks the
deadline is still exactly on the grid.

Lateness: the I/O loop sleeps until :meth:`Pacer.next_deadline`, then calls :meth:`Pacer.on_tick` with the
clock's time, which returns how many packets are due (0 if it woke early, 2 if it woke more than one ptime
late, ...). A stall longer than ``max_burst`` packets is not paid back in one burst (Asterisk would forward
the burst to the caller, who has a jitter buffer of finite depth): the pacer sends at most ``max_burst`` and
*skips* the rest of the overdue slots, staying on the same grid (re-anchoring without drift). Skipped slots
are counted; the caller should advance its RTP timestamp over them (``RtpSender.skip``) so that the far end
sees the gap as elapsed time, not as compressed audio.

:class:`OutputQueue` sits between the engine (80 ms bursts) and the pacer (20 ms ticks).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from bridge.media.codecs import ULAW_SILENCE_20MS


@dataclass(slots=True)
class PacerStats:
    ticks: int = 0  # on_tick calls
    packets: int = 0  # packets released
    skipped: int = 0  # overdue slots given up after a stall
    max_burst: int = 0  # most packets released by one on_tick
    max_lateness_s: float = 0.0  # worst (now - deadline of the first due packet) seen


class Pacer:
    """The 20 ms send grid of one stream (see module docstring)."""

    def __init__(self, ptime_s: float = 0.020, *, start: float, max_burst: int = 3) -> None:
        if ptime_s <= 0:
            raise ValueError(f"ptime_s must be > 0, got {ptime_s}")
        if max_burst < 1:
            raise ValueError(f"max_burst must be >= 1, got {max_burst}")
        self.ptime_s = ptime_s
        self.start = start
        self.max_burst = max_burst
        self._next_index = 0  # grid index of the next packet to release
        self.stats = PacerStats()

    @property
    def next_index(self) -> int:
        """Grid index of the next packet (= packets released + slots skipped)."""
        return self._next_index

    def deadline(self, index: int) -> float:
        return self.start + index * self.ptime_s

    def next_deadline(self) -> float:
        """When the next packet is due: sleep until then, then call :meth:`on_tick`."""
        return self.deadline(self._next_index)

    def on_tick(self, now: float) -> int:
        """How many packets to send now (0..max_burst); advances the grid past them and any skipped slots."""
        self.stats.ticks += 1
        # Index of the last slot whose deadline is <= now; the tiny epsilon absorbs float error at the edge.
        last_due = math.floor((now - self.start) / self.ptime_s + 1e-9)
        due = last_due - self._next_index + 1
        if due <= 0:
            return 0
        self.stats.max_lateness_s = max(self.stats.max_lateness_s, now - self.next_deadline())
        if due > self.max_burst:
            skipped = due - self.max_burst
            self.stats.skipped += skipped
            self._next_index += skipped
            due = self.max_burst
        self._next_index += due
        self.stats.packets += due
        self.stats.max_burst = max(self.stats.max_burst, due)
        return due

    def skipped_since(self, skipped_before: int) -> int:
        """Convenience for the I/O loop: slots skipped since a previous ``stats.skipped`` reading."""
        return self.stats.skipped - skipped_before


@dataclass(slots=True)
class OutputQueueStats:
    pushed: int = 0
    popped: int = 0
    dropped_oldest: int = 0  # the engine ran ahead of the pacer by more than max_packets
    silence: int = 0  # pops that found the queue empty and got the silence payload


class OutputQueue:
    """Bounded FIFO of fixed-size payloads (20 ms ulaw by default); pop() never blocks: silence when empty."""

    def __init__(
        self,
        max_packets: int = 16,
        *,
        silence: bytes = ULAW_SILENCE_20MS,
    ) -> None:
        if max_packets < 1:
            raise ValueError(f"max_packets must be >= 1, got {max_packets}")
        self.max_packets = max_packets
        self.silence = silence
        self.payload_size = len(silence)
        self._queue: deque[bytes] = deque()
        self.stats = OutputQueueStats()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def push(self, payload: bytes) -> None:
        """Queue one payload of exactly ``payload_size`` bytes; drops the oldest one when full."""
        if len(payload) != self.payload_size:
            raise ValueError(f"payload must be {self.payload_size} bytes, got {len(payload)}")
        if len(self._queue) >= self.max_packets:
            self._queue.popleft()
            self.stats.dropped_oldest += 1
        self._queue.append(bytes(payload))
        self.stats.pushed += 1

    def pop(self) -> bytes:
        """The oldest payload, or the silence payload when the queue is empty."""
        self.stats.popped += 1
        if self._queue:
            return self._queue.popleft()
        self.stats.silence += 1
        return self.silence

    def clear(self) -> None:
        """Forget queued audio (e.g. barge-in / a new persona); not counted as drops."""
        self._queue.clear()
