"""When a call's RTP socket is read, with the media clock ticking (``media_tick_ms``), sans-IO.

Read per datagram, a call wakes the event loop 50 times a second for its input alone, at its own phase;
with 50 calls that was half of the bridge's wake-ups, and the wake-ups (an epoll round, the loop's dispatch,
cold caches), not the packets, were most of its CPU. A stream's packets come every 20 ms, so the socket can
be read when the next one is due instead, on the clock's ticks, where the other calls' reads and sends of
that tick share the wake-up:

* **waiting** (the call's start, and a stream that stopped): the socket is read as datagrams come (readiness),
  since there is no phase to read at;
* **polled**: once packets came, the socket is not watched; it is read, until empty, at the stream's phase
  (the tick that found a packet, plus one ptime per packet). Every ``PROBE_EVERY`` packets it is read a tick
  earlier: a stream whose phase moved earlier is followed a tick at a time (or its packets would wait in the
  socket for ever). A read that finds nothing is repeated each tick; a packet found late does not move the
  phase (jitter), ``LATE_STREAK`` of them in a row do (the stream's phase moved later); after ``GIVE_UP_S``
  without a packet the call goes back to waiting.

Where the kernel stamps arrivals, the reads are once per 80 ms frame (:meth:`expect`), when the packet that
completes it is due on the input path's grid: the packets before it wait in the socket, stamped, at no cost
to the frame, whose audio leaves when its last packet is played anyway; a call then wakes 12.5 times a second
for its input instead of 50. That packet waits in the socket at most a tick when it is on time, and a read
that finds it late is repeated each tick, as above.

The schedule keeps to read times; the I/O layer gives the input path each datagram's arrival from the
kernel's stamp where it has one (CallMedia), and asks :attr:`next_read_at` and :attr:`polled`.
"""

from __future__ import annotations

import math

PTIME_S = 0.020
PROBE_EVERY = 5  # reads at the phase between two reads a tick early
LATE_STREAK = 3  # packets found late in a row that move the phase later
GIVE_UP_S = 0.060  # this long past a packet's read time with nothing read: wait for readiness instead


class ReadSchedule:
    """See the module docstring. ``tick_s``: the media clock's tick (> 0)."""

    def __init__(self, tick_s: float, *, ptime_s: float = PTIME_S) -> None:
        if tick_s <= 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s}")
        self.tick_s = tick_s
        self.ptime_s = ptime_s
        self.polled = False
        self.next_read_at: float | None = None  # polled: when to read next
        self._expected = 0.0  # the tick the stream's next packet is read at (its phase)
        self._probe = False  # the next read is a tick before the phase
        self._phased = 0  # packets found since the last probe
        self._late = 0  # packets found late in a row
        self.polled_reads = 0  # polled reads that found packets
        self.probes_early = 0  # probes that found a packet (the phase moved a tick earlier)
        self.misses = 0  # polled reads that found nothing
        self.gave_up = 0  # times the stream stopped and the call went back to waiting

    def _tick_of(self, now: float) -> float:
        """The tick a read at ``now`` was served for (the clock serves a tick at it or just after)."""
        return math.floor(now / self.tick_s + 1e-6) * self.tick_s

    def on_packets(self, now: float, *, polled_read: bool, arrival: float | None = None) -> None:
        """Packets were read at ``now``: by a polled read (served at a tick), or as they came (readiness).
        ``arrival``: the newest one's arrival, where the kernel stamps them: the tick after it is the
        stream's phase, exactly (no probing: the stamp says when it came, however late it was read)."""
        if arrival is not None:
            self.polled_reads += int(polled_read)
            self._late = 0
            self._probe = False
            self.polled = True
            self._expected = math.ceil(arrival / self.tick_s - 1e-6) * self.tick_s + self.ptime_s
            self.next_read_at = self._expected
            return
        half = self.tick_s / 2
        if not polled_read:
            phase = math.ceil(now / self.tick_s - 1e-6) * self.tick_s  # (the first tick after the arrival)
            self._late = 0
        else:
            self.polled_reads += 1
            read_at = self._tick_of(now)
            if not self.polled:
                phase = read_at
            elif read_at < self._expected - half:  # the probe found it
                self.probes_early += 1
                phase, self._late = read_at, 0
            elif read_at <= self._expected + half:  # on time
                phase, self._late = self._expected, 0
            else:  # found after reads that missed it
                self._late += 1
                phase = self._expected
                if self._late >= LATE_STREAK:
                    phase, self._late = read_at, 0
        self.polled = True
        self._expected = phase + self.ptime_s
        self._phased += 1
        self._probe = self._phased >= PROBE_EVERY
        if self._probe:
            self._phased = 0
        self.next_read_at = self._expected - (self.tick_s if self._probe else 0.0)

    def expect(self, at: float) -> None:
        """After :meth:`on_packets`: the next read is at ``at``, the input path's expected arrival of the
        packet that completes the next frame (the input decodes a frame's packets together when its last one
        comes, so reading the ones before it earlier buys nothing but wake-ups)."""
        if self.polled:
            self._expected = at
            self._probe = False
            self.next_read_at = at

    def on_empty(self, now: float) -> None:
        """A polled read at ``now`` found nothing: read again next tick, or give up on the phase."""
        if not self.polled:
            return
        self.misses += 1
        if now - self._expected >= GIVE_UP_S:
            self.gave_up += 1
            self.reset()
            return
        self.next_read_at = self._tick_of(now) + self.tick_s

    def reset(self) -> None:
        """Back to waiting for readiness (a stream that stopped)."""
        self.polled = False
        self.next_read_at = None
        self._probe = False
        self._phased = 0
        self._late = 0
