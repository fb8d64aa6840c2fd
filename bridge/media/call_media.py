"""The media of one call: one UDP socket between Asterisk's UnicastRTP channel and one engine session.

    media = CallMedia(settings.bridge, engine, call_id)
    host, port = await media.bind()        # externalMedia external_host
    media.lock_remote(rtp_host, rtp_port)  # UNICASTRTP_LOCAL_ADDRESS / _PORT
    reason = await media.run()             # until stop(), the engine ends, or no RTP for media_timeout_s

This is the I/O around two sans-IO cores, which hold every decision and take time as an argument:
:class:`~bridge.media.inbound.InboundPath` (datagrams → jitter buffer → 80 ms engine frames) and
:class:`~bridge.media.outbound.OutputTimeline` (engine frames → paced RTP datagrams). CallMedia reads the
socket, sends what the cores return, and asks the process-wide
:class:`~bridge.media.media_clock.MediaClock` (one timerfd for every call) to call them back at their
deadlines. With the clock ticking (``media_tick_ms``), the socket is read on the stream's phase
(:class:`~bridge.media.read_schedule.ReadSchedule`) rather than per datagram, and the kernel's arrival stamp
stands for each datagram's arrival; with stamps, once per 80 ms frame, when the packet that completes it is
due (``InboundPath.frame_arrival_at``): the ones before it wait in the socket, since a frame is decoded when
its last slot is played anyway.

``run()`` owns one TaskGroup (control for hold messages, and engine receive on a session's own WebSocket; on
an engine mux channel its messages are handed over by the mux's reader) and never raises for anything a peer
does. The timed work is not in tasks: it runs as plain media-clock callbacks, and the
reader callback and the engine receive serve whatever deadlines are due before doing their own work.

Latency (all in ``MediaStats``, milliseconds):

* ``latency_in_ms`` — the jitter-buffer pop that completes an 80 ms frame → the frame handed to the engine
  socket (decode, resampling, framing, send);
* ``latency_out_ms`` — an engine frame received → its first 20 ms RTP packet leaves (resampling, encoding,
  the wait for the pacer's tick);
* ``added_latency_ms`` — their sum for the same frame sequence number: what the bridge adds, excluding the
  80 ms framing and the jitter-buffer wait, which is ``jitter_delay_ms`` (a frame's last packet: arrival →
  pop). The resamplers' algorithmic delay is ``resampler_delay_ms``.

The engine session is the caller's: CallMedia uses it, the caller closes it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import fields
from typing import Any, Literal

from bridge.call_deps import MediaUnavailable
from bridge.config import BridgeSettings
from bridge.engine_client import (
    EngineError,
    EngineMessage,
    EngineProtocolError,
    EngineSession,
    answer_limit_frames,
)
from bridge.media.inbound import FLOOD_READS, InboundFormat, InboundPath
from bridge.media.media_clock import ClockHandle, MediaClock
from bridge.media.metrics import LatencyLedger, MediaStats
from bridge.media.outbound import FrameToPackets, OutputTimeline
from bridge.media.prometheus import MEDIA_METRICS
from bridge.media.read_schedule import ReadSchedule
from bridge.media.rtp import MAX_DATAGRAM, PT_SLIN16
from bridge.media.turns import is_voiced
from engine.protocol import AudioFrame, Closed, Error, Lag, Text

log = logging.getLogger(__name__)

LOOP_BEHIND_S = 0.004  # the bridge's own loop this far behind: engine frame margins say nothing of the engine
_BIND_ATTEMPTS = 200
_RECV_BATCH = 64
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # (35: Linux's value; Python names it from 3.12)
_TIMESPEC = struct.Struct("@qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_NO_ANCILLARY: list[tuple[int, int, bytes]] = []  # (never mutated: a read without a stamp returns its own)
_MAX_SOCKET_WAIT_S = 1.0  # a stamp further back than this is a clock step, not a wait: not used


def _stamp_s(anc: list[tuple[int, int, bytes]]) -> float:
    """The arrival time (CLOCK_REALTIME seconds) in a datagram's ancillary data, or +inf."""
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return float(sec) + nsec * 1e-9
    return float("inf")


