"""The media of one call: one UDP socket between Asterisk's UnicastRTP channel and one engine session.

    media = CallMedia(settings.bridge, engine, call_id)
    host, port = await media.bind()        # externalMedia external_host
    media.lock_remote(rtp_host, rtp_port)  # UNICASTRTP_LOCAL_ADDRESS / _PORT
    reason = await media.run()             # until stop(), the engine ends, or no RTP for media_timeout_s

``run()`` owns one TaskGroup of two tasks (engine receive, and control for hold messages) and never raises
for anything a peer does. The timed work of both directions is not in tasks: it runs as plain callbacks
on the process-wide :class:`~bridge.media.media_clock.MediaClock` (one timerfd for every call: with a
sleeping task per direction per call, 50 calls were ~5000 task wake-ups a second and the loop fell behind).
Each call keeps its own grids and schedules its own deadlines on it; the reader callback and the engine
receive serve whatever deadlines are due before doing their own work.

* **input** — datagrams are read in a reader callback (parse, source check, payload type check, jitter
  buffer push; every drop counted by reason), which then plays every slot that is ready, with no wake-up in
  between; a clock deadline covers slots whose packet never comes. The jitter buffer is popped once per 20
  ms slot on a grid anchored at the first packet's arrival: slot k is popped as soon as its packet is there
  (at most one ptime ahead of the grid), or concealed at ``nominal + jitter_target_ms`` if it never comes.
  So on a clean network a packet waits ~0 ms in the buffer, and a late one is waited for up to the target.
  Each slot is decoded (or concealed); every 80 ms the slots are resampled to 24 kHz in one go (the same
  samples as per slot, a quarter of the numpy calls) and the frame is written to the engine socket at once
  (``EngineSession.send_frame_nowait``: no task switch, nothing queued in the bridge). Resampling is
  ``FirResampler`` (fixed 3 ms delay, regular output), not soxr's stream, which holds back 40–60 ms per
  direction and releases frames in bursts (see fir_resample.py).
* **engine** — 24 kHz frames from the engine are resampled to 8 kHz, µ-law encoded and put in a
  ``SlotBuffer`` by their sequence number: frame ``n`` plays in slots ``4n .. 4n+3`` of the call's output
  timeline, whatever order and moment it arrives in; text is kept for the transcript.
* **output** — one µ-law RTP packet (PT 0) every 20 ms from the same socket (Asterisk's strictrtp), on a
  grid ``start + k * 20 ms`` (``Pacer``), each deadline a media-clock callback playing the next slot, or
  silence when it is empty. The grid is anchored ``OUTPUT_PHASE_S`` after the engine's first frame arrives.
  The phase then follows the engine without breaking the cadence: ``PlayoutPhase`` keeps the last 4 s of
  frame margins (first slot's tick − arrival) and asks for the grid to sit just after about the 98th
  percentile of arrivals; the shift is *slewed* in at most ``SLEW_STEP_S`` per packet (each interval stays
  within 20 ± 0.5 ms). When a frame's first tick comes and the frame is not there but the engine has its
  input, that packet is held back up to ``LATE_GRACE_S`` and leaves as the frame arrives; the grid then
  stays where it went (within its range), so one interval is longer and the next are 20 ms. A frame later
  than that, up to ``EXPAND_MAX_SLOTS`` slots late, plays whole, that much later (the
  silence already sent is the pause). The grid itself only slews within ``GRID_RANGE_S`` of its anchor;
  larger phase moves are made in whole slots (a late frame played a slot later; a quiet queued slot, a pause
  between words, or the quietest after ``SHRINK_WAIT_S``, taken out), so the RTP clock never drifts by more
  than that. Later than that (a stall), a frame loses just the packets whose slots went out; frames
  that come in a burst after a stall wait for their own slots, so a stall costs audio once and never becomes
  lasting delay (a FIFO here kept every stall as delay until trimmed away, packet by packet). When the
  engine's numbering and the timeline part (frames it skipped; ``RESYNC_AFTER_LATE_FRAMES`` frames in a row
  entirely late, or one more than the buffer's horizon ahead), the numbering is re-anchored. Frames handled
  while this process's own loop runs more than ``LOOP_BEHIND_S`` behind (``MediaClock.behind``) are not
  evidence of the engine's phase: they are not observed, and a late one is cut, not expanded.

Latency (all in ``MediaStats``, milliseconds):

* ``latency_in_ms`` — the jitter-buffer pop that completes an 80 ms frame → the frame handed to the engine
  socket (decode, resampling, framing, send);
* ``latency_out_ms`` — an engine frame received → its first 20 ms RTP packet leaves the socket (resampling,
  encoding, the wait for the pacer's tick);
* ``added_latency_ms`` — their sum for the same frame sequence number: what the bridge adds, excluding the
  80 ms framing and the jitter-buffer wait, which is ``jitter_delay_ms`` (packet arrival → pop). The
  resamplers' algorithmic delay (samples soxr holds back, not time spent) is ``resampler_delay_ms``.

The engine session is the caller's: CallMedia uses it, the caller closes it.
"""

