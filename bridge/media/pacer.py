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

:class:`SlotBuffer` sits between the engine (80 ms frames) and the pacer (20 ms ticks).
"""

from __future__ import annotations

import math
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

    def __init__(self, ptime_s: float, *, start: float, max_burst: int = 3) -> None:
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
class SlotBufferStats:
    queued: int = 0  # payloads put in a future (or the next) slot
    taken: int = 0  # ticks served
    silence: int = 0  # ticks whose slot had nothing: silence went out
    late: int = 0  # payloads whose slot had already gone out (dropped)
    skipped: int = 0  # slots given up by the pacer after a stall (their payloads dropped)
    replaced: int = 0  # payloads put in a slot that already had one (the newer one kept)
    dropped_quiet: int = 0  # payloads taken out of the timeline by drop_quietest


class SlotBuffer:
    """The output's playout buffer: payloads keyed by the pacer slot they must go out in, not a FIFO.

    The caller maps each engine frame to slots by its sequence number (frame ``n`` → slots ``4n .. 4n+3`` plus
    an offset fixed when the stream is anchored), so a frame's audio always plays at the same place in the
    call's timeline: a late frame loses only the slots that already went out as silence, and frames that come
    in a burst after a stall wait for their own slots instead of queueing up behind each other, so a stall
    never turns into lasting delay. Bounded by ``horizon``: a payload further ahead than that is refused
    (``put`` returns False) so the caller can re-anchor.
    """

    def __init__(self, horizon: int = 16, *, silence: bytes = ULAW_SILENCE_20MS) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.silence = silence
        self.payload_size = len(silence)
        self.next_slot = 0  # the slot the next tick plays
        self._slots: dict[int, bytes] = {}
        self._levels: dict[int, int] = {}
        self.stats = SlotBufferStats()

    @property
    def depth(self) -> int:
        """Payloads waiting for their slot."""
        return len(self._slots)

    def has(self, slot: int) -> bool:
        """Whether a payload is queued for ``slot``."""
        return slot in self._slots

    def ahead(self, slot: int) -> int:
        """How many ticks until ``slot`` goes out (0: the next tick; negative: already gone)."""
        return slot - self.next_slot

    def put(self, slot: int, payload: bytes, level: int = 0) -> bool:
        """Queue ``payload`` for ``slot``; ``level``: its loudness (any monotonic measure, e.g. RMS), for
        :meth:`drop_quietest`. False (nothing kept) when the slot is more than ``horizon`` ahead; True
        otherwise, also when it was late (counted and dropped)."""
        if len(payload) != self.payload_size:
            raise ValueError(f"payload must be {self.payload_size} bytes, got {len(payload)}")
        ahead = slot - self.next_slot
        if ahead < 0:
            self.stats.late += 1
            return True
        if ahead >= self.horizon:
            return False
        if slot in self._slots:
            self.stats.replaced += 1
        self._slots[slot] = bytes(payload)
        self._levels[slot] = level
        self.stats.queued += 1
        return True

    def take(self) -> tuple[int, bytes | None]:
        """The next tick's slot and its payload (None: nothing for it; the caller sends silence)."""
        slot = self.next_slot
        self.next_slot += 1
        self.stats.taken += 1
        payload = self._slots.pop(slot, None)
        self._levels.pop(slot, None)
        if payload is None:
            self.stats.silence += 1
        return slot, payload

    def skip(self, count: int) -> None:
        """The pacer gave up ``count`` slots after a stall: their audio goes too."""
        for slot in range(self.next_slot, self.next_slot + count):
            self._slots.pop(slot, None)
            self._levels.pop(slot, None)
        self.next_slot += count
        self.stats.skipped += count

    def clear(self) -> None:
        """Forget queued audio (hold, re-anchoring); not counted as drops."""
        self._slots.clear()
        self._levels.clear()

    def drop_quietest(self, max_level: int | None = None) -> int | None:
        """Take one slot out of the timeline: the quietest queued payload (no louder than ``max_level``) is
        dropped and every payload after it moves one slot earlier. Returns the dropped slot, or None when
        nothing qualified. This is how audio played late (a silence slot went out before it) is made up for
        without cutting speech or running the RTP clock fast."""
        if not self._slots:
            return None
        slot = min(self._slots, key=lambda k: (self._levels[k], k))
        if max_level is not None and self._levels[slot] > max_level:
            return None
        del self._slots[slot], self._levels[slot]
        for later in sorted(k for k in self._slots if k > slot):
            self._slots[later - 1] = self._slots.pop(later)
            self._levels[later - 1] = self._levels.pop(later)
        self.stats.dropped_quiet += 1
        return slot
