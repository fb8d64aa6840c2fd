"""The output timeline of one call, sans-IO: engine frames in, paced µ-law RTP datagrams out.

Time is an argument everywhere: the I/O layer (``CallMedia``) calls :meth:`OutputTimeline.poll` at
:meth:`OutputTimeline.next_deadline`, hands each engine frame to :meth:`OutputTimeline.on_frame`, and sends
whatever datagrams either returns. Tests drive the same object with scripted arrival schedules on virtual
time.

* **Grid.** One packet every 20 ms on ``Pacer``'s grid, anchored ``OUTPUT_PHASE_S`` after the first engine
  frame arrives. Frame ``n`` plays in slots ``4n + offset .. 4n + offset + 3`` of a ``SlotBuffer``, whatever
  order and moment it arrives in.
* **Steering.** ``PlayoutPhase`` keeps the last 4 s of frame margins (first slot's tick − arrival) and asks
  for the grid to sit just after about the 98th percentile of arrivals; the shift is *slewed* in at most
  ``SLEW_STEP_S`` per packet (each interval stays within 20 ± 0.5 ms), and only within ``GRID_RANGE_S`` of the
  anchor, so the RTP clock never drifts by more than that. Larger moves are made in whole slots.
* **Holds.** When a frame's first tick comes, the frame is not there but the engine already has its input,
  that packet is held up to ``LATE_GRACE_S`` and leaves as the frame arrives; the grid then follows the wait
  (within its range). Holds come out of a per-call budget (``HOLDS_PER_S``, ``HOLDS_BURST``).
* **Expansion and shrink.** A frame up to ``EXPAND_MAX_SLOTS`` slots late plays whole, that much later (the
  timeline moves later by whole slots). Every slot inserted that way is owed back (``owed_slots``): a quiet
  queued slot (a pause between words) is taken out, or after ``SHRINK_WAIT_S`` the quietest one there is, so
  a late frame costs its delay for at most about half a second. The phase controller sees the margins the
  grid will have once the owed slots are won back. A slot is kept instead (``rtp_out_kept``) when the
  controller still wants the grid later beyond its range, or when a frame is late again within
  ``REINSERT_KEEP_S`` of a win-back (the engine's phase moved: winning that back too would cut speech and
  insert silence over and over); kept slots are moves of the grid that the controller gives back when its
  margins allow. Before, a slot was won back only when the controller asked for an earlier grid, and calls
  kept a 20 ms insertion for the rest of the call.
* **Resync.** When the engine's numbering and the timeline part (``RESYNC_AFTER_LATE_FRAMES`` frames in a row
  entirely late, or a frame beyond the buffer's horizon), the numbering is re-anchored.
* **Own lateness.** Frames handled while the bridge's loop runs behind (``loop_behind``) are not evidence of
  the engine's phase: they are not observed, and a late one is cut, not expanded.
"""

from __future__ import annotations

import audioop
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bridge.media.codecs import ULAW_SILENCE_20MS, float32_to_pcm16
from bridge.media.fir_resample import FirResampler
from bridge.media.framing import PacketSplitter
from bridge.media.media_clock import COALESCE_S  # a deadline this close ahead is served now: count it due
from bridge.media.metrics import LatencyLedger, MediaStats
from bridge.media.pacer import Pacer, SlotBuffer
from bridge.media.playout_phase import PlayoutPhase
from bridge.media.rtp import PT_PCMU, RtpSender
from bridge.media.turns import QUIET_RMS, is_voiced

