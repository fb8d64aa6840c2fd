"""Adaptive, low-latency jitter buffer for one inbound RTP stream, sans-IO (time is an argument).

The I/O layer pushes every parsed packet with its arrival time and pops exactly one 20 ms slot per ptime.
Each pop returns the next packet in sequence order, or a *concealed* slot the I/O layer fills with PLC.

Policy (all decisions are made at pop time, on the packet ``next`` expected in sequence order):

* **In order, no added delay.** There is no pre-fill: if packet ``next`` is buffered it is played at once,
  even if it arrived a microsecond ago. On a clean network the buffer adds only the phase between arrival and
  the pop tick (< 1 ptime).
* **Underrun grows the delay.** If the buffer is empty the slot is concealed (``kind="underrun"``) and
  ``next`` stays where it is: when the late packet turns up it is played, one ptime later than planned. This
  is how the delay adapts upwards to the jitter actually seen, one slot per underrun, up to ``max_ms``.
* **A gap waits at most ``target_ms``.** If ``next`` is missing but later packets are buffered, the gap is
  measured in *time* from RTP timestamps (missing slots = timestamp distance / samples per slot). Gap slots
  already concealed (underruns while waiting) count towards it. While fewer slots than the gap have been
  concealed and the first buffered packet has waited less than ``target_ms``, the slot is concealed
  (``kind="gap"``) in case the missing packet is only reordered; otherwise the gap is given up and the first
  buffered packet plays. So a single loss costs exactly one concealed slot, in its own place, and no delay.
  Only on a stream that has reordered packets in the last ``reorder_memory_s`` does ``next`` get the whole
  ``target_ms`` (from the first pop that missed it) even when the gap is already covered: waiting costs
  delay, so it is paid only where it buys something.
* **Sender discontinuities are not loss.** If the sequence gap and the timestamp gap disagree (Asterisk pauses
  RTP ~200 ms while a DTMF digit is pressed: sequence +~20, timestamp +~1600), or the packet has the marker
  bit, the missing sequence numbers were never audio: the packet plays at once (no catch-up burst of
  concealment), counted as a ``discontinuity``, not as lost.
* **Excess delay is shed slowly.** If every pop for ``shrink_after_ms`` found at least one packet more than
  the one it played, that packet of slack was never needed: one packet is dropped (``latency_dropped``).
* **Hard bound.** At most ``max_ms / ptime_ms`` packets are held; pushing beyond drops the oldest
  (``overflow_dropped``), and playout continues after it.
* **Stream identity.** Sequence numbers are extended past 65535. An SSRC change resets the buffer
  (``resets``); so do two consecutive packets far outside the window (a sender restart keeping its SSRC,
  RFC 3550 A.1 style probation); a single stray one is dropped (``out_of_range``). Packets behind ``next``
  are ``late`` (or ``duplicates`` if already played).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from bridge.media.rtp import RtpPacket, seq_diff, ts_diff

PlayoutKind = Literal["packet", "gap", "underrun", "idle"]

#: Packets further behind ``next`` than this, or ahead by more than MAX_DROPOUT, are out of the window.
MAX_MISORDER = 100
MAX_DROPOUT = 3000
_PLAYED_MEMORY = 128  # played sequence numbers remembered to tell duplicates from late packets


@dataclass(slots=True)  # (a value, but not frozen: one is made per 20 ms slot, 8x dearer frozen)
class Playout:
    """One 20 ms slot. ``payload=None, concealed=True``: the I/O layer must conceal (PLC) this slot.

    ``kind``: ``packet`` (a real packet), ``gap`` (waiting for / standing in for missing packets),
    ``underrun`` (nothing buffered), ``idle`` (no packet received yet: play silence)."""

    payload: bytes | None
    sequence: int | None
    concealed: bool
    kind: PlayoutKind = "packet"
    timestamp: int | None = None
    payload_type: int | None = None
    extended_sequence: int | None = None
    #: Time the packet spent in the buffer (pop time - arrival), for delay metrics.
    buffered_s: float | None = None


@dataclass(slots=True)
class JitterStats:
    received: int = 0  # push() calls
    played: int = 0  # slots that carried a packet
    concealed: int = 0  # slots concealed (gap + underrun), idle slots not included
    underruns: int = 0
    duplicates: int = 0
    late: int = 0
    reordered: int = 0  # arrived after a higher sequence number, still in time
    lost: int = 0  # sequence numbers given up (network loss), not sender discontinuities
    discontinuities: int = 0  # sender-side jumps (DTMF pause, talkspurt marker, timestamp jump)
    overflow_dropped: int = 0
    latency_dropped: int = 0
    out_of_range: int = 0
    resets: int = 0
    reset_dropped: int = 0  # buffered packets discarded by a reset
    depth: int = 0  # packets buffered now
    max_depth: int = 0


class JitterBuffer:
    """See the module docstring for the playout policy."""

    def __init__(
        self,
        clock_rate: int = 8000,
        ptime_ms: int = 20,
        target_ms: int = 40,
        max_ms: int = 200,
        shrink_after_ms: int = 1000,
        reorder_memory_s: float = 10.0,
    ) -> None:
        if clock_rate <= 0 or ptime_ms <= 0:
            raise ValueError("clock_rate and ptime_ms must be > 0")
        if max_ms < ptime_ms:
            raise ValueError(f"max_ms ({max_ms}) must hold at least one packet of {ptime_ms} ms")
        if not 0 <= target_ms <= max_ms:
            raise ValueError(f"target_ms ({target_ms}) must be in 0..max_ms ({max_ms})")
        self.clock_rate = clock_rate
        self.ptime_ms = ptime_ms
        self.target_ms = target_ms
        self.max_ms = max_ms
        self.samples_per_slot = clock_rate * ptime_ms // 1000
        self.max_packets = max_ms // ptime_ms
        self._target_s = target_ms / 1000.0
        self._shrink_pops = max(1, shrink_after_ms // ptime_ms)
        self._reorder_memory_s = reorder_memory_s
        self.stats = JitterStats()
        self._buffer: dict[int, tuple[RtpPacket, float]] = {}
        self._ssrc: int | None = None
        self._init_stream_state()

    def _init_stream_state(self) -> None:
        self._buffer.clear()
        self._highest = 0  # highest extended sequence number seen
        self._next = 0  # extended sequence number of the next packet to play
        self._anchor_ts = 0  # RTP timestamp of the last packet played (or dropped)
        self._concealed_run = 0  # slots concealed since the last packet was played
        self._missing_since: float | None = None  # first pop that found `next` missing
        self._last_reorder_at: float | None = None
        self._played: deque[int] = deque(maxlen=_PLAYED_MEMORY)
        self._played_set: set[int] = set()
        self._probation: tuple[int, int] | None = None  # (ssrc, sequence) of a far-off packet
        self._window_min = self.max_packets + 1
        self._window_pops = 0
        self._update_depth()

    # -- introspection -------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._buffer)

    @property
    def depth_ms(self) -> int:
        return len(self._buffer) * self.ptime_ms

    def next_ready(self) -> bool:
        """Whether the packet :meth:`pop` would play next is already buffered (pop would not conceal)."""
        return self._next in self._buffer

    def next_packet(self) -> RtpPacket | None:
        """The packet :meth:`pop` would play next, if it is buffered."""
        entry = self._buffer.get(self._next)
        return entry[0] if entry is not None else None

    def skip_next(self) -> bool:
        """Drop the packet :meth:`pop` would play next (the stream is a slot behind and the caller wins the
        slot back: counted in ``latency_dropped``); False if it is not buffered."""
        if self._next not in self._buffer:
            return False
        pkt, _ = self._buffer.pop(self._next)
        self._advance_past(self._next, pkt)
        self.stats.latency_dropped += 1
        self._update_depth()
        return True

    @property
    def started(self) -> bool:
        return self._ssrc is not None

    def _update_depth(self) -> None:
        self.stats.depth = len(self._buffer)
        self.stats.max_depth = max(self.stats.max_depth, self.stats.depth)

    # -- push ----------------------------------------------------------------------------------------------

    def _start(self, pkt: RtpPacket) -> None:
        self.stats.reset_dropped += len(self._buffer)
        self._ssrc = pkt.ssrc
        self._init_stream_state()
        self._highest = self._next = pkt.sequence
        # As if the packet before this one had just been played: no gap, no concealment owed.
        self._anchor_ts = (pkt.timestamp - self.samples_per_slot) % (1 << 32)

    def reset(self) -> None:
        """Forget the stream (the next packet starts a new one)."""
        self.stats.reset_dropped += len(self._buffer)
        self._ssrc = None
        self._init_stream_state()

    def push(self, pkt: RtpPacket, arrival: float) -> None:
        """Add a received packet; never raises on any valid :class:`RtpPacket`."""
        self.stats.received += 1
        if self._ssrc is None:
            self._start(pkt)
        elif pkt.ssrc != self._ssrc:
            self.stats.resets += 1
            self._start(pkt)
        ext = self._highest + seq_diff(pkt.sequence, self._highest & 0xFFFF)
        offset = ext - self._next
        if offset < -MAX_MISORDER or offset > MAX_DROPOUT:
            if self._probation == (pkt.ssrc, (pkt.sequence - 1) & 0xFFFF):
                self.stats.resets += 1
                self._start(pkt)
                ext = self._next
            else:
                self._probation = (pkt.ssrc, pkt.sequence)
                self.stats.out_of_range += 1
                return
        self._probation = None
        if ext < self._next:
            if ext in self._played_set:
                self.stats.duplicates += 1
            else:
                self.stats.late += 1
            return
        if ext in self._buffer:
            self.stats.duplicates += 1
            return
        if ext < self._highest:
            self.stats.reordered += 1
            self._last_reorder_at = arrival
        self._highest = max(self._highest, ext)
        self._buffer[ext] = (pkt, arrival)
        while len(self._buffer) > self.max_packets:
            oldest = min(self._buffer)
            dropped, _ = self._buffer.pop(oldest)
            self.stats.overflow_dropped += 1
            self.stats.lost += oldest - self._next  # never-received packets before it
            self._advance_past(oldest, dropped)
        self._update_depth()

    # -- pop -----------------------------------------------------------------------------------------------

    def _advance_past(self, ext: int, pkt: RtpPacket) -> None:
        self._next = ext + 1
        self._anchor_ts = pkt.timestamp
        self._concealed_run = 0
        self._missing_since = None

    def _reordering_recently(self, now: float) -> bool:
        return self._last_reorder_at is not None and now - self._last_reorder_at < self._reorder_memory_s

    def _play(self, ext: int, now: float) -> Playout:
        pkt, arrival = self._buffer.pop(ext)
        self._advance_past(ext, pkt)
        played = self._played
        if len(played) == _PLAYED_MEMORY:  # the deque forgets its oldest: so does the set (O(1) per pop)
            self._played_set.discard(played[0])
        played.append(ext)
        self._played_set.add(ext)
        self.stats.played += 1
        self._update_depth()
        return Playout(
            payload=pkt.payload,
            sequence=pkt.sequence,
            concealed=False,
            kind="packet",
            timestamp=pkt.timestamp,
            payload_type=pkt.payload_type,
            extended_sequence=ext,
            buffered_s=max(0.0, now - arrival),
        )

    def _conceal(self, kind: PlayoutKind) -> Playout:
        self._concealed_run += 1
        self.stats.concealed += 1
        if kind == "underrun":
            self.stats.underruns += 1
        return Playout(payload=None, sequence=None, concealed=True, kind=kind)

    def _shed_excess_delay(self, depth_before: int) -> None:
        """Track the least depth seen; drop one packet if a whole window always had slack."""
        self._window_min = min(self._window_min, depth_before)
        self._window_pops += 1
        if self._window_pops < self._shrink_pops:
            return
        slack = self._window_min >= 2 and self._next in self._buffer and self._next + 1 in self._buffer
        self._window_min = self.max_packets + 1
        self._window_pops = 0
        if slack:
            pkt, _ = self._buffer.pop(self._next)
            self._advance_past(self._next, pkt)
            self.stats.latency_dropped += 1
            self._update_depth()

    def pop(self, now: float) -> Playout:
        """The next 20 ms slot (call exactly once per ptime)."""
        if self._ssrc is None:
            return Playout(payload=None, sequence=None, concealed=True, kind="idle")
        self._shed_excess_delay(len(self._buffer))
        if self._next in self._buffer:
            return self._play(self._next, now)
        if self._missing_since is None:
            self._missing_since = now
        if not self._buffer:
            return self._conceal("underrun")
        head = min(self._buffer)
        pkt, arrival = self._buffer[head]
        seq_gap = head - self._next
        gap_samples = ts_diff(pkt.timestamp, self._anchor_ts) - self.samples_per_slot
        is_loss = not pkt.marker and gap_samples == seq_gap * self.samples_per_slot
        if not is_loss:
            # Sender-side jump: the missing sequence numbers never carried audio; play now, no burst.
            self.stats.discontinuities += 1
            return self._play(head, now)
        if self._concealed_run < seq_gap and now - arrival < self._target_s:
            return self._conceal("gap")  # maybe only reordered: wait for it, concealing meanwhile
        if self._reordering_recently(now) and now - self._missing_since < self._target_s:
            return self._conceal("gap")  # this network reorders: give `next` the whole target
        self.stats.lost += seq_gap
        return self._play(head, now)
