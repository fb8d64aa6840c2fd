"""CPU of one call's sans-IO media work, per second of call: `.venv/bin/python -m bridge.media.bench_cores`.

Runs the call path's own cores on virtual time (no sockets, no event loop): RTP datagrams through
:class:`~bridge.media.inbound.InboundPath` (parse, jitter buffer, decode, FIR 8k→24k, framing) and engine
frames through the output conversion (FIR 24k→8k, µ-law, levels) and
:class:`~bridge.media.outbound.OutputTimeline` (grid, slot buffer, RTP). Prints microseconds per
call-second and what that is in % of a core per call; the
I/O around it (syscalls, the engine WebSocket, the event loop) is what ``aziza-admin bench media`` adds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np

from bridge.media.assets import load_speech_8k
from bridge.media.codecs import ulaw_encode
from bridge.media.inbound import InboundPath
from bridge.media.metrics import LatencyLedger, MediaStats
from bridge.media.outbound import FrameToPackets, OutputTimeline
from bridge.media.rtp import PT_PCMU, RtpSender

SECONDS = 20.0
SOURCE = ("127.0.0.1", 4000)


def _datagrams(seconds: float) -> list[bytes]:
    speech = np.tile(load_speech_8k(), 1 + int(seconds * 8000) // len(load_speech_8k()))
    sender = RtpSender(PT_PCMU, rng=random.Random(1))
    chunks = [speech[i * 160 : (i + 1) * 160] for i in range(int(seconds * 50))]
    return [sender.next_packet(ulaw_encode(chunk), 160) for chunk in chunks]


def inbound(datagrams: list[bytes]) -> None:
    path = InboundPath(MediaStats(), now=0.0)
    path.remote = SOURCE
    for k, data in enumerate(datagrams):
        now = k * 0.020 + 0.0003
        path.on_datagram(data, SOURCE, now)
        path.poll(now)


def outbound(frames: list[np.ndarray]) -> None:
    stats = MediaStats()
    timeline = OutputTimeline(stats, LatencyLedger(stats))
    to_packets = FrameToPackets()
    for n, frame in enumerate(frames):
        now = n * 0.080 + 0.010
        packets = to_packets.convert(frame)
        timeline.on_frame(n, packets.payloads, packets.levels, now)
        for j in range(4):
            deadline = timeline.next_deadline()
            if deadline is not None and deadline < now + 0.080 and j < 4:
                timeline.poll(deadline, input_frames_sent=n + 1)


def bench(name: str, seconds: float, fn: Callable[[], None]) -> None:
    start = time.process_time()
    fn()
    per_call_second_us = (time.process_time() - start) / seconds * 1e6
    core_percent = per_call_second_us / 1e4
    print(f"{name:44s} {per_call_second_us:8.1f} us per call-second = {core_percent:6.3f} % of a core")


def main() -> None:
    datagrams = _datagrams(SECONDS)
    rng = np.random.default_rng(1)
    frames = [rng.integers(-9000, 9000, 1920).astype(np.int16) for _ in range(int(SECONDS * 12.5))]
    bench("inbound (parse, jitter, decode, 8k->24k, frames)", SECONDS, lambda: inbound(datagrams))
    bench("outbound (24k->8k, ulaw, levels, timeline, RTP)", SECONDS, lambda: outbound(frames))


if __name__ == "__main__":
    main()