PTIME_S = 0.020
OUT_SAMPLES = 160  # 20 ms of 8 kHz µ-law
PACKETS_PER_FRAME = 4  # 20 ms packets per 80 ms engine frame
OUTPUT_PHASE_S = 0.005  # grid margin after engine frames: below ~5 ms, loop jitter alone made frames late
SLEW_STEP_S = 0.0005  # most the grid moves per packet: the interval stays within 20 ± 0.5 ms
LATE_GRACE_S = 0.006  # a frame due but not here at its first tick is waited for this long before silence
HOLDS_PER_S = 0.25  # the held packets' pacing budget: one per 4 s on average (0.5 % of intervals off-grid)...
HOLDS_BURST = 2  # ...two at a time at most
FLOWING_S = 0.200  # frames count as due only while they keep coming (not before the first, not after a pause)
OUTPUT_HORIZON_PACKETS = 16  # 320 ms: an engine frame further ahead than that re-anchors the output
EXPAND_MAX_SLOTS = 2  # a frame up to this many slots late plays whole, later; beyond (a stall) it is cut
SHRINK_WAIT_S = 0.5  # no quiet slot for this long: take out the quietest one there is
REINSERT_KEEP_S = 2.0  # a frame late again this soon after a slot was won back: keep the new slot instead
GRID_RANGE_S = 0.010  # the grid slews within ± this of its anchor; larger phase moves are made in whole slots
RESYNC_AFTER_LATE_FRAMES = 8  # engine frames in a row entirely late (640 ms): re-anchor, don't drop forever

_NO_DATAGRAMS: list[bytes] = []  # returned (never mutated) when nothing is to be sent
_ENGINE_RATE = 24000
_PCM_BYTES = 2 * OUT_SAMPLES  # one packet's 16-bit samples


@dataclass(slots=True)
class OutputPackets:
    """One engine frame as 20 ms µ-law payloads, their 16-bit RMS levels, and whether the frame is voiced."""

    payloads: list[bytes]
    levels: list[int]
    voiced: bool


class FrameToPackets:
    """Engine frames (24 kHz int16, 80 ms) → 20 ms µ-law payloads at 8 kHz, sans-IO.

    The 640 samples of a frame are converted once: one µ-law encoding and one byte string, sliced per
    packet, instead of a numpy array, a copy and an encoding per packet (a third of the output's CPU went to
    that per-packet overhead). Levels are the packets' RMS (for shrinking quiet slots), and a frame is
    voiced by the input's rule (its 24 kHz RMS above ``VOICED_RMS``): an echo's frame n is voiced exactly when
    input frame n was, however the resampler's delay spreads a syllable's tail over the packets."""

    def __init__(self) -> None:
        self.resampler = FirResampler(_ENGINE_RATE, 8000)
        self._splitter = PacketSplitter(OUT_SAMPLES)  # (only when a frame is not whole packets)

    def convert(self, pcm: npt.NDArray[np.int16]) -> OutputPackets:
        x = pcm.astype(np.float32)  # one conversion serves both (the resampler made its own)
        voiced = is_voiced(x, full_scale=32768.0)
        x *= np.float32(1.0 / 32768.0)  # (the resampler's own scaling of int16, bit for bit)
        pcm8k = float32_to_pcm16(self.resampler.process(x))
        if self._splitter.pending or len(pcm8k) % OUT_SAMPLES:
            chunks = self._splitter.push(pcm8k)
            raw = b"".join(chunk.tobytes() for chunk in chunks)
        else:
            raw = pcm8k.tobytes()
        ulaw = audioop.lin2ulaw(raw, 2)
        count = len(ulaw) // OUT_SAMPLES
        payloads = [ulaw[i * OUT_SAMPLES : (i + 1) * OUT_SAMPLES] for i in range(count)]
        levels = [audioop.rms(raw[i * _PCM_BYTES : (i + 1) * _PCM_BYTES], 2) for i in range(count)]
        return OutputPackets(payloads, levels, voiced)


