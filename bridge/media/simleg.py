"""A simulated Asterisk UnicastRTP leg: sends a caller's audio as RTP every 20 ms, records what comes back.

Used by the demo, the media benchmark, the media tests and the fake ARI server. Real UDP, real packets:

    async with SimLeg(None, speech_8k, loss=0.05, jitter_ms=30) as leg:
        host, port = leg.local_address          # give this to the bridge (UNICASTRTP_LOCAL_*)
        leg.set_remote(bridge_addr)             # where the bridge's socket is (externalMedia external_host)
        await leg.run(3.0)                      # or run(None) until stop()
    leg.received_audio_8k(); leg.pacing_jitter_ms_p99; leg.timestamp_errors

Sending: packet k is due at ``t0 + k * 20 ms`` on the monotonic clock (no drift); the audio is sent once and
then silence, like a line whose caller stopped talking. Impairments, all seeded: ``loss`` (probability a
packet is never sent), ``jitter_ms`` (each packet leaves up to that much late, uniform; packets therefore
overtake each other when the jitter exceeds 20 ms) and ``reorder`` (probability a packet is held back behind
the next one).

Receiving: each datagram's arrival time is the kernel's receive timestamp (``SO_TIMESTAMPNS``) when the
platform gives one, so the pacing measured here is the bridge's, not this process's scheduling delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import numpy as np
import soxr

from bridge.media.codecs import alaw_encode, slin16_encode, ulaw_decode, ulaw_encode
from bridge.media.media_clock import MediaClock
from bridge.media.rtp import (
    PT_PCMA,
    PT_PCMU,
    PT_SLIN16,
    RtpPacket,
    RtpReceiver,
    RtpSender,
    build_rtp,
    seq_diff,
)

PTIME_S = 0.020
SAMPLES_8K = 160
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@ll")
_RECV_BUFFER = 65536  # larger than any legal RTP datagram, so oversized ones are seen (and counted)

Codec = Literal["ulaw", "alaw", "slin16"]
GARBAGE_KINDS = ("truncated", "oversized", "wrong_version", "unknown_pt", "foreign_ssrc", "rtcp", "empty")


@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    arrival: float  # seconds; differences are meaningful, the epoch is not
    sequence: int
    timestamp: int
    ssrc: int
    payload_type: int
    marker: bool
    payload: bytes


class SimLeg:
    """One simulated caller leg on its own UDP socket (see the module docstring)."""

    def __init__(
        self,
        remote: tuple[str, int] | None,
        audio_8k: np.ndarray,
        *,
        codec: Codec = "ulaw",
        loss: float = 0.0,
        jitter_ms: float = 0.0,
        reorder: float = 0.0,
        junk_pps: float = 0.0,
        seed: int = 0,
        bind_host: str = "127.0.0.1",
        slin16_payload_type: int = PT_SLIN16,
    ) -> None:
        if not (0.0 <= loss < 1.0 and 0.0 <= reorder < 1.0 and jitter_ms >= 0.0):
            raise ValueError("loss and reorder must be in [0, 1), jitter_ms >= 0")
        self.remote = remote
        self.codec = codec
        self.loss = loss
        self.jitter_s = jitter_ms / 1000.0
        self.reorder = reorder
        self.junk_pps = junk_pps  # spoofed junk from this leg's own socket, datagrams a second
        self.junk_sent = 0
        self._rng = random.Random(seed)
        self._bind_host = bind_host
        self._payloads = _packetize(np.asarray(audio_8k, dtype=np.int16), codec)
        self._silence = _packetize(np.zeros(SAMPLES_8K, dtype=np.int16), codec)[0]
        pt = {"ulaw": PT_PCMU, "alaw": PT_PCMA, "slin16": slin16_payload_type}[codec]
        self._samples_per_packet = 320 if codec == "slin16" else SAMPLES_8K
        self.sender = RtpSender(pt, rng=random.Random(self._rng.getrandbits(64)))
        self.receiver = RtpReceiver()
        self.received: list[ReceivedPacket] = []
        self.packets_sent = 0
        self.packets_lost_injected = 0
        self.packets_reordered_injected = 0
        self.send_errors = 0
        self._sock: socket.socket | None = None
        self._address: tuple[str, int] | None = None  # kept after close, for reports
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._kernel_timestamps = False

    # -- socket lifecycle --------------------------------------------------------------------------------

    async def bind(self, port: int = 0) -> tuple[str, int]:
        """Open and bind this leg's UDP socket (an ephemeral port unless given)."""
        if self._sock is not None:
            return self.local_address
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self._bind_host, port))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                self._kernel_timestamps = True
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(sock.fileno(), self._on_readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        host, bound_port = sock.getsockname()[:2]
        self._address = (str(host), int(bound_port))
        return self._address

    @property
    def local_address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("SimLeg is not bound")
        return self._address

    def set_remote(self, addr: tuple[str, int]) -> None:
        self.remote = addr

    def close(self) -> None:
        """Close the socket (idempotent). Results stay readable."""
        self._stop.set()
        if self._sock is not None:
            sock, self._sock = self._sock, None
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    async def __aenter__(self) -> SimLeg:
        await self.bind()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stop(self) -> None:
        """Make run() return at its next step."""
        self._stop.set()

    # -- sending -----------------------------------------------------------------------------------------

    async def run(self, duration_s: float | None = None, *, tail_s: float = 0.0) -> None:
        """Send one packet per 20 ms for ``duration_s`` (None: until stop()), then keep only receiving for
        ``tail_s``. Requires bind() and a remote."""
        if self._sock is None:
            await self.bind()
        if self.remote is None:
            raise RuntimeError("SimLeg has no remote address: call set_remote() first")
        self._stop.clear()
        timer = MediaClock.shared("legs")  # sub-millisecond wake-ups (one timerfd for every leg), no tick
        timer.acquire()
        # (send time, tie-break, datagram): impaired packets may leave out of order.
        pending: list[tuple[float, int, bytes]] = []
        try:
            t0 = time.monotonic() + 0.005
            end = None if duration_s is None else t0 + duration_s
            k = 0
            while not self._stop.is_set():
                due = t0 + k * PTIME_S
                if end is not None and due >= end:
                    break
                self._schedule(k, due, pending)
                if self.junk_pps:
                    self._send_junk(int(self.junk_pps * PTIME_S * (k + 1)) - int(self.junk_pps * PTIME_S * k))
                k += 1
                next_due = t0 + k * PTIME_S
                while pending and pending[0][0] < next_due and not self._stop.is_set():
                    await timer.sleep_until(pending[0][0])
                    _, _, datagram = heapq.heappop(pending)
                    self._send(datagram)
                if not self._stop.is_set():
                    await timer.sleep_until(next_due)
            for _, _, datagram in sorted(pending):  # late packets still in flight at the end: let them go
                if self._stop.is_set():
                    break
                self._send(datagram)
            if tail_s > 0 and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), tail_s)
        finally:
            timer.release()

    def _schedule(self, k: int, due: float, pending: list[tuple[float, int, bytes]]) -> None:
        payload = self._payloads[k] if k < len(self._payloads) else self._silence
        datagram = self.sender.next_packet(payload, self._samples_per_packet)
        if self.loss and self._rng.random() < self.loss:
            self.packets_lost_injected += 1
            return
        send_at = due
        if self.jitter_s:
            send_at += self._rng.uniform(0.0, self.jitter_s)
        if self.reorder and self._rng.random() < self.reorder:
            send_at += PTIME_S * 1.5  # leaves after the next packet
            self.packets_reordered_injected += 1
        heapq.heappush(pending, (send_at, k, datagram))

    def _send(self, datagram: bytes) -> None:
        if self._sock is None or self.remote is None:
            return
        try:
            self._sock.sendto(datagram, self.remote)
            self.packets_sent += 1
        except OSError:  # a full socket buffer or an unreachable peer: the packet is lost, the leg goes on
            self.send_errors += 1

    def _send_junk(self, count: int) -> None:
        """``count`` spoofed datagrams a real stream's receiver must drop: a wrong payload type, a foreign
        SSRC, a truncated header, a wrong payload size, in turn."""
        ssrc = self.sender.ssrc
        kinds = (
            build_rtp(RtpPacket(96, 1, 0, ssrc, self._silence)),
            build_rtp(RtpPacket(self.sender.payload_type, 7, 0, (ssrc + 1) % 2**32, self._silence)),
            build_rtp(RtpPacket(self.sender.payload_type, 1, 0, ssrc, self._silence))[:9],
            build_rtp(RtpPacket(self.sender.payload_type, 1, 0, ssrc, self._silence[:40])),
        )
        for _ in range(count):
            self._send(kinds[self.junk_sent % len(kinds)])
            self.junk_sent += 1

    def send_raw(self, datagram: bytes) -> None:
        """Send arbitrary bytes from this leg's socket (tests: garbage, replays)."""
        self._send(datagram)

    def send_garbage(self, kind: str) -> None:
        """Send one bad datagram of a kind in GARBAGE_KINDS."""
        good = RtpPacket(PT_PCMU, 1, 160, 0x1234, self._silence)
        if kind == "truncated":
            data = build_rtp(good)[:7]
        elif kind == "oversized":
            data = build_rtp(RtpPacket(PT_PCMU, 1, 160, 0x1234, b"\xff" * 3000))
        elif kind == "wrong_version":
            raw = bytearray(build_rtp(good))
            raw[0] = (1 << 6) | (raw[0] & 0x3F)
            data = bytes(raw)
        elif kind == "unknown_pt":
            data = build_rtp(RtpPacket(96, 1, 160, self.sender.ssrc, self._silence))
        elif kind == "foreign_ssrc":
            data = build_rtp(RtpPacket(self.sender.payload_type, 1, 160, (self.sender.ssrc + 1) % 2**32,
                                       self._silence))
        elif kind == "rtcp":
            data = bytes([0x80, 200, 0, 6]) + bytes(24)
        elif kind == "empty":
            data = b""
        else:
            raise ValueError(f"unknown garbage kind {kind!r}; one of {GARBAGE_KINDS}")
        self._send(data)

    def change_ssrc(self, ssrc: int | None = None) -> None:
        """Continue the stream under a new SSRC with fresh sequence/timestamp (like a re-INVITE)."""
        rng = random.Random(self._rng.getrandbits(64))
        self.sender = RtpSender(self.sender.payload_type, ssrc=ssrc, rng=rng)

    # -- receiving ---------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # drain what is queued, but give the loop back now and then
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(_RECV_BUFFER, socket.CMSG_SPACE(_TIMESPEC.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable reported on the socket: nothing to read
                return
            arrival = self._arrival_time(ancdata)
            pkt = self.receiver.receive(data)
            if pkt is None:
                continue
            self.received.append(
                ReceivedPacket(arrival, pkt.sequence, pkt.timestamp, pkt.ssrc, pkt.payload_type, pkt.marker,
                               pkt.payload)
            )

    @staticmethod
    def _arrival_time(ancdata: list[tuple[int, int, bytes]]) -> float:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(data)
                return sec + nsec * 1e-9
        return time.time()

    # -- results -----------------------------------------------------------------------------------------

    @property
    def packets_received(self) -> int:
        return len(self.received)

    def received_audio_8k(self) -> np.ndarray:
        """What came back, decoded (ulaw), in sequence order; gaps in the sequence become silence."""
        if not self.received:
            return np.zeros(0, dtype=np.int16)
        by_index: dict[int, bytes] = {}
        for idx, p in zip(self._extended_indices(), self.received, strict=True):
            by_index.setdefault(idx, p.payload)
        first, last = min(by_index), max(by_index)
        out = np.zeros((last - first + 1) * SAMPLES_8K, dtype=np.int16)
        for idx, payload in by_index.items():
            pcm = ulaw_decode(payload)[:SAMPLES_8K]
            start = (idx - first) * SAMPLES_8K
            out[start : start + len(pcm)] = pcm
        return out

    def _extended_indices(self) -> list[int]:
        """Each received packet's sequence number unwrapped past 65535, relative to the first one."""
        indices: list[int] = []
        for i, p in enumerate(self.received):
            indices.append(0 if i == 0 else indices[-1] + seq_diff(p.sequence, self.received[i - 1].sequence))
        return indices

    @property
    def arrival_intervals_ms(self) -> np.ndarray:
        """Intervals between consecutive packet arrivals, in milliseconds."""
        if len(self.received) < 2:
            return np.zeros(0)
        return np.diff(np.array([p.arrival for p in self.received])) * 1000.0

    @property
    def pacing_jitter_ms(self) -> np.ndarray:
        """|inter-packet interval − 20 ms| per interval."""
        return np.abs(self.arrival_intervals_ms - PTIME_S * 1000.0)

    @property
    def pacing_jitter_ms_p99(self) -> float:
        jitter = self.pacing_jitter_ms
        return float(np.percentile(jitter, 99)) if len(jitter) else 0.0

    @property
    def timestamp_errors(self) -> int:
        """Packets whose RTP timestamp is not first_timestamp + 160 × (sequence distance) — drift or jumps."""
        errors = 0
        ref: ReceivedPacket | None = None
        for p in self.received:
            if ref is None or p.ssrc != ref.ssrc:
                ref = p
                continue
            expected = (ref.timestamp + SAMPLES_8K * seq_diff(p.sequence, ref.sequence)) % 2**32
            if p.timestamp != expected:
                errors += 1
        return errors

    @property
    def timestamp_drift_ms(self) -> float:
        """How far the sender's RTP clock ran from real time over the stream (last SSRC): the median of
        (arrival − RTP time) over the last 50 packets minus the same over the first 50. Medians, so that a
        few late packets (scheduling) do not read as drift; a clock that drifts moves the whole window."""
        same = [p for p in self.received if p.ssrc == self.received[-1].ssrc] if self.received else []
        if len(same) < 20:
            return 0.0
        first_ts = same[0].timestamp
        offsets = [p.arrival * 1000.0 - ((p.timestamp - first_ts) % 2**32) / 8.0 for p in same]
        n = min(50, len(offsets) // 2)
        return float(np.median(offsets[-n:]) - np.median(offsets[:n]))

    @property
    def sequence_gaps(self) -> int:
        """Packets missing from what came back (by sequence number)."""
        if not self.received:
            return 0
        indices = set(self._extended_indices())
        return (max(indices) - min(indices) + 1) - len(indices)

    def summary(self) -> dict[str, object]:
        return {
            "packets_sent": self.packets_sent,
            "packets_lost_injected": self.packets_lost_injected,
            "packets_reordered_injected": self.packets_reordered_injected,
            "packets_received": self.packets_received,
            "bad_received": dict(self.receiver.stats.dropped),
            "sequence_gaps": self.sequence_gaps,
            "timestamp_errors": self.timestamp_errors,
            "timestamp_drift_ms": round(self.timestamp_drift_ms, 3),
            "pacing_jitter_p99_ms": round(self.pacing_jitter_ms_p99, 3),
            "kernel_timestamps": self._kernel_timestamps,
        }


def _packetize(audio_8k: np.ndarray, codec: Codec) -> list[bytes]:
    """Split 8 kHz audio into 20 ms payloads in ``codec`` (slin16 is resampled to 16 kHz)."""
    n = -(-len(audio_8k) // SAMPLES_8K) * SAMPLES_8K
    padded = np.zeros(max(n, SAMPLES_8K), dtype=np.int16)
    padded[: len(audio_8k)] = audio_8k
    if codec == "slin16":
        wide = soxr.resample(padded.astype(np.float32) / 32768.0, 8000, 16000, quality="HQ")
        pcm16 = np.clip(np.round(wide * 32767.0), -32768, 32767).astype(np.int16)
        return [slin16_encode(pcm16[i : i + 320]) for i in range(0, len(pcm16) - 319, 320)]
    encode = ulaw_encode if codec == "ulaw" else alaw_encode
    return [encode(padded[i : i + SAMPLES_8K]) for i in range(0, len(padded), SAMPLES_8K)]
