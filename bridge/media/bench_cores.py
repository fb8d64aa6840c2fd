"""Per-packet CPU cost of the sans-IO media cores: `.venv/bin/python -m bridge.media.bench_cores`."""
import random
import time

import numpy as np

from bridge.media.assets import load_speech_8k
from bridge.media.codecs import codec_for_payload_type, float32_to_pcm16, ulaw_encode
from bridge.media.framing import FrameAccumulator, PacketSplitter
from bridge.media.jitter import JitterBuffer
from bridge.media.resample import StreamResampler
from bridge.media.rtp import RtpSender, parse_rtp

s = load_speech_8k()
chunks = [ulaw_encode(s[i : i + 160]) for i in range(0, len(s) // 160 * 160, 160)]
N = 20000
snd = RtpSender(0, rng=random.Random(1))
dgrams = [snd.next_packet(chunks[i % len(chunks)], 160) for i in range(N)]
pk = [parse_rtp(d) for d in dgrams]


def bench(name, fn):
    t = time.perf_counter()
    fn()
    print(f"{name:40s} {(time.perf_counter() - t) / N * 1e6:7.2f} us/packet")


def inbound():
    jb, c = JitterBuffer(), codec_for_payload_type(0)
    up, fa = StreamResampler(8000, 24000), FrameAccumulator()
    for i, d in enumerate(dgrams):
        jb.push(parse_rtp(d), i * 0.02 + 0.003)
        sl = jb.pop(i * 0.02 + 0.005)
        fa.push(up.process(c.decode(sl.payload) if sl.payload is not None else c.conceal()))


def outbound():
    dn, sp, tx, x = StreamResampler(24000, 8000), PacketSplitter(), RtpSender(0), np.zeros(1920, np.float32)
    for _ in range(N // 4):
        for ch in sp.push(float32_to_pcm16(dn.process(x))):
            tx.next_packet(ulaw_encode(ch), 160)


bench("build (RtpSender.next_packet)", lambda: [snd.next_packet(chunks[0], 160) for _ in range(N)])
bench("parse_rtp", lambda: [parse_rtp(d) for d in dgrams])
def jitter_only() -> None:
    jb = JitterBuffer()
    for i, p in enumerate(pk):
        jb.push(p, i * 0.02 + 0.003)
        jb.pop(i * 0.02 + 0.005)


bench("jitter push+pop", jitter_only)
bench("inbound: parse+jitter+decode+8k->24k+frame", inbound)
bench("outbound: 24k->8k+split+ulaw+RTP", outbound)
