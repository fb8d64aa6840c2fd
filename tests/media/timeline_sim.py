"""A scripted engine driving an OutputTimeline on virtual time: frames arrive when the script says, the
timeline is polled at its own deadlines (or late, when the script says the loop was), and every datagram it
returns is kept with the moment it left. No sockets, no event loop, no dependence on the machine's load."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bridge.media.metrics import LatencyLedger, MediaStats
from bridge.media.outbound import OutputTimeline
from bridge.media.rtp import PT_PCMU, RtpPacket, RtpSender, parse_rtp

FRAME_S = 0.080
LOUD = 5000
QUIET = 50


def frame_payloads(seq: int) -> list[bytes]:
    """Four 160-byte payloads that say which frame and packet they are: (seq & 0xFF, seq >> 8, j, ...)."""
    return [bytes([seq & 0xFF, (seq >> 8) & 0xFF, j]) + bytes([0x7F]) * 157 for j in range(4)]


def payload_id(payload: bytes) -> tuple[int, int] | None:
    """(frame seq, packet) of a payload made by frame_payloads; None for silence."""
    if payload[3] != 0x7F:
        return None
    return payload[0] | (payload[1] << 8), payload[2]


@dataclass
class Arrival:
    at: float
    seq: int
    loop_behind: bool = False
    levels: tuple[int, int, int, int] = (LOUD, LOUD, LOUD, LOUD)


@dataclass
class Sent:
    at: float
    packet: RtpPacket


@dataclass
class TimelineSim:
    """Run a script of engine frame arrivals through a fresh OutputTimeline."""

    t0: float = 1000.0
    #: how many input frames the engine has at time t (output frame n answers input frame n)
    input_frames: Callable[[float], int] | None = None
    #: extra lateness of the poll that serves the deadline at time t (the loop running late)
    poll_lateness: Callable[[float], float] = lambda _t: 0.0
    stats: MediaStats = field(default_factory=MediaStats)
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ledger = LatencyLedger(self.stats)
        sender = RtpSender(PT_PCMU, ssrc=1, initial_sequence=0, initial_timestamp=0)
        self.timeline = OutputTimeline(self.stats, self.ledger, sender=sender)
        self.now = self.t0
        self._scripted = 0
        self.grid_offsets: list[float] = []
        self.history: list[tuple[float, int, int]] = []  # (time, slots inserted so far, won back so far)
        self.depths: list[tuple[float, int]] = []  # (time, packets queued)

    def _input_frames(self, t: float) -> int:
        if self.input_frames is not None:
            return self.input_frames(t)
        return self._scripted  # the engine has the input of every frame of the script, and no more

    def _keep(self, datagrams: list[bytes], at: float) -> None:
        for d in datagrams:
            self.sent.append(Sent(at, parse_rtp(d)))

    def run(self, arrivals: list[Arrival], until: float) -> None:
        """Deliver ``arrivals`` (sorted by time) and poll at every deadline up to ``t0 + until``."""
        end = self.t0 + until
        pending = sorted(arrivals, key=lambda a: a.at)
        self._scripted = max((a.seq + 1 for a in pending), default=self._scripted)
        i = 0
        while True:
            deadline = self.timeline.next_deadline()
            poll_at = math.inf if deadline is None else deadline + self.poll_lateness(deadline)
            arrive_at = pending[i].at if i < len(pending) else math.inf
            t = min(poll_at, arrive_at)
            if t > end:
                break
            self.now = max(self.now, t)
            if arrive_at <= poll_at:
                a = pending[i]
                i += 1
                # Input frame n's first packet came in 80 ms before the frame could be complete.
                self.ledger.sent(a.seq, 0.0, self.t0 + (a.seq - 1) * FRAME_S)
                self._keep(
                    self.timeline.on_frame(a.seq, frame_payloads(a.seq), list(a.levels), self.now,
                                           loop_behind=a.loop_behind),
                    self.now,
                )
            else:
                self._keep(self.timeline.poll(self.now, input_frames_sent=self._input_frames(self.now)),
                           self.now)
            self.grid_offsets.append(self.timeline.grid_offset_s)
            self.history.append((self.now, self.stats.rtp_out_expanded, self.stats.rtp_out_shrunk))
            self.depths.append((self.now, self.timeline.buffer.depth))

    # -- what came out -------------------------------------------------------------------------------------

    def intervals_ms(self) -> np.ndarray:
        times = np.array([s.at for s in self.sent])
        return np.diff(times) * 1000.0

    def played_ids(self) -> list[tuple[int, int] | None]:
        return [payload_id(s.packet.payload) for s in self.sent]

    def rtp_clock_offsets_ms(self) -> np.ndarray:
        """Each packet's send time minus its RTP time (ms): constant for a drift-free stream."""
        first = self.sent[0]
        return np.array([
            (s.at - first.at) * 1000.0 - ((s.packet.timestamp - first.packet.timestamp) % 2**32) / 8.0
            for s in self.sent
        ])


def steady_arrivals(
    t0: float, frames: int, *, delay_s: float = 0.010, late: dict[int, float] | None = None,
    first_seq: int = 0, loop_behind: set[int] | None = None, quiet: set[int] | None = None,
) -> list[Arrival]:
    """Frame n arrives at t0 + n * 80 ms + delay_s (+ late[n] for the frames listed)."""
    late = late or {}
    out = []
    for n in range(frames):
        levels = (QUIET,) * 4 if quiet and n in quiet else (LOUD,) * 4
        out.append(Arrival(t0 + n * FRAME_S + delay_s + late.get(n, 0.0), first_seq + n,
                           loop_behind=bool(loop_behind and n in loop_behind), levels=levels))  # type: ignore[arg-type]
    return out