from __future__ import annotations

import asyncio
import audioop
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import numpy as np

from bridge.config import BridgeSettings
from bridge.engine_client import EngineError, EngineProtocolError, EngineSession
from bridge.media.clock import Clock, monotonic
from bridge.media.codecs import (
    ULAW_SILENCE_20MS,
    CodecError,
    InboundCodec,
    UnsupportedPayloadType,
    codec_for_payload_type,
    float32_to_pcm16,
    ulaw_encode,
)
from bridge.media.fir_resample import FirResampler
from bridge.media.framing import FrameAccumulator, PacketSplitter
from bridge.media.jitter import JitterBuffer, Playout
from bridge.media.media_clock import ClockHandle, MediaClock
from bridge.media.metrics import MediaStats
from bridge.media.pacer import Pacer, SlotBuffer
from bridge.media.playout_phase import PlayoutPhase
from bridge.media.rtp import MAX_DATAGRAM, PT_PCMA, PT_PCMU, PT_SLIN16, RtpParseError, RtpSender, parse_rtp
from engine.protocol import SAMPLE_RATE, AudioFrame, Closed, Error, Lag, Text

log = logging.getLogger(__name__)

PTIME_S = 0.020
OUT_SAMPLES = 160  # 20 ms of 8 kHz µ-law
OUTPUT_PHASE_S = 0.005  # grid margin after engine frames: below ~5 ms, loop jitter alone made frames late
SLEW_STEP_S = 0.0005  # most the grid moves per packet: the interval stays within 20 ± 0.5 ms
LATE_GRACE_S = 0.006  # a frame due but not here at its first tick is waited for this long before silence
HOLDS_PER_S = 0.25  # the held packets' pacing budget: one per 4 s on average (0.5 % of intervals off-grid)...
HOLDS_BURST = 2  # ...two at a time at most
FLOWING_S = 0.200  # frames count as due only while they keep coming (not before the first, not after a pause)
OUTPUT_HORIZON_PACKETS = 16  # 320 ms: an engine frame further ahead than that re-anchors the output
PACKETS_PER_FRAME = 4  # 20 ms packets per 80 ms engine frame
EXPAND_MAX_SLOTS = 2  # a frame up to this many slots late plays whole, later; beyond (a stall) it is cut
QUIET_RMS = 580  # 16-bit RMS (about -35 dBFS): a slot this quiet can be taken out of the timeline unheard
SHRINK_WAIT_S = 0.5  # no quiet slot for this long: take out the quietest one there is
GRID_RANGE_S = 0.010  # the grid slews within ± this of its anchor; larger phase moves are made in whole slots
LOOP_BEHIND_S = 0.004  # the bridge's own loop this far behind: engine frame margins say nothing of the engine
RESYNC_AFTER_LATE_FRAMES = 8  # engine frames in a row entirely late (640 ms): re-anchor, don't drop forever
STALL_SLOTS = 10  # input this many slots behind its grid (event-loop stall): re-anchor, don't conceal a burst
_BIND_ATTEMPTS = 200
_RECV_BATCH = 64

InboundFormat = Literal["ulaw", "slin16"]


class MediaBindError(OSError):
    """No free UDP port in the configured RTP range."""