class MediaBindError(MediaUnavailable, OSError):
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
        learn_remote: bool = False,
        slin16_payload_type: int = PT_SLIN16,
        media_clock: MediaClock | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.call_id = call_id
        self.stats = MediaStats()
        self.ledger = LatencyLedger(self.stats)
        self.inbound = InboundPath(
            self.stats,
            now=time.monotonic(),
            inbound_format=inbound_format,
            jitter_target_ms=settings.jitter_target_ms,
            jitter_max_ms=settings.jitter_max_ms,
            media_timeout_s=settings.media_timeout_s,
            slin16_payload_type=slin16_payload_type,
            learn_remote=learn_remote,
        )
        self.timeline = OutputTimeline(self.stats, self.ledger)
        self._frame_to_packets = FrameToPackets()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._connected = False
        self._recv_buf = bytearray(MAX_DATAGRAM * 8)  # bigger than legal, so oversized ones are seen
        self._recv_view = memoryview(self._recv_buf)
        self._recv_bufs = [self._recv_buf]
        self._stamped = False  # the kernel stamps each datagram's arrival (polled reads: see bind())
        self._media_clock = media_clock
        self._clock: MediaClock | None = None
        self._in_handle: ClockHandle | None = None
        self._in_armed: float | None = None
        self._out_handle: ClockHandle | None = None
        self._out_armed: float | None = None
        self._reads: ReadSchedule | None = None  # with the clock ticking: when the socket is read
        self._newest_arrival: float | None = None  # the newest accepted datagram's arrival
        self._defer_reads = False  # a stamped read just found packets: the next read is the next frame's
        self._ended = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._control: asyncio.Queue[Literal["pause", "resume"]] = asyncio.Queue()
        self._unanswered_limit = answer_limit_frames(settings.engine_answer_timeout_s)

    @property
    def remote(self) -> tuple[str, int] | None:
        return self.inbound.remote

    @property
    def held(self) -> bool:
        return self.inbound.held

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
            if self.settings.media_tick_ms > 0:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                    self._stamped = True
                except OSError:  # (no such option here: read times stand for arrival times)
                    self._stamped = False
            self._loop = asyncio.get_running_loop()
            self._read_per_datagram(True)
            self._connect()
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
        self.inbound.remote = (socket.gethostbyname(host), int(port))
        self._connect()

    def _connect(self) -> None:
        """Connect the socket to the remote: the kernel then drops datagrams from any other source before
        they cost a wake-up, and a send names no address."""
        if self._sock is not None and self.inbound.remote is not None and not self._connected:
            try:
                self._sock.connect(self.inbound.remote)
            except OSError as exc:  # (unroutable: sends will fail and be counted; reads still filter)
                log.warning("call %s: cannot connect the RTP socket: %s", self.call_id, exc)
                return
            self._connected = True

    def _read_per_datagram(self, on: bool) -> None:
        """Read the socket as datagrams come (normal), or not (flooded: it is polled instead)."""
        if self._sock is None or self._loop is None or on == self._reading or self._loop.is_closed():
            return
        if on:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = on

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._read_per_datagram(False)
            sock, self._sock = self._sock, None
            sock.close()

    # -- input ---------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        clock = self._clock
        if clock is not None:
            clock.run_due()  # other calls' sends due now go out before this call's input work
        # One datagram per readiness: a second read nearly always found the socket empty (a failed system
        # call and an exception per packet), and with more queued the level-triggered loop calls again.
        if not self._read_datagrams(1) or clock is None:
            return
        reads = self._reads
        if reads is not None and not self.inbound.flooded:
            # The stream has a phase now: read it on the clock's ticks, not per datagram.
            self._read_per_datagram(False)
            self._read_datagrams(_RECV_BATCH)
            reads.on_packets(time.monotonic(), polled_read=False, arrival=self._stamp_of_newest())
        self._guarded(self._input_due)  # a slot may be ready now: play it without a wake-up

    def _read_when_due(self, now: float) -> None:
        """Polled (see read_schedule.py): read the socket until empty if its read is due."""
        reads, clock = self._reads, self._clock
        if reads is None or clock is None or reads.next_read_at is None:
            return
        if clock.fire_at(reads.next_read_at) > now:
            return
        if self._read_datagrams(_RECV_BATCH):
            reads.on_packets(now, polled_read=True, arrival=self._stamp_of_newest())
            return
        reads.on_empty(now)
        if not reads.polled:  # the stream stopped: wait for its next datagram
            self._read_per_datagram(True)

    def _resume_reading(self) -> None:
        """A flood is over: read as before it (per datagram, or on the schedule when polled)."""
        reads = self._reads
        if reads is None or not reads.polled:
            self._read_per_datagram(True)

    def _read_datagrams(self, limit: int) -> bool:
        """Read up to ``limit`` datagrams into the input; True if any was accepted."""
        sock = self._sock
        if sock is None:
            return False
        inbound, buf, view = self.inbound, self._recv_buf, self._recv_view
        connected, stamped = self._connected, self._stamped
        got = False
        # One reading of both clocks for the batch: the datagrams' arrivals are their kernel stamps moved onto
        # the monotonic scale (two clock calls per datagram were a tenth of a read's Python work).
        mono, real = time.monotonic(), time.time()
        newest_wait = -1.0
        for _ in range(limit):
            anc: list[tuple[int, int, bytes]] = _NO_ANCILLARY
            try:
                if stamped:
                    size, anc, _, source = sock.recvmsg_into(self._recv_bufs, _ANC_SIZE)
                    addr = inbound.remote if connected else source
                elif connected:  # (the kernel passes only the remote's datagrams: no address to return)
                    size, addr = sock.recv_into(buf), inbound.remote
                else:
                    size, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket: count, keep the call
                self.stats.count_drop(f"socket_error:{exc.errno}")
                break
            if addr is None:
                break
            arrival = mono
            if anc:
                # The kernel's arrival stamp (CLOCK_REALTIME): a polled socket's packets waited there up to a
                # tick, and the input path must see when they came, not when they were read.
                wait = real - _stamp_s(anc)
                if 0.0 <= wait < _MAX_SOCKET_WAIT_S:
                    arrival -= wait
                    newest_wait = wait
            if inbound.on_datagram(bytes(view[:size]), addr, arrival):
                got = True
                self._newest_arrival = arrival
        if newest_wait >= 0.0:
            # How late the read came for the newest datagram (the ones before it wait on purpose: see
            # read_schedule.py; a frame is decoded when its last packet is).
            self.stats.socket_wait_ms.add(newest_wait * 1000.0)
        if not self._connected and inbound.remote is not None:
            self._connect()  # (learned from the first datagram)
        if inbound.flooded and self._reading:
            self._read_per_datagram(False)  # the junk budget is spent: poll the socket instead
            self._arm_input(inbound.flood_poll_at(time.monotonic()))
        return got

    def _stamp_of_newest(self) -> float | None:
        """The newest accepted datagram's arrival, where the kernel stamps them (else None); from then on
        the reads are once per frame (ReadSchedule.expect)."""
        if not self._stamped or self._newest_arrival is None:
            return None
        self._defer_reads = True
        return self._newest_arrival

    def _on_input_due(self) -> None:
        self._in_handle = self._in_armed = None
        self._guarded(self._input_due)

    def _input_due(self) -> None:
        inbound = self.inbound
        now = time.monotonic()
        reads = self._reads
        if inbound.flooded:
            self._read_datagrams(FLOOD_READS)
            if inbound.flood_over(now):
                self._resume_reading()
        elif reads is not None and reads.polled:
            self._read_when_due(now)
        if not inbound.flooded and inbound.conceal_due(now):
            self._read_datagrams(_RECV_BATCH)  # the packet may be in the socket, unread: read it first
        for frame in inbound.poll(now):
            try:
                seq = self.engine.send_frame_nowait(frame.pcm)
            except EngineError as exc:
                self._end(f"engine_gone: {exc}")
                return
            if seq is None:  # the engine is not reading: this frame is lost, the call goes on
                self.stats.frames_to_engine_dropped += 1
                continue
            self.stats.frames_to_engine += 1
            if self.engine.unanswered >= self._unanswered_limit:
                self._end(f"engine_stalled: no answer to {self.engine.unanswered} frames")
                return
            self.ledger.sent(seq, time.monotonic() - frame.completed_at, frame.first_arrival,
                             voiced=is_voiced(frame.pcm), last_arrival=frame.last_arrival)
        if inbound.timed_out:
            self._end("media_timeout")
            return
        framed = reads is not None and self._stamped and reads.polled
        if framed and self._defer_reads and reads is not None:
            # The packets before the one that completes the next frame need no read of their own.
            frame_at = inbound.frame_arrival_at()
            if frame_at is not None:
                reads.expect(frame_at)
        self._defer_reads = False
        deadline = inbound.frame_deadline() if framed else inbound.deadline
        if inbound.flooded:
            poll_at = inbound.flood_poll_at(time.monotonic())
            deadline = poll_at if deadline is None else min(deadline, poll_at)
        elif reads is not None and reads.next_read_at is not None:
            read_at = reads.next_read_at
            deadline = read_at if deadline is None else min(deadline, read_at)
        if deadline is not None:
            self._arm_input(deadline, computed=True)

    def _arm_input(self, deadline: float, *, computed: bool = False) -> None:
        """Arm the input's next look at ``deadline``. ``computed``: the input path has just run and found
        nothing due before it, so a look armed earlier is stale and moves to it; otherwise an earlier one
        stays (it runs the input path, which arms the rest)."""
        clock = self._clock
        if clock is None or deadline == self._in_armed:
            return
        if not computed and self._in_armed is not None and self._in_armed < deadline:
            return
        # (A stale look left armed fired once per packet: the slot it was for had been played when its packet
        # came, and the next slot's deadline is later. Moving it is a cancel and a push; the wasted wake-up
        # it saved was a whole input pass, about one callback in three of the media clock's.)
        if self._in_handle is not None:
            self._in_handle.cancel()
        self._in_armed = deadline
        self._in_handle = clock.call_at(deadline, self._on_input_due)

    # -- engine --------------------------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        """The engine's messages on a WebSocket of the session's own (on a mux they come by listen())."""
        while not self._ended.is_set():
            try:
                msg: EngineMessage | EngineProtocolError = await self.engine.receive()
            except EngineProtocolError as exc:
                msg = exc
            self._on_engine_message(msg)

    def _on_engine_message(self, msg: EngineMessage | EngineProtocolError) -> None:
        if self._ended.is_set():
            return
        if isinstance(msg, AudioFrame):
            clock = self._clock
            if clock is not None:
                clock.run_due()  # sends due now go out before this frame's resampling
            self._guarded(self._on_engine_frame, msg)
        elif isinstance(msg, Text):
            self.stats.engine_text.append(msg.text)
        elif isinstance(msg, Lag):
            self.stats.engine_lag_reports += 1
        elif isinstance(msg, Error):
            log.warning("call %s: engine error %s: %s", self.call_id, msg.code, msg.message)
        elif isinstance(msg, Closed):
            self._end("engine_gone" if msg.reason == "engine_gone" else f"engine_closed: {msg.reason}")
        elif isinstance(msg, EngineProtocolError):
            self._end(f"engine_protocol_error: {msg}")

    def _on_engine_frame(self, frame: AudioFrame) -> None:
        now = time.monotonic()
        packets = self._frame_to_packets.convert(frame.pcm)
        self.ledger.output_level(frame.seq, packets.voiced)
        clock = self._clock
        behind = clock is not None and clock.behind(now) > LOOP_BEHIND_S
        timeline = self.timeline
        self._send(timeline.on_frame(frame.seq, packets.payloads, packets.levels, now, loop_behind=behind))
        self._arm_output()

    # -- output --------------------------------------------------------------------------------------------

    def _on_output_due(self) -> None:
        self._out_handle = self._out_armed = None
        self._guarded(self._output_due)

    def _output_due(self) -> None:
        self._send(self.timeline.poll(time.monotonic(), input_frames_sent=self.engine.frames_sent))
        self._arm_output()

    def _arm_output(self) -> None:
        clock = self._clock
        deadline = self.timeline.next_deadline()
        if clock is None or deadline == self._out_armed:
            return
        if self._out_handle is not None:
            self._out_handle.cancel()
        self._out_armed = deadline
        if deadline is None:
            self._out_handle = None
        else:  # (first: the tick's reads and frames must not delay this call's packet)
            self._out_handle = clock.call_at(deadline, self._on_output_due, first=True)

    def _send(self, datagrams: list[bytes]) -> None:
        if not datagrams:
            return
        sock, remote = self._sock, self.remote
        if sock is None or remote is None:
            return
        for datagram in datagrams:
            try:
                if self._connected:
                    sock.send(datagram)
                else:
                    sock.sendto(datagram, remote)
            except OSError:  # buffer full / unreachable: this packet is lost, the pacing goes on
                self.stats.send_errors += 1
                continue
            self.stats.rtp_out += 1

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

    # -- public control ----------------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold: no frames to the engine, no RTP out, the engine told to pause."""
        if self.inbound.held:
            return
        self.stats.holds += 1
        self.inbound.pause()
        self.timeline.pause(time.monotonic())
        self._arm_output()
        self._control.put_nowait("pause")

    def resume(self) -> None:
        if not self.inbound.held:
            return
        now = time.monotonic()
        self.inbound.resume(now)
        self.timeline.resume(now)
        self._arm_input(now)
        self._control.put_nowait("resume")

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
            clock.acquire(self.settings.media_tick_ms / 1000.0)
            if clock.tick_s > 0:
                self._reads = ReadSchedule(clock.tick_s)
            self._clock = clock
            self.inbound.last_packet_at = time.monotonic()
            MEDIA_METRICS.call_started(self.stats, self.inbound)
            # On a mux channel the engine's messages are handed over as the mux reads them (no task wakes per
            # frame); on a WebSocket of the session's own, a task reads them.
            listening = self.engine.listen(self._on_engine_message)
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._guard(self._control_loop(), "control"))]
                if not listening:
                    tasks.append(tg.create_task(self._guard(self._engine_loop(), "engine")))
                self._guarded(self._input_due)  # arms the media-timeout check
                await self._ended.wait()
                for task in tasks:
                    task.cancel()
        except MediaBindError as exc:
            self._end(f"bind_failed: {exc}")
        finally:
            self._end("stopped")
            self.engine.listen(None)  # (the session's owner reads its ``closed`` when it closes it)
            # What came before the end is counted: a polled socket may hold up to a tick of packets.
            try:
                self._read_datagrams(_RECV_BATCH)
            except Exception:
                log.exception("call %s: reading the socket at the end failed", self.call_id)
            self.ledger.turns.finish()
            MEDIA_METRICS.call_ended(self.stats)
            for handle in (self._in_handle, self._out_handle):
                if handle is not None:
                    handle.cancel()
            self._in_handle = self._out_handle = None
            self._in_armed = self._out_armed = None
            if self._clock is not None:
                clock, self._clock = self._clock, None
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

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run one of the call's media steps; a bug in it ends this call (logged), never the others."""
        if self._ended.is_set():
            return
        try:
            step(*args)
        except Exception as exc:
            name = step.__name__.strip("_")
            log.exception("call %s: %s failed", self.call_id, name)
            self._end(f"internal_error: {name}: {type(exc).__name__}")

    # -- results -----------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The call's stats as a JSON-able dict (jitter-buffer counters and resampler delay included)."""
        self.stats.resampler_delay_ms = round(
            (self.inbound.resampler.delay_s + self._frame_to_packets.resampler.delay_s) * 1000.0, 3
        )
        out = self.stats.to_dict()
        jitter = self.inbound.jitter.stats
        out["jitter_buffer"] = {f.name: getattr(jitter, f.name) for f in fields(jitter)}
        end_vs_start = self.ledger.round_trip_end_vs_start_ms()
        out["round_trip_end_vs_start_ms"] = None if end_vs_start is None else round(end_vs_start, 3)
        return out


__all__ = ["CallMedia", "MediaBindError", "MediaStats"]