class OutputTimeline:
    """See the module docstring. ``stats`` is the call's; ``ledger`` pairs each played frame with its input
    latency."""

    def __init__(
        self, stats: MediaStats, ledger: LatencyLedger, *, sender: RtpSender | None = None
    ) -> None:
        self.stats = stats
        self.ledger = ledger
        self.sender = sender if sender is not None else RtpSender(PT_PCMU)
        self.buffer = SlotBuffer(OUTPUT_HORIZON_PACKETS)
        self.phase = PlayoutPhase(target_s=OUTPUT_PHASE_S)
        self.pacer: Pacer | None = None  # None: no grid yet (before the first frame, after a hold)
        self.grid_anchor = 0.0  # the grid's start when anchored: slews keep it within GRID_RANGE_S of this
        self.next_engine_seq = 0
        self.owed_slots = 0  # slots inserted into the timeline (expansions) not yet taken out again
        self.held = False
        self._slot_offset = 0  # slot of engine frame n's first packet = n * PACKETS_PER_FRAME + this
        self._deadline: float | None = None  # the next packet's tick (with this tick's slew step applied)
        self._slew_s = 0.0  # grid shift still to apply (negative: earlier)
        self._all_late_frames = 0  # engine frames in a row that arrived after all of their slots
        self._shrink_since: float | None = None  # a slot is owed (since when)
        self._won_back_at: float | None = None  # when a slot was last taken out of the timeline
        self._waiting_tick: float | None = None  # a first packet held back for its frame: its tick
        self._last_frame_at: float | None = None
        self._hold_tokens = float(HOLDS_BURST)
        self._hold_tokens_at: float | None = None
        self._held_since = 0.0
        # first slot of a frame → (seq, received at, whole frame in time): its latency once it plays
        self._frame_marks: dict[int, tuple[int, float, bool]] = {}

    # -- what the I/O layer asks -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must be called next (None: nothing to do until a frame arrives)."""
        if self.pacer is None or self._deadline is None:
            return None
        if self._waiting_tick is not None:
            return min(self._waiting_tick + LATE_GRACE_S, self._deadline)
        return self._deadline

    @property
    def grid_offset_s(self) -> float:
        """How far the grid has been slewed from its anchor (0.0 with no grid)."""
        return 0.0 if self.pacer is None else self.pacer.start - self.grid_anchor

    def poll(self, now: float, *, input_frames_sent: int) -> list[bytes]:
        """The datagrams due at ``now``, in order. ``input_frames_sent``: input frames the engine has been
        given (output frame n answers input frame n: a frame whose input is not sent cannot be due)."""
        pacer = self.pacer
        if pacer is None or self._deadline is None:
            return _NO_DATAGRAMS
        out: list[bytes] = []
        if self._waiting_tick is not None and now >= self._waiting_tick + LATE_GRACE_S - COALESCE_S:
            self.stats.rtp_out_wait_expired += 1
            self._send_waiting(now, out, follow=True)  # silence, and the grid stays where that packet went
        deadline = self._deadline
        if now < deadline - COALESCE_S:
            return out
        if self._waiting_tick is not None:  # (polled late: the held packet goes first, as it is)
            self._send_waiting(now, out, follow=False)
        at = max(now, deadline)  # a tick served up to COALESCE_S early counts as on time
        skipped_before = pacer.stats.skipped
        due = pacer.on_tick(at)
        skipped = pacer.stats.skipped - skipped_before
        if skipped:
            # Polled too late (a stall past the pacer's burst bound): those slots' time is gone. Their audio
            # goes too, or the queue (and the call's delay) would grow by every stall.
            self.sender.skip(skipped * OUT_SAMPLES)
            self.stats.rtp_out_skipped += skipped
            self.buffer.skip(skipped)
        if due:
            self.stats.send_lateness_ms.add((at - deadline) * 1000.0)
        if due == 1 and self._frame_due_now(at, input_frames_sent):
            self._waiting_tick = deadline
            self._hold_tokens -= 1.0
        else:
            for _ in range(due):
                out.append(self._next_datagram(now))
        self._advance_deadline()
        return out

    def on_frame(
        self, seq: int, payloads: list[bytes], levels: list[int], now: float, *, loop_behind: bool = False
    ) -> list[bytes]:
        """Engine frame ``seq`` arrived at ``now`` as 20 ms µ-law ``payloads`` (with their 16-bit RMS
        ``levels``); returns the datagrams to send now (a held packet whose frame this is).
        ``loop_behind``: this process's loop ran behind when it was received (see the module docstring)."""
        stats = self.stats
        stats.frames_from_engine += 1
        if seq > self.next_engine_seq:
            stats.engine_frames_lost += seq - self.next_engine_seq
        self.next_engine_seq = max(self.next_engine_seq, seq + 1)
        if self.held:
            return _NO_DATAGRAMS
        self._last_frame_at = now
        if not payloads:  # (the resampler's start-up delay can leave a first frame with no whole packet)
            return _NO_DATAGRAMS
        if self.pacer is None:
            self._anchor(seq, now)
        buffer = self.buffer
        first_slot = seq * PACKETS_PER_FRAME + self._slot_offset
        ahead = buffer.ahead(first_slot)
        if ahead >= buffer.horizon or self._all_late_frames >= RESYNC_AFTER_LATE_FRAMES:
            # The engine's numbering and the call's timeline disagree by more than the buffer holds (the
            # engine dropped or skipped frames): play this frame at the next tick and go on from there.
            self._slot_offset -= ahead
            first_slot, ahead = buffer.next_slot, 0
            self._all_late_frames = 0
            self._shrink_since = None
            self.owed_slots = 0
            stats.rtp_out_resyncs += 1
        # Its first packet's tick minus its arrival (negative: late), on the grid as it is now. The next
        # slot's tick is the one held back for this frame, if one is.
        assert self._deadline is not None
        next_tick = self._waiting_tick if self._waiting_tick is not None else self._deadline
        margin = next_tick + ahead * PTIME_S - now
        if -EXPAND_MAX_SLOTS <= ahead < 0 and not loop_behind:
            # A little late (jitter, not a stall): its first slots went out as silence. Play it whole, that
            # many slots later, rather than cut its start: the timeline moves later by whole slots, owed back.
            # (The controller is not told of the move: the owed slots count as pending, so it sees the
            # margins the grid will have once they are won back.)
            self._slot_offset -= ahead
            stats.rtp_out_expanded += -ahead
            won_back_at = self._won_back_at
            if won_back_at is not None and now - won_back_at < REINSERT_KEEP_S:
                # Late again soon after a slot was won back: the engine's phase is later than the grid, and
                # winning this one back too would only cut speech and insert silence over and over. It is
                # kept as a move of the grid, which the controller gives back when its margins allow.
                stats.rtp_out_kept += -ahead
                self.phase.moved(-ahead * PTIME_S)
            else:
                self.owed_slots += -ahead
                if self._shrink_since is None:
                    self._shrink_since = now
            margin -= ahead * PTIME_S  # the controller counts the move: give it the margin on the moved grid
            first_slot, ahead = first_slot - ahead, 0
        late_before = buffer.stats.late
        for j, payload in enumerate(payloads):
            buffer.put(first_slot + j, payload, levels[j])
        late = buffer.stats.late - late_before
        stats.rtp_out_late_dropped += late
        self._all_late_frames = self._all_late_frames + 1 if late == len(payloads) else 0
        if late < len(payloads):
            self._frame_marks[first_slot + late] = (seq, now, late == 0)
        out = _NO_DATAGRAMS
        if self._waiting_tick is not None and buffer.has(buffer.next_slot):
            stats.rtp_out_waited += 1  # its frame came within the grace: its audio goes out now
            out = []
            margin += self._send_waiting(now, out, follow=True)  # (on the grid as it is now, moved or not)
        pending = self._slew_s - PTIME_S * self.owed_slots
        if loop_behind:
            # This process was behind (a burst of work, a stall of its own): the frame was received late,
            # not sent late, and the engine's phase is where it was. Following such margins (or moving the
            # timeline a slot later for such a frame, above) made every call late for seconds after the
            # loop had caught up; what the stall made late is cut instead, once.
            stats.margins_unobserved += 1
        else:
            self._steer(self.phase.observe(margin, pending_s=pending), now)
        if self.owed_slots:
            self._shrink(now)
        return out

    def pause(self, now: float) -> None:
        """Hold: no packets until :meth:`resume`; queued audio is forgotten."""
        if self.held:
            return
        self.held = True
        self._held_since = now
        self.pacer = None
        self._deadline = None
        self._waiting_tick = None
        self.buffer.clear()
        self._frame_marks.clear()

    def resume(self, now: float) -> None:
        """End a hold: the first engine frame after it anchors a new grid. The far end sees the hold as
        elapsed time, and a marker on the first packet after it."""
        if not self.held:
            return
        self.held = False
        self.sender.skip(round((now - self._held_since) / PTIME_S) * OUT_SAMPLES)
        self.sender.mark_talkspurt()

    # -- grid ----------------------------------------------------------------------------------------------

    def _anchor(self, seq: int, now: float) -> None:
        """First frame (of the call, or after a hold): the grid starts OUTPUT_PHASE_S after it."""
        self.pacer = Pacer(PTIME_S, start=now + OUTPUT_PHASE_S)
        self.phase = PlayoutPhase(target_s=OUTPUT_PHASE_S)
        self._slew_s = 0.0
        self.buffer.clear()
        self.buffer.next_slot = 0
        self._slot_offset = -seq * PACKETS_PER_FRAME
        self._all_late_frames = 0
        self.grid_anchor = self.pacer.start
        self._shrink_since = None
        self._won_back_at = None
        self.owed_slots = 0
        self._advance_deadline()

    def _advance_deadline(self) -> None:
        """The next packet's tick, after one step of any pending slew."""
        pacer = self.pacer
        if pacer is None:
            return
        if self._slew_s:
            step = max(-SLEW_STEP_S, min(SLEW_STEP_S, self._slew_s))
            pacer.start += step
            self._slew_s -= step
            if abs(self._slew_s) < 1e-6:
                self._slew_s = 0.0
        self._deadline = pacer.next_deadline()

    def _steer(self, shift: float, now: float) -> None:
        """Carry out a phase shift the controller asked for. Within ``GRID_RANGE_S`` of the grid's anchor it
        is slewed into the grid; beyond, it is made in whole slots of the timeline (a late frame played a
        slot later, a quiet slot taken out), so the RTP clock's drift stays within ``GRID_RANGE_S``."""
        pacer = self.pacer
        if pacer is None or not shift:
            return
        offset = pacer.start + self._slew_s - self.grid_anchor
        wanted = offset + shift
        if wanted < -GRID_RANGE_S:
            self.owed_slots += 1  # a slot comes out of the timeline: the grid then needs 20 ms less
            if self._shrink_since is None:
                self._shrink_since = now
            wanted += PTIME_S
        elif wanted > GRID_RANGE_S and self.owed_slots:
            # Frames keep coming late after a slot was inserted for one: the engine's phase moved later
            # for good, so the inserted slot is kept (winning it back would only cut the next frame).
            self.owed_slots -= 1
            if not self.owed_slots:
                self._shrink_since = None
            self.stats.rtp_out_kept += 1
            wanted -= PTIME_S
        clamped = min(max(wanted, -GRID_RANGE_S), GRID_RANGE_S)
        if clamped != wanted:  # not carried out: the controller must not count on it
            self.phase.moved(clamped - wanted)
        self._slew_s = clamped - (pacer.start - self.grid_anchor)

    def _shrink(self, now: float) -> None:
        """Take one queued slot out of the timeline: a quiet one (a pause between words), or after
        ``SHRINK_WAIT_S`` without one, the quietest there is."""
        overdue = now - (self._shrink_since if self._shrink_since is not None else now) > SHRINK_WAIT_S
        dropped = self.buffer.drop_quietest(None if overdue else QUIET_RMS)
        if dropped is None:
            return
        self._slot_offset -= 1
        self.owed_slots -= 1
        self._shrink_since = now if self.owed_slots else None
        self._won_back_at = now
        self.stats.rtp_out_shrunk += 1
        marks = self._frame_marks
        for slot in sorted(k for k in marks if k > dropped):
            marks[slot - 1] = marks.pop(slot)

    # -- holds -----------------------------------------------------------------------------------------------
    #
    # Each engine frame's first packet has a tick; a frame that misses it by a hair used to cost a whole slot
    # (played 20 ms later, or its first 20 ms cut). Instead, when the tick comes and the frame that is due
    # is not there, that packet is held back for up to LATE_GRACE_S and leaves the moment the frame
    # arrives; the grid then follows it (see _send_waiting), and holds come out of a per-call budget.

    def _frame_due_now(self, now: float, input_frames_sent: int) -> bool:
        """Whether the next slot is the first slot of the next engine frame, not here yet, while frames are
        coming at their cadence, and the engine already has the input it answers: a frame whose input is
        itself late (caller's packets missing) cannot come within the grace, and waiting for it would only
        bend the pacing."""
        last = self._last_frame_at
        if last is None or now - last > FLOWING_S or self._waiting_tick is not None:
            return False
        if self.next_engine_seq >= input_frames_sent:  # (input frames are numbered from 0)
            return False
        # Each hold puts one interval off the 20 ms grid, so holds come out of a budget: a loop that runs
        # behind for seconds (frames late all the while) spends at most that much of the call's pacing.
        since = self._hold_tokens_at if self._hold_tokens_at is not None else now
        self._hold_tokens = min(HOLDS_BURST, self._hold_tokens + (now - since) * HOLDS_PER_S)
        self._hold_tokens_at = now
        if self._hold_tokens < 1.0:
            return False
        slot = self.buffer.next_slot
        due_slot = self.next_engine_seq * PACKETS_PER_FRAME + self._slot_offset
        return slot == due_slot and not self.buffer.has(slot)

    def _send_waiting(self, now: float, out: list[bytes], *, follow: bool) -> float:
        """Send the held-back packet now (its frame's audio, or silence when the grace ran out).

        ``follow``: the grid then moves later by the wait, if that keeps it within GRID_RANGE_S of its
        anchor: one interval is longer by the wait and the ones after are 20 ms again, where returning to
        the old grid would shorten the next one by as much (two intervals off instead of one); the phase
        controller moves it back earlier, 0.5 ms a packet, when the margins allow. Returns the shift made."""
        tick = self._waiting_tick
        if tick is None:
            return 0.0
        self._waiting_tick = None
        out.append(self._next_datagram(now))
        pacer = self.pacer
        if not follow or pacer is None:
            return 0.0
        waited = now - tick
        furthest = pacer.start + max(self._slew_s, 0.0) + waited  # (a slew under way must stay in range too)
        if waited <= 0.0 or furthest - self.grid_anchor > GRID_RANGE_S:
            return 0.0
        pacer.start += waited
        self.phase.moved(waited)
        self._deadline = pacer.next_deadline()  # (no slew step: this tick's was taken)
        return waited

    # -- packets -----------------------------------------------------------------------------------------

    def _next_datagram(self, now: float) -> bytes:
        slot, payload = self.buffer.take()
        if payload is None:
            self.stats.rtp_out_silence += 1
            payload = ULAW_SILENCE_20MS
        datagram = self.sender.next_packet(payload, OUT_SAMPLES)
        marks = self._frame_marks
        if marks:
            mark = marks.pop(slot, None)
            if len(marks) > 2 * PACKETS_PER_FRAME:  # marks of frames that never got to play (resynced...)
                for old in [k for k in marks if k < slot]:
                    del marks[old]
            if mark is not None:
                seq, received_at, whole = mark
                self.ledger.played(seq, now - received_at, whole, now)
        return datagram


__all__ = [
    "EXPAND_MAX_SLOTS",
    "GRID_RANGE_S",
    "HOLDS_BURST",
    "HOLDS_PER_S",
    "LATE_GRACE_S",
    "OUTPUT_PHASE_S",
    "PACKETS_PER_FRAME",
    "PTIME_S",
    "FrameToPackets",
    "OutputPackets",
    "OutputTimeline",
]