class CallMedia:
    """See the module docstring."""

    def __init__(
        self,
        settings: BridgeSettings,
        engine: EngineSession,
        call_id: str,
        *,
        inbound_format: InboundFormat = "ulaw",
        clock: Clock = monotonic,
        learn_remote: bool = False,
        slin16_payload_type: int = PT_SLIN16,
        media_clock: MediaClock | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.call_id = call_id
        self.inbound_format = inbound_format
        self._clock = clock
        self.learn_remote = learn_remote
        self._slin16_pt = slin16_payload_type
        in_rate = 16000 if inbound_format == "slin16" else 8000
        self._accepted_pts = frozenset(
            {slin16_payload_type} if inbound_format == "slin16" else {PT_PCMU, PT_PCMA}
        )
        self.stats = MediaStats()
        self.remote: tuple[str, int] | None = None
        # inbound
        self._jitter = JitterBuffer(in_rate, 20, settings.jitter_target_ms, settings.jitter_max_ms)
        self._jitter_wait_s = settings.jitter_target_ms / 1000.0
        self._codecs: dict[int, InboundCodec] = {}
        self._last_codec: InboundCodec | None = None
        self._resample_in = FirResampler(in_rate, SAMPLE_RATE)
        self._frames_in = FrameAccumulator()
        self._ssrc: int | None = None
        self._last_rtp_at: float | None = None
        self._in_anchor: float | None = None
        self._in_slot = 0
        self._in_latency_by_seq: dict[int, float] = {}
        self._in_pending: list[np.ndarray] = []  # decoded slots not yet resampled (done per 80 ms frame)
        self._in_pending_out = 0  # 24 kHz samples they will make
        # outbound
        self._resample_out = FirResampler(SAMPLE_RATE, 8000)
        self._packets_out = PacketSplitter(OUT_SAMPLES)
        self._out = SlotBuffer(OUTPUT_HORIZON_PACKETS)
        self._slot_offset = 0  # slot of engine frame n's first packet = n * PACKETS_PER_FRAME + this
        self._sender = RtpSender(PT_PCMU)
        self._pacer: Pacer | None = None
        # first slot of a frame → (seq, received at, whole frame in time): its latency once it plays
        self._frame_marks: dict[int, tuple[int, float, bool]] = {}
        self._next_engine_seq = 0
        self._phase = PlayoutPhase(target_s=OUTPUT_PHASE_S)
        self._slew_s = 0.0  # grid shift still to apply (negative: earlier)
        self._all_late_frames = 0  # engine frames in a row that arrived after all of their slots
        self._grid_anchor = 0.0  # the grid's start when anchored: slews keep it within GRID_RANGE_S of this
        self._shrink_since: float | None = None  # a slot is to come out of the timeline (since when)
        # lifecycle
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recv_buf = bytearray(MAX_DATAGRAM * 8)  # bigger than legal, so oversized ones are seen
        self._media_clock = media_clock
        self._clock_acquired: MediaClock | None = None
        self._in_handle: ClockHandle | None = None
        self._out_handle: ClockHandle | None = None
        self._out_deadline = 0.0
        # A first packet held back for its frame (LATE_GRACE_S): its tick, and the handle that gives up on it.
        self._waiting_tick: float | None = None
        self._grace_handle: ClockHandle | None = None
        self._last_frame_at: float | None = None
        self._hold_tokens = float(HOLDS_BURST)  # token bucket of the holds (see _frame_due_now)
        self._hold_tokens_at = clock()
        self._ended = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._held = False
        self._held_since = 0.0
        self._control: asyncio.Queue[Literal["pause", "resume"]] = asyncio.Queue()

    # -- socket ------------------------------------------------------------------------------------------

    async def bind(self) -> tuple[str, int]:
        """Bind this call's UDP socket to a free even port of [rtp_port_min, rtp_port_max]."""
        if self._sock is not None:
            return self.local_address
        lo, hi = self.settings.rtp_port_min, self.settings.rtp_port_max
        if not 0 < lo <= hi <= 65535:
            raise MediaBindError(f"bad RTP port range {lo}..{hi}")
        even = list(range(lo + (lo % 2), hi + 1, 2)) or list(range(lo, hi + 1))
        candidates = random.sample(even, min(len(even), _BIND_ATTEMPTS))
        for port in candidates:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((self.settings.rtp_bind_host, port))
            except OSError:
                sock.close()
                continue
            self._sock = sock
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(sock.fileno(), self._on_readable)
            return self.local_address
        raise MediaBindError(f"no free UDP port in {lo}..{hi} after {len(candidates)} tries")

    @property
    def local_address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("CallMedia is not bound")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def lock_remote(self, host: str, port: int) -> None:
        """Accept RTP only from (host, port) and send there (Asterisk's UNICASTRTP_LOCAL_*)."""
        self.remote = (socket.gethostbyname(host), int(port))

    def _close_socket(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    # -- receive path (reader callback: sans-await) ------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        clock = self._clock_acquired
        if clock is not None:
            clock.run_due()  # other calls' sends due now go out before this call's input work
        got = self._read_datagrams(sock)
        if got and clock is not None and not self._ended.is_set():
            self._guarded(self._input_tick)  # a slot may be ready now: play it without a wake-up

    def _read_datagrams(self, sock: socket.socket) -> bool:
        """Read what the socket holds (up to a batch) into the jitter buffer; True if any was accepted."""
        got = False
        for _ in range(_RECV_BATCH):
            try:
                size, addr = sock.recvfrom_into(self._recv_buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket: count, keep the call
                self.stats.count_drop(f"socket_error:{exc.errno}")
                break
            got = self._on_datagram(bytes(self._recv_buf[:size]), (str(addr[0]), int(addr[1]))) or got
        return got

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Check one datagram and queue it in the jitter buffer; True if it was accepted."""
        now = self._clock()
        if self.remote is None:
            if not self.learn_remote:
                self.stats.count_drop("not_locked")
                return False
            self.remote = addr
        if addr != self.remote:
            self.stats.count_drop("foreign_source")
            return False
        try:
            pkt = parse_rtp(data)
        except RtpParseError as exc:
            self.stats.count_drop(exc.reason)
            return False
        if pkt.payload_type not in self._accepted_pts:
            self.stats.count_drop("payload_type")
            return False
        if self._held:
            self.stats.count_drop("held")
            return False
        if self._ssrc is not None and pkt.ssrc != self._ssrc:
            self.stats.ssrc_changes += 1  # the jitter buffer resets itself on it
            self._in_anchor = None  # new stream, new timing: re-anchor on this packet
        self._ssrc = pkt.ssrc
        self.stats.rtp_in += 1
        self._last_rtp_at = now
        if self._in_anchor is None:
            self._in_anchor = now
            self._in_slot = 0
        self._jitter.push(pkt, now)
        return True

    # -- public control ----------------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold: no frames to the engine, no RTP out, the engine told to pause."""
        if self._held:
            return
        self._held = True
        self._held_since = self._clock()
        self.stats.holds += 1
        self._pacer = None
        if self._out_handle is not None:
            self._out_handle.cancel()
            self._out_handle = None
        self._cancel_wait()
        self._out.clear()
        self._frame_marks.clear()
        self._control.put_nowait("pause")

    def resume(self) -> None:
        if not self._held:
            return
        held_s = self._clock() - self._held_since
        self._jitter.reset()
        self._frames_in.reset()
        self._in_pending.clear()
        self._in_pending_out = 0
        self._in_anchor = None
        self._ssrc = None
        self._last_rtp_at = self._clock()
        # The far end sees the hold as elapsed time, and a marker on the first packet after it.
        self._sender.skip(round(held_s / PTIME_S) * OUT_SAMPLES)
        self._sender.mark_talkspurt()
        self._held = False
        self._control.put_nowait("resume")

    @property
    def held(self) -> bool:
        return self._held

    async def stop(self) -> None:
        """End the call's media (idempotent); returns once run() is over and the socket is closed."""
        self._end("stopped")
        if self._running:
            await self._finished.wait()
        self._close_socket()

    def _end(self, reason: str) -> None:
        if self.stats.end_reason is None:
            self.stats.end_reason = reason
            log.info("call %s media ends: %s", self.call_id, reason)
        self._ended.set()

    # -- run ---------------------------------------------------------------------------------------------

    async def run(self) -> str:
        """Carry the call's media until stop(), the engine ends, or media timeout; returns the end reason."""
        if self._running or self._finished.is_set():
            raise RuntimeError("CallMedia.run() can run once")
        self._running = True
        try:
            if self._sock is None:
                await self.bind()
            clock = self._media_clock or MediaClock.shared()
            clock.acquire()
            self._clock_acquired = clock
            self._last_rtp_at = self._clock()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._guard(self._engine_loop(), "engine")),
                    tg.create_task(self._guard(self._control_loop(), "control")),
                ]
                self._guarded(self._input_tick)  # arms the media-timeout check
                await self._ended.wait()
                for task in tasks:
                    task.cancel()
        except MediaBindError as exc:
            self._end(f"bind_failed: {exc}")
        finally:
            self._end("stopped")
            for handle in (self._in_handle, self._out_handle, self._grace_handle):
                if handle is not None:
                    handle.cancel()
            self._in_handle = self._out_handle = self._grace_handle = None
            if self._clock_acquired is not None:
                clock, self._clock_acquired = self._clock_acquired, None
                clock.release()
            self._close_socket()
            self._running = False
            self._finished.set()
        return self.stats.end_reason or "stopped"

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run one of the call's tasks; a bug in it ends this call (logged), never the process."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("call %s: %s task failed", self.call_id, name)
            self._end(f"internal_error: {name}: {type(exc).__name__}")

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run one of the call's media-clock steps; a bug in it ends this call (logged), never the others."""
        if self._ended.is_set():
            return
        try:
            step()
        except Exception as exc:
            log.exception("call %s: %s failed", self.call_id, step.__name__)
            self._end(f"internal_error: {step.__name__.strip('_')}: {type(exc).__name__}")

    def _to_monotonic(self, deadline: float) -> float:
        # Deadlines are on self._clock; the media clock runs on time.monotonic.
        return time.monotonic() + (deadline - self._clock())

    # -- input (media-clock steps) -----------------------------------------------------------------------

    def _schedule_input(self, at: float) -> None:
        clock = self._clock_acquired
        if clock is None:
            return
        if self._in_handle is not None:
            self._in_handle.cancel()
        self._in_handle = clock.call_at(self._to_monotonic(at), self._on_input_due)

    def _on_input_due(self) -> None:
        self._in_handle = None
        self._guarded(self._input_tick)

    def _input_tick(self) -> None:
        """Play every 20 ms input slot that is due (see the module docstring), then schedule the next look."""
        timeout = self.settings.media_timeout_s
        while True:
            now = self._clock()
            last = self._last_rtp_at if self._last_rtp_at is not None else now
            if not self._held and now - last >= timeout:
                self._end("media_timeout")
                return
            if self._held or self._in_anchor is None:
                self._schedule_input(min(now + 0.1, last + timeout))
                return
            nominal = self._in_anchor + self._in_slot * PTIME_S
            deadline = nominal + self._jitter_wait_s
            if now - deadline > STALL_SLOTS * PTIME_S:
                self._in_anchor = None if self._jitter.depth == 0 else now
                self._in_slot = 0
                continue
            if now >= deadline and not self._jitter.next_ready() and self._sock is not None:
                # About to conceal: the packet may be in the socket, unread because the loop ran late and
                # this deadline came up first. Concealing it, then dropping it as late, would turn a busy
                # loop into loss (and concealment costs more than decoding: a busier loop still).
                if self._read_datagrams(self._sock):
                    continue  # (anchor and slot as they are now: an SSRC change re-anchors)
            if now >= deadline or (now >= nominal - PTIME_S and self._jitter.next_ready()):
                self._play_slot(self._jitter.pop(now), now)
                self._in_slot += 1
                if self._ended.is_set():
                    return
                continue
            wake_at = deadline if now >= nominal - PTIME_S else nominal - PTIME_S
            self._schedule_input(min(wake_at, last + timeout))
            return

    def _play_slot(self, playout: Playout, popped_at: float) -> None:
        if playout.kind == "idle":
            return
        self.stats.slots_played += 1
        pcm: np.ndarray | None = None
        if playout.payload is not None and playout.payload_type is not None:
            codec = self._codec(playout.payload_type)
            if codec is not None:
                try:
                    pcm = codec.decode(playout.payload)
                except CodecError:
                    self.stats.decode_errors += 1
                if playout.buffered_s is not None:
                    self.stats.jitter_delay_ms.add(playout.buffered_s * 1000.0)
        if pcm is None:
            self.stats.slots_concealed += 1
            codec = self._last_codec or self._codec(self._default_pt())
            assert codec is not None
            pcm = codec.conceal()
        # Resample once per 80 ms frame, not per 20 ms slot: the FIR is streaming, so the output is the same
        # sample for sample, at a quarter of the numpy calls.
        resampler = self._resample_in
        self._in_pending.append(pcm)
        self._in_pending_out += len(pcm) * resampler.up // resampler.down
        if self._frames_in.pending + self._in_pending_out < self._frames_in.block:
            return
        chunk = self._in_pending[0] if len(self._in_pending) == 1 else np.concatenate(self._in_pending)
        self._in_pending.clear()
        self._in_pending_out = 0
        for frame in self._frames_in.push(resampler.process(chunk)):
            try:
                seq = self.engine.send_frame_nowait(frame)
            except EngineError as exc:
                self._end(f"engine_gone: {exc}")
                return
            if seq is None:  # the engine is not reading: this frame is lost, the call goes on
                self.stats.frames_to_engine_dropped += 1
                continue
            self.stats.frames_to_engine += 1
            if len(self._in_latency_by_seq) > 64:  # frames the engine never answered: forget them
                self._in_latency_by_seq.pop(next(iter(self._in_latency_by_seq)))
            ms = (self._clock() - popped_at) * 1000.0
            self._in_latency_by_seq[seq] = ms
            self.stats.latency_in_ms.add(ms)

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

    # -- engine task -------------------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while True:
            try:
                msg = await self.engine.receive()
            except EngineProtocolError as exc:
                self._end(f"engine_protocol_error: {exc}")
                return
            if isinstance(msg, AudioFrame):
                clock = self._clock_acquired
                if clock is not None:
                    clock.run_due()  # sends due now go out before this frame's resampling
                self._on_engine_frame(msg, self._clock())
            elif isinstance(msg, Text):
                self.stats.engine_text.append(msg.text)
            elif isinstance(msg, Lag):
                self.stats.engine_lag_reports += 1
            elif isinstance(msg, Error):
                log.warning("call %s: engine error %s: %s", self.call_id, msg.code, msg.message)
            elif isinstance(msg, Closed):
                self._end("engine_gone" if msg.reason == "engine_gone" else f"engine_closed: {msg.reason}")
                return

    def _on_engine_frame(self, frame: AudioFrame, received_at: float) -> None:
        self.stats.frames_from_engine += 1
        if frame.seq > self._next_engine_seq:
            self.stats.engine_frames_lost += frame.seq - self._next_engine_seq
        self._next_engine_seq = max(self._next_engine_seq, frame.seq + 1)
        if self._held:
            return
        self._last_frame_at = received_at
        chunks = self._packets_out.push(float32_to_pcm16(self._resample_out.process(frame.pcm)))
        if not chunks:  # (the resampler's start-up delay can leave a first frame with no whole packet)
            return
        if self._pacer is None:  # first frame (of the call, or after a hold): anchor the grid on it
            self._pacer = Pacer(PTIME_S, start=received_at + OUTPUT_PHASE_S)
            self._phase = PlayoutPhase(target_s=OUTPUT_PHASE_S)
            self._slew_s = 0.0
            self._out.clear()
            self._out.next_slot = 0
            self._slot_offset = -frame.seq * PACKETS_PER_FRAME
            self._all_late_frames = 0
            self._grid_anchor = self._pacer.start
            self._shrink_since = None
            self._schedule_output()
        first_slot = frame.seq * PACKETS_PER_FRAME + self._slot_offset
        ahead = self._out.ahead(first_slot)
        if ahead >= self._out.horizon or self._all_late_frames >= RESYNC_AFTER_LATE_FRAMES:
            # The engine's numbering and the call's timeline disagree by more than the buffer holds (the
            # engine dropped or skipped frames): play this frame at the next tick and go on from there.
            self._slot_offset -= ahead
            first_slot, ahead = self._out.next_slot, 0
            self._all_late_frames = 0
            self._shrink_since = None
            self.stats.rtp_out_resyncs += 1
        # Its first packet's tick minus its arrival (negative: late), on the grid as it is now. The next
        # slot's tick is the one held back for this frame, if one is.
        next_tick = self._waiting_tick if self._waiting_tick is not None else self._out_deadline
        margin = next_tick + ahead * PTIME_S - received_at
        loop_behind = self._loop_behind(received_at)
        if -EXPAND_MAX_SLOTS <= ahead < 0 and not loop_behind:
            # A little late (jitter, not a stall): its first slots went out as silence. Play it whole, that
            # many slots later, rather than cut its start: the timeline moves later by whole slots.
            self._slot_offset -= ahead
            self._phase.moved(-ahead * PTIME_S)
            self.stats.rtp_out_expanded += -ahead
            margin -= ahead * PTIME_S  # the controller counts the move: give it the margin on the moved grid
            first_slot, ahead = first_slot - ahead, 0
        late_before = self._out.stats.late
        for j, chunk in enumerate(chunks):
            self._out.put(first_slot + j, ulaw_encode(chunk), audioop.rms(chunk.tobytes(), 2))
        late = self._out.stats.late - late_before
        if self._waiting_tick is not None and self._out.has(self._out.next_slot):
            self.stats.rtp_out_waited += 1  # its frame came within the grace: its audio goes out now
            margin += self._send_waiting(follow=True)  # (on the grid as it is now, moved or not)
        self.stats.rtp_out_late_dropped += late
        self._all_late_frames = self._all_late_frames + 1 if late == len(chunks) else 0
        if late < len(chunks):
            self._frame_marks[first_slot + late] = (frame.seq, received_at, late == 0)
        pending = self._slew_s - (PTIME_S if self._shrink_since is not None else 0.0)
        if loop_behind:
            # This process was behind (a burst of work, a stall of its own): the frame was received late,
            # not sent late, and the engine's phase is where it was. Following such margins (or moving the
            # timeline a slot later for such a frame, above) made every call late for seconds after the
            # loop had caught up; what the stall made late is cut instead, once.
            self.stats.margins_unobserved += 1
        else:
            self._steer(self._phase.observe(margin, pending_s=pending), received_at)
        if self._shrink_since is not None:
            self._shrink(received_at)

    def _steer(self, shift: float, now: float) -> None:
        """Carry out a phase shift the controller asked for. Within ``GRID_RANGE_S`` of the grid's anchor it
        is slewed into the grid; beyond, it is made in whole slots of the timeline (a late frame played a
        slot later, a quiet slot taken out), so the RTP clock never runs fast or slow for long: its drift
        stays within ``GRID_RANGE_S``."""
        pacer = self._pacer
        if pacer is None or not shift:
            return
        offset = pacer.start + self._slew_s - self._grid_anchor
        wanted = offset + shift
        if wanted < -GRID_RANGE_S and self._shrink_since is None:
            self._shrink_since = now  # a slot comes out of the timeline: the grid then needs 20 ms less
            wanted += PTIME_S
        clamped = min(max(wanted, -GRID_RANGE_S), GRID_RANGE_S)
        if clamped != wanted:  # not carried out: the controller must not count on it
            self._phase.moved(clamped - wanted)
        self._slew_s = clamped - (pacer.start - self._grid_anchor)

    def _shrink(self, now: float) -> None:
        """Take one queued slot out of the timeline: a quiet one (a pause between words), or after
        ``SHRINK_WAIT_S`` without one, the quietest there is."""
        overdue = now - (self._shrink_since or now) > SHRINK_WAIT_S
        dropped = self._out.drop_quietest(None if overdue else QUIET_RMS)
        if dropped is None:
            return
        self._slot_offset -= 1
        self._shrink_since = None
        self.stats.rtp_out_shrunk += 1
        marks = self._frame_marks
        for slot in sorted(k for k in marks if k > dropped):
            marks[slot - 1] = marks.pop(slot)

    # -- output (media-clock steps) ----------------------------------------------------------------------

    def _schedule_output(self) -> None:
        """Arm the next send on the pacer's grid (after applying one step of any pending slew)."""
        clock, pacer = self._clock_acquired, self._pacer
        if clock is None or pacer is None:
            return
        if self.remote is None:  # nowhere to send yet: look again later
            self._arm_output(clock, self._clock() + 0.1)
            return
        if self._slew_s:
            step = max(-SLEW_STEP_S, min(SLEW_STEP_S, self._slew_s))
            pacer.start += step
            self._slew_s -= step
            if abs(self._slew_s) < 1e-6:
                self._slew_s = 0.0
        self._arm_output(clock, pacer.next_deadline())

    def _arm_output(self, clock: MediaClock, deadline: float) -> None:
        """The next send happens at ``deadline`` (on self._clock), replacing any send already armed."""
        if self._out_handle is not None:
            self._out_handle.cancel()
        self._out_deadline = deadline
        self._out_handle = clock.call_at(self._to_monotonic(deadline), self._on_output_due)

    def _on_output_due(self) -> None:
        self._out_handle = None
        self._guarded(self._output_tick)

    def _output_tick(self) -> None:
        pacer = self._pacer
        if pacer is None:  # held: resume's first engine frame makes a new grid
            return
        if self.remote is None:
            self._schedule_output()
            return
        if self._waiting_tick is not None:  # (the clock ran late: the held packet goes first, as it is)
            self._send_waiting()
        deadline = self._out_deadline
        # The clock serves deadlines up to COALESCE_S early: count such a tick as on time.
        now = max(self._clock(), deadline)
        skipped_before = pacer.stats.skipped
        due = pacer.on_tick(now)
        skipped = pacer.stats.skipped - skipped_before
        if skipped:
            # The loop stalled past the pacer's burst bound: those slots' time is gone. Their audio goes
            # too, or the queue (and the call's delay) would grow by every stall.
            self._sender.skip(skipped * OUT_SAMPLES)
            self.stats.rtp_out_skipped += skipped
            self._out.skip(skipped)
        if due:
            self.stats.send_lateness_ms.add((now - deadline) * 1000.0)
        if due == 1 and self._frame_due_now(now):
            self._hold_for_frame(deadline)
        else:
            for _ in range(due):
                self._send_packet()
        if self._pacer is pacer:
            self._schedule_output()

    # -- the grace for a frame that is due ---------------------------------------------------------------
    #
    # Each engine frame's first packet has a tick; a frame that misses it by a hair used to cost a whole slot
    # (played 20 ms later, or its first 20 ms cut). Instead, when the tick comes and the frame that is due
    # is not there, that packet is held back for up to LATE_GRACE_S and leaves the moment the frame
    # arrives; the grid then follows it (see _send_waiting), and holds come out of a per-call budget.

    def _loop_behind(self, now: float) -> bool:
        """Whether this process's event loop ran more than LOOP_BEHIND_S behind just now."""
        clock = self._clock_acquired
        return clock is not None and clock.behind(self._to_monotonic(now)) > LOOP_BEHIND_S

    def _frame_due_now(self, now: float) -> bool:
        """Whether the next slot is the first slot of the next engine frame, not here yet, while frames are
        coming at their cadence, and the engine already has the input it answers (output frame n is the
        step on input frame n): a frame whose input is itself late (caller's packets missing, concealment
        waiting for them) cannot come within the grace, and waiting for it would only bend the pacing."""
        last = self._last_frame_at
        if last is None or now - last > FLOWING_S or self._waiting_tick is not None:
            return False
        if self._next_engine_seq >= self.engine.frames_sent:  # (input frames are numbered from 0)
            return False
        # Each hold puts one interval off the 20 ms grid, so holds come out of a budget: a loop that runs
        # behind for seconds (frames late all the while) spends at most that much of the call's pacing.
        self._hold_tokens = min(HOLDS_BURST, self._hold_tokens + (now - self._hold_tokens_at) * HOLDS_PER_S)
        self._hold_tokens_at = now
        if self._hold_tokens < 1.0:
            return False
        slot = self._out.next_slot
        due_slot = self._next_engine_seq * PACKETS_PER_FRAME + self._slot_offset
        return slot == due_slot and not self._out.has(slot)

    def _hold_for_frame(self, tick: float) -> None:
        clock = self._clock_acquired
        if clock is None:
            self._send_packet()
            return
        self._waiting_tick = tick
        self._hold_tokens -= 1.0
        self._grace_handle = clock.call_at(self._to_monotonic(tick + LATE_GRACE_S), self._on_grace_over)

    def _on_grace_over(self) -> None:
        self._grace_handle = None
        if self._waiting_tick is not None:
            self.stats.rtp_out_wait_expired += 1
        self._guarded(self._give_up_waiting)

    def _give_up_waiting(self) -> None:
        self._send_waiting(follow=True)  # silence, and the grid stays where that packet went

    def _send_waiting(self, *, follow: bool = False) -> float:
        """Send the held-back packet now (its frame's audio, or silence when the grace ran out).

        ``follow``: the grid then moves later by the wait, if that keeps it within
        GRID_RANGE_S of its anchor: one interval is longer by the wait and the ones after are 20 ms again,
        where returning to the old grid would shorten the next one by as much (two intervals off instead of
        one); the phase controller moves it back earlier, 0.5 ms a packet, when the margins allow. Returns
        the shift made (seconds)."""
        tick = self._waiting_tick
        if tick is None:
            return 0.0
        self._cancel_wait()
        self._send_packet()
        pacer = self._pacer
        if not follow or pacer is None:
            return 0.0
        waited = self._clock() - tick
        furthest = pacer.start + max(self._slew_s, 0.0) + waited  # (a slew under way must stay in range too)
        if waited <= 0.0 or furthest - self._grid_anchor > GRID_RANGE_S:
            return 0.0
        pacer.start += waited
        self._phase.moved(waited)
        self._rearm_output()
        return waited

    def _rearm_output(self) -> None:
        """The grid moved: arm the next send at its new deadline (no slew step: that one was taken)."""
        clock, pacer = self._clock_acquired, self._pacer
        if clock is None or pacer is None or self._out_handle is None:
            return
        self._arm_output(clock, pacer.next_deadline())

    def _cancel_wait(self) -> None:
        self._waiting_tick = None
        if self._grace_handle is not None:
            self._grace_handle.cancel()
            self._grace_handle = None

    def _send_packet(self) -> None:
        sock, remote = self._sock, self.remote
        if sock is None or remote is None:
            return
        slot, payload = self._out.take()
        if payload is None:
            self.stats.rtp_out_silence += 1
            payload = ULAW_SILENCE_20MS
        datagram = self._sender.next_packet(payload, OUT_SAMPLES)
        try:
            sock.sendto(datagram, remote)
        except OSError:  # buffer full / unreachable: this packet is lost, the pacing goes on
            self.stats.send_errors += 1
            return
        self.stats.rtp_out += 1
        marks = self._frame_marks
        if not marks:
            return
        mark = marks.pop(slot, None)
        if len(marks) > 2 * PACKETS_PER_FRAME:  # marks of frames that never got to play (cleared, resynced)
            for old in [k for k in marks if k < slot]:
                del marks[old]
        if mark is None:
            return
        seq, received_at, whole = mark
        out_ms = (self._clock() - received_at) * 1000.0
        self.stats.latency_out_ms.add(out_ms)
        in_ms = self._in_latency_by_seq.pop(seq, None)
        if in_ms is not None and whole:
            self.stats.added_latency_ms.add(in_ms + out_ms)

    # -- control task ------------------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            action = await self._control.get()
            try:
                if action == "pause":
                    await self.engine.pause()
                else:
                    await self.engine.resume()
            except EngineError as exc:
                self._end(f"engine_gone: {exc}")
                return

    # -- results -----------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The call's stats as a JSON-able dict (jitter-buffer counters and resampler delay included)."""
        self.stats.resampler_delay_ms = round(
            (self._resample_in.delay_s + self._resample_out.delay_s) * 1000.0, 3
        )
        out = self.stats.to_dict()
        out["jitter_buffer"] = {
            name: getattr(self._jitter.stats, name) for name in self._jitter.stats.__slots__
        }
        out["rtp_out_silence"] = self.stats.rtp_out_silence
        return out


__all__ = ["CallMedia", "MediaBindError", "MediaStats"]
