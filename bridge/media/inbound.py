"""The input of one call, sans-IO: RTP datagrams in, 80 ms engine frames (24 kHz float32) out.

Time is an argument everywhere: the I/O layer hands every datagram to :meth:`InboundPath.on_datagram` with
its source address and arrival time, and calls :meth:`InboundPath.poll` right after (a slot may be ready) and
at :attr:`InboundPath.deadline` (a slot whose packet never came is concealed then).

* **Source and stream.** Only the locked remote address is accepted (or the first one, when learning). The
  stream's SSRC is locked too: an SSRC is taken up (at the start, or as a new stream) only when two of its
  packets come in sequence, with nothing of the current stream in between (a re-INVITE or a re-bridged
  channel stops the old stream); anything else with another SSRC is junk, counted when it is clear that it
  is, and never resets the jitter buffer. (The first packet of a stream waits for the second: 20 ms, once.)
* **Junk budget.** Junk from the source (malformed, wrong payload type, wrong SSRC, wrong size) is dropped
  before it is parsed past its header, and counted per reason. Each call has a budget of it
  (``JUNK_PER_S``, ``JUNK_BURST``): beyond it, the call is *flooded* (:attr:`InboundPath.flooded`) and the
  I/O layer stops reading its socket per datagram, reading it in bounded batches instead
  (:meth:`InboundPath.flood_poll_at`: just after the stream's next packet is due, else every
  ``FLOOD_POLL_S``). A packet of the real stream then waits about ``FLOOD_CATCH_S`` more (at most
  ``FLOOD_POLL_S`` when it is late itself), and a flood costs the process a bounded share of a core,
  whatever its rate (beyond the batch, the kernel drops it).
* **Slots.** The jitter buffer is popped once per 20 ms slot on a grid anchored at the first packet's
  arrival: slot k is popped as soon as its packet is there (at most one ptime ahead of the grid), or
  concealed at ``nominal + jitter_target`` if it never comes. A grid left ``STALL_SLOTS`` behind (the loop
  stalled) is re-anchored rather than concealing a burst.
* **Delay comes back.** Each underrun (a packet later than ``nominal + jitter_target``) moves the stream a
  slot later on the grid; two of them leave every packet waiting about a slot for its turn, a delay the
  jitter buffer's own shedding (which needs a whole spare packet) does not see. So over each
  ``REPHASE_WINDOW`` played packets with no underrun, when every one of them waited at least
  ``REPHASE_MIN_S``, the grid moves earlier by the least wait (never past the latest packet's nominal
  time): the same audio goes to the engine that much sooner, and nothing is dropped or concealed.
  Each slot concealed for a packet that then came (an underrun, a wait for a reordered packet) puts the
  stream's audio a slot behind its arrival, whether or not its packets wait (up to a ptime they are played
  early, and the delay is then in the frames: each complete a packet early, with the audio of a slot
  before); the engine's answer follows it a slot late to the end of the call. So while the stream is behind
  (:meth:`InboundPath.slots_behind`), a quiet packet due next is cut (``turns.QUIET_RMS``), or after
  ``BEHIND_WAIT_S`` behind the next one, and its slot takes the packet after it: ``rtp_in_won_back``.
* **Frames.** Slots are decoded (or concealed) and resampled to 24 kHz once per 80 ms frame (a quarter of
  the numpy calls, the same samples: the FIR is streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from bridge.media.codecs import CodecError, InboundCodec, UnsupportedPayloadType, codec_for_payload_type
from bridge.media.fir_resample import FirResampler
from bridge.media.framing import FrameAccumulator
from bridge.media.jitter import JitterBuffer, Playout
from bridge.media.metrics import MediaStats, depth_bucket
from bridge.media.rtp import PT_PCMA, PT_PCMU, PT_SLIN16, RtpPacket, RtpParseError, parse_rtp
from bridge.media.turns import QUIET_RMS

PTIME_S = 0.020
ENGINE_RATE = 24000
STALL_SLOTS = 10  # input this many slots behind its grid (event-loop stall): re-anchor, don't conceal a burst
NO_STREAM_RECHECK_S = 0.1  # with no stream (or held), look again this often (for the media timeout)
JUNK_PER_S = 50.0  # junk datagrams a call may send per second at no cost to anyone...
JUNK_BURST = 100.0  # ...and at once; beyond, the call is flooded
FLOOD_POLL_S = 0.005  # a flooded call's socket is read this often: its real packets wait at most this long
FLOOD_READS = 64  # datagrams read per poll of a flooded socket (the rest is the kernel's to drop)
FLOOD_CATCH_S = 0.001  # ...and it is also read this long after the stream's next packet is expected
MAX_CANDIDATES = 4  # SSRCs held as possible streams at once (junk with random SSRCs cycles through them)
REPHASE_WINDOW = 50  # played packets (1 s) that must all have waited before the grid moves earlier...
REPHASE_MIN_S = 0.002  # ...by at least this much each (less is not worth a move)
SLOT_OUT_SAMPLES = int(ENGINE_RATE * PTIME_S)  # one slot at the engine's rate
_NO_LEAD = float("-inf")
BEHIND_WAIT_S = 0.5  # behind this long with no packet below QUIET_RMS due: the next one is cut anyway

InboundFormat = Literal["ulaw", "slin16"]
Float32Array = npt.NDArray[np.float32]


@dataclass(slots=True)
class InputFrame:
    """One 80 ms frame for the engine."""

    pcm: Float32Array  # 1920 samples at 24 kHz, [-1, 1]
    completed_at: float  # when its last slot was popped
    first_arrival: float  # when its first slot's packet arrived (popped, when concealed)
    last_arrival: float = 0.0  # when its last slot's packet arrived (popped, when concealed)


class InboundPath:
    """See the module docstring. ``stats`` is the call's."""

    def __init__(
        self,
        stats: MediaStats,
        *,
        now: float,
        inbound_format: InboundFormat = "ulaw",
        jitter_target_ms: int = 40,
        jitter_max_ms: int = 200,
        media_timeout_s: float = 30.0,
        slin16_payload_type: int = PT_SLIN16,
        learn_remote: bool = False,
    ) -> None:
        self.stats = stats
        self.inbound_format = inbound_format
        self.media_timeout_s = media_timeout_s
        self.learn_remote = learn_remote
        self.remote: tuple[str, int] | None = None
        self._slin16_pt = slin16_payload_type
        in_rate = 16000 if inbound_format == "slin16" else 8000
        slin16 = inbound_format == "slin16"
        self._accepted_pts = frozenset({slin16_payload_type} if slin16 else {PT_PCMU, PT_PCMA})
        self._payload_size = in_rate // 50 * (2 if inbound_format == "slin16" else 1)
        self.jitter = JitterBuffer(in_rate, 20, jitter_target_ms, jitter_max_ms)
        self._jitter_wait_s = jitter_target_ms / 1000.0
        self.resampler = FirResampler(in_rate, ENGINE_RATE)
        self._frames = FrameAccumulator()
        self._codecs: dict[int, InboundCodec] = {}
        self._last_codec: InboundCodec | None = None
        self._pending: list[npt.NDArray[np.int16]] = []  # decoded slots not yet resampled (done per frame)
        self._pending_out = 0  # 24 kHz samples they will make
        self._pending_first_arrival: float | None = None
        self.ssrc: int | None = None
        # SSRC -> the last packet of what may be a (new) stream, and when it came
        self._candidates: dict[int, tuple[RtpPacket, float]] = {}
        self.last_packet_at = now
        self._anchor: float | None = None
        self._slot = 0
        self._wait_min = float("inf")  # this window's least wait of a played packet for its slot (s)
        self._late_max = float("-inf")  # ...and the latest arrival relative to its slot's nominal time
        self._window_played = 0
        self._lead_s = 0.0  # how far ahead of their slots' nominal times the last frame's packets came (max)
        self._lead_next = _NO_LEAD  # ...the frame being filled's so far
        self._behind_base = 0  # _raw_behind() when the stream's timing last started
        self._behind_since: float | None = None  # the stream is a slot behind (since when)
        self.held = False
        self.timed_out = False
        self.deadline: float | None = now  # when poll() must run next
        self._junk_tokens = JUNK_BURST
        self._junk_at = now
        self.flooded = False

    @property
    def lost_packets(self) -> int:
        """Packets of the stream that never came (the jitter buffer's count)."""
        return self.jitter.stats.lost

    # -- datagrams -----------------------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> bool:
        """Check one datagram and queue it in the jitter buffer; True if it was accepted."""
        if self.remote is None:
            if not self.learn_remote:
                self._drop("not_locked", now)
                return False
            self.remote = addr
        if addr != self.remote:
            self._drop("foreign_source", now)
            return False
        # Cheap checks on the header bytes first: junk costs no more than this.
        if len(data) >= 2 and (data[1] & 0x7F) not in self._accepted_pts and data[0] >> 6 == 2:
            self._drop("rtcp" if 192 <= data[1] <= 223 else "payload_type", now)
            return False
        try:
            pkt = parse_rtp(data)
        except RtpParseError as exc:
            self._drop(exc.reason, now)
            return False
        if len(pkt.payload) != self._payload_size:
            self._drop("size", now)
            return False
        if self.held:
            self.stats.count_drop("held")
            return False
        if pkt.ssrc != self.ssrc:
            return self._candidate(pkt, now)
        self._drop_candidates(now)  # the stream goes on: nothing else was a new stream
        self._accept(pkt, now)
        return True

    def _candidate(self, pkt: RtpPacket, now: float) -> bool:
        """A packet of an SSRC that is not the stream's (or before there is one): a stream is taken up
        only when two of its packets come in sequence, with nothing of the current stream in between."""
        previous = self._candidates.pop(pkt.ssrc, None)
        if previous is not None:
            held, held_at = previous
            in_sequence = pkt.sequence == (held.sequence + 1) & 0xFFFF
            if in_sequence and (self.ssrc is None or self.last_packet_at <= held_at):
                if self.ssrc is not None:
                    self.stats.ssrc_changes += 1
                self.ssrc = pkt.ssrc
                self._anchor = None  # a new stream: new timing
                self._drop_candidates(now)
                self._accept(held, held_at)
                self._accept(pkt, now)
                return True
            self._drop("ssrc", now)  # the held one was no stream
        self._candidates[pkt.ssrc] = (pkt, now)
        if len(self._candidates) > MAX_CANDIDATES:
            del self._candidates[next(iter(self._candidates))]
            self._drop("ssrc", now)
        return False

    def _drop_candidates(self, now: float) -> None:
        for _ in range(len(self._candidates)):
            self._drop("ssrc", now)
        self._candidates.clear()

    def _accept(self, pkt: RtpPacket, now: float) -> None:
        self.stats.rtp_in += 1
        self.last_packet_at = now
        if self._anchor is None:
            self._anchor = now
            self._slot = 0
            self._lead_s = 0.0
            self._new_timing()
            self._reset_waits()
        self.jitter.push(pkt, now)

    def _drop(self, reason: str, now: float) -> None:
        """Count one junk datagram against the call's budget."""
        self.stats.count_drop(reason)
        tokens = min(JUNK_BURST, self._junk_tokens + (now - self._junk_at) * JUNK_PER_S) - 1.0
        self._junk_tokens, self._junk_at = max(tokens, 0.0), now
        if tokens < 0.0 and not self.flooded:
            self.flooded = True
            self.stats.junk_floods += 1

    def flood_over(self, now: float) -> bool:
        """Whether a flooded call's junk has fallen back within budget (then it is no longer flooded)."""
        if not self.flooded:
            return True
        tokens = min(JUNK_BURST, self._junk_tokens + (now - self._junk_at) * JUNK_PER_S)
        if tokens >= JUNK_BURST / 2:
            self.flooded = False
        return not self.flooded

    def flood_poll_at(self, now: float) -> float:
        """When a flooded call's socket is to be read next: just after the stream's next packet is expected
        (so a packet on time waits about FLOOD_CATCH_S, not up to FLOOD_POLL_S), else FLOOD_POLL_S on."""
        at = now + FLOOD_POLL_S
        if self._anchor is not None and not self.held:
            expected = self._anchor + self._slot * PTIME_S + FLOOD_CATCH_S
            if now < expected < at:
                at = expected
        return at

    # -- slots ---------------------------------------------------------------------------------------------

    def conceal_due(self, now: float) -> bool:
        """Whether :meth:`poll` at ``now`` would conceal a slot: the I/O layer reads its socket first (the
        packet may be there, unread because the loop ran late and this deadline came up first)."""
        if self._anchor is None or self.held:
            return False
        deadline = self._anchor + self._slot * PTIME_S + self._jitter_wait_s
        return now >= deadline and not self.jitter.next_ready()

    def slots_to_frame(self) -> int:
        """The slots still to play before the next frame is complete (1 to a frame's worth)."""
        missing = self._frames.block - self._frames.pending - self._pending_out
        return max(1, -(-missing // SLOT_OUT_SAMPLES))

    def frame_arrival_at(self) -> float | None:
        """When the packet that completes the next frame is due on the grid (None with no stream, or held)."""
        if self._anchor is None or self.held:
            return None
        # (Packets play up to a ptime ahead of their slot: after an underrun the stream is a slot later on the
        # grid and its packets come a ptime before their slots. The packets played last say how far ahead:
        # this frame's so far, else the last frame's.)
        lead = self._lead_s if self._lead_next == _NO_LEAD else self._frame_lead()
        return self._anchor + (self._slot + self.slots_to_frame() - 1) * PTIME_S - lead

    def _frame_lead(self) -> float:
        """How far ahead of their slots the frame being filled's packets came, within [0, a ptime]: never
        later than the grid (a late packet says nothing of the next one's phase), never more than the slot
        a packet may be played ahead of."""
        return max(0.0, min(self._lead_next, PTIME_S))

    def frame_deadline(self) -> float | None:
        """When the I/O layer must look next if it reads its socket once per frame: a frame's first slots are
        only decoded when its last one is played, so with nothing queued their packets can wait, unread, for
        the one that completes the frame, and the look is that slot's concealment deadline (the reads are the
        I/O layer's, at the stream's phase). With packets queued (the next one missing) or no stream, it is
        :attr:`deadline`, as for a socket read per datagram."""
        deadline = self.deadline
        if self._anchor is None or self.held or self.timed_out or deadline is None or self.jitter.depth:
            return deadline
        ahead = min(self.slots_to_frame(), self.jitter.max_packets)
        last_slot = self._anchor + (self._slot + ahead - 1) * PTIME_S + self._jitter_wait_s
        return max(deadline, min(last_slot, self.last_packet_at + self.media_timeout_s))

    def poll(self, now: float) -> list[InputFrame]:
        """Play every slot that is due at ``now``; the frames completed for the engine. Sets
        :attr:`deadline` (the next look) and, when no packet came for ``media_timeout_s``, ``timed_out``."""
        frames: list[InputFrame] = []
        jitter = self.jitter
        while True:
            last = self.last_packet_at
            if not self.held and now - last >= self.media_timeout_s:
                self.timed_out = True
                self.deadline = None
                return frames
            if self.held:  # (no timeout while held: a deadline at last + timeout would be in the past)
                self.deadline = now + NO_STREAM_RECHECK_S
                return frames
            if self._anchor is None:
                self.deadline = min(now + NO_STREAM_RECHECK_S, last + self.media_timeout_s)
                return frames
            nominal = self._anchor + self._slot * PTIME_S
            deadline = nominal + self._jitter_wait_s
            if now - deadline > STALL_SLOTS * PTIME_S:
                self._anchor = None if jitter.depth == 0 else now
                self._slot = 0
                self._lead_s = 0.0
                self._new_timing()
                self._reset_waits()
                continue
            early = nominal - PTIME_S
            if now >= deadline or (now >= early and jitter.next_ready()):
                if self.slots_behind() > 0 and jitter.next_ready() and self._win_back_slot(now):
                    continue  # (the slot takes the packet after it, when it comes)
                playout = jitter.pop(now)
                if playout.kind == "packet" and playout.buffered_s is not None:
                    self._lead_next = max(self._lead_next, nominal - (now - playout.buffered_s))
                self._play_slot(playout, now, frames)
                self._slot += 1
                self._track_waits(playout, nominal, now)
                continue
            # A packet already queued for the next slot is played at its early time; with none queued, the
            # next look is the concealment deadline (an arrival before it is polled by the I/O layer anyway:
            # a look at every early time woke the call once per packet for nothing).
            look = early if now < early and jitter.next_ready() else deadline
            self.deadline = min(look, last + self.media_timeout_s)
            return frames

    def _raw_behind(self) -> int:
        js = self.jitter.stats
        return js.concealed - js.lost - js.latency_dropped - js.overflow_dropped

    def _new_timing(self) -> None:
        self._behind_base = self._raw_behind()
        self._behind_since = None

    def slots_behind(self) -> int:
        """Slots the stream plays later than it came, since its timing started: one for each slot concealed
        for a packet that came after all (an underrun, a wait for a reordered packet), less each won back.
        (A lost packet's slot is concealed in its place: no slot more.)"""
        return self._raw_behind() - self._behind_base

    def _win_back_slot(self, now: float) -> bool:
        """See "Delay comes back" in the module docstring: cut the packet due next if it is quiet (or the
        stream has been behind for BEHIND_WAIT_S); True if it was."""
        if self._behind_since is None:
            self._behind_since = now
        pkt = self.jitter.next_packet()
        if pkt is None:
            return False
        if now - self._behind_since < BEHIND_WAIT_S:
            codec = self._codec(pkt.payload_type)
            if codec is None:
                return False
            try:
                if codec.rms(pkt.payload) >= QUIET_RMS:  # (the packet may yet play: decoded aside)
                    return False
            except CodecError:
                return False
        if not self.jitter.skip_next():
            return False
        self.stats.rtp_in_won_back += 1
        self._behind_since = None if self.slots_behind() <= 0 else now
        return True

    def _track_waits(self, playout: Playout, nominal: float, now: float) -> None:
        """See "Delay comes back" in the module docstring."""
        if playout.kind == "underrun":  # the grid just moved later: start a new window
            self._reset_waits()
            return
        if playout.kind != "packet" or playout.buffered_s is None:
            return  # (a gap's concealment is loss, not timing)
        self._wait_min = min(self._wait_min, playout.buffered_s)
        self._late_max = max(self._late_max, now - playout.buffered_s - nominal)
        self._window_played += 1
        if self._window_played < REPHASE_WINDOW:
            return
        shift = min(self._wait_min, -self._late_max)
        self._reset_waits()
        if shift >= REPHASE_MIN_S and self._anchor is not None:
            self._anchor -= shift
            self._lead_s -= shift
            self.stats.rtp_in_rephased += 1

    def _reset_waits(self) -> None:
        self._wait_min, self._late_max, self._window_played = float("inf"), float("-inf"), 0

    def _play_slot(self, playout: Playout, now: float, frames: list[InputFrame]) -> None:
        if playout.kind == "idle":
            return
        stats = self.stats
        stats.slots_played += 1
        pcm: npt.NDArray[np.int16] | None = None
        arrival = now
        waited: float | None = None  # (a packet's, from its arrival to this pop)
        if playout.payload is not None and playout.payload_type is not None:
            codec = self._codec(playout.payload_type)
            if codec is not None:
                try:
                    pcm = codec.decode(playout.payload)
                except CodecError:
                    stats.decode_errors += 1
            if playout.buffered_s is not None:
                waited = playout.buffered_s
                arrival = now - waited
        if pcm is None:
            stats.slots_concealed += 1
            codec = self._last_codec or self._codec(self._default_pt())
            assert codec is not None
            pcm = codec.conceal()
        if self._pending_first_arrival is None:
            self._pending_first_arrival = arrival
        resampler = self.resampler
        self._pending.append(pcm)
        self._pending_out += len(pcm) * resampler.up // resampler.down
        if self._frames.pending + self._pending_out < self._frames.block:
            return
        if self._lead_next != _NO_LEAD:  # (a frame of concealment alone says nothing of the stream's phase)
            self._lead_s = self._frame_lead()
        self._lead_next = _NO_LEAD
        # What the jitter buffer adds to the frame: its last packet's wait, and what is queued behind it (the
        # earlier slots' waits are the framing's: read once per frame, they are popped together).
        stats.jitter_depths[depth_bucket(self.jitter.depth)] += 1
        if waited is not None:
            stats.jitter_delay_ms.add(waited * 1000.0)
        chunk = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        first_arrival = self._pending_first_arrival
        last_arrival = arrival
        self._pending.clear()
        self._pending_out = 0
        self._pending_first_arrival = None
        resampled = resampler.process(chunk)
        if self._frames.pending == 0 and len(resampled) == self._frames.block:
            # (the usual case: four slots make one whole frame; the resampler's array is this frame's own)
            frames.append(InputFrame(resampled, now, first_arrival, last_arrival))
            return
        for frame in self._frames.push(resampled):
            frames.append(InputFrame(frame, now, first_arrival, last_arrival))

    def _default_pt(self) -> int:
        return self._slin16_pt if self.inbound_format == "slin16" else PT_PCMU

    def _codec(self, payload_type: int) -> InboundCodec | None:
        codec = self._codecs.get(payload_type)
        if codec is None:
            try:
                codec = codec_for_payload_type(payload_type, self._slin16_pt)
            except UnsupportedPayloadType:
                self.stats.decode_errors += 1
                return None
            self._codecs[payload_type] = codec
        self._last_codec = codec
        return codec

    # -- hold ----------------------------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold: datagrams are dropped (counted ``held``), no frames, no media timeout."""
        self.held = True

    def resume(self, now: float) -> None:
        """End a hold: the next packet starts a new stream, with new timing."""
        if not self.held:
            return
        self.held = False
        self.jitter.reset()
        self._frames.reset()
        self._pending.clear()
        self._pending_out = 0
        self._pending_first_arrival = None
        self._anchor = None
        self.ssrc = None
        self._candidates.clear()
        self.last_packet_at = now
        self.deadline = now


__all__ = [
    "FLOOD_POLL_S",
    "FLOOD_READS",
    "JUNK_BURST",
    "JUNK_PER_S",
    "InboundFormat",
    "InboundPath",
    "InputFrame",
]
