"""What a caller sends and what it gets back, on the wire.

Sending: speech synthesised at test time (espeak-ng, resampled to 8 kHz) becomes one pcap per call — the
caller's whole RTP stream (PCMU every 20 ms, silence between phrases, RFC 2833 telephone-events at the
given times), one SSRC with continuous sequence numbers and timestamps, as a phone sends it. SIPp plays it
(``play_pcap_audio``). Receiving: dumpcap records the caller's media port; :func:`read_pcap` and
:class:`RtpStream` take the pcap apart (pure Python, libpcap format). Nothing here is committed audio.
"""

from __future__ import annotations

import struct
import subprocess
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from admin_cli.loadtest_sip import write_rtp_pcap
from bridge.media.codecs import ulaw_decode, ulaw_encode
from bridge.media.rtp import PT_PCMU, RtpPacket, build_rtp, parse_rtp

RATE = 8000
FRAME = 160  # 20 ms at 8 kHz
PT_EVENT = 101
DTMF_EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}
SILENCE_ULAW = ulaw_encode(np.zeros(FRAME, dtype=np.int16))


def speech(text: str, out_dir: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng, as 8 kHz int16 (about 8-10 phonemes a second)."""
    wav = out_dir / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True,
                   capture_output=True, timeout=60)
    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    audio = soxr.resample(pcm.astype(np.float32), rate, RATE)
    return np.clip(audio, -32768, 32767).astype(np.int16)


@dataclass
class Timeline:
    """A caller's stream: ``add_audio``/``add_silence``/``add_dtmf`` in order, then ``write_pcap``."""

    ssrc: int = 0x5EED1234
    packets: list[tuple[float, bytes]] = field(default_factory=list)  # (send time, RTP datagram)
    seq: int = 1000
    ts: int = 160_000
    t: float = 0.0
    audio_starts: list[tuple[float, int]] = field(default_factory=list)  # (time, sample index) of each audio

    def _packet(self, pt: int, payload: bytes, marker: bool = False, ts: int | None = None) -> None:
        rtp = RtpPacket(payload_type=pt, sequence=self.seq & 0xFFFF, timestamp=(self.ts if ts is None else ts)
                        & 0xFFFFFFFF, ssrc=self.ssrc, payload=payload, marker=marker)
        self.packets.append((self.t, build_rtp(rtp)))
        self.seq += 1

    def add_audio(self, pcm: np.ndarray) -> None:
        frames = -(-len(pcm) // FRAME)
        padded = np.zeros(frames * FRAME, dtype=np.int16)
        padded[:len(pcm)] = pcm
        for k in range(frames):
            self._packet(PT_PCMU, ulaw_encode(padded[k * FRAME:(k + 1) * FRAME]))
            self.ts += FRAME
            self.t += 0.02

    def add_silence(self, seconds: float) -> None:
        for _ in range(round(seconds / 0.02)):
            self._packet(PT_PCMU, SILENCE_ULAW)
            self.ts += FRAME
            self.t += 0.02

    def add_dtmf(self, digit: str, ms: int = 160) -> None:
        """RFC 2833/4733: one event, its start timestamp throughout, duration growing every 20 ms, the end
        packet three times; audio resumes after it."""
        event = DTMF_EVENTS[digit]
        start_ts = self.ts
        steps = ms // 20
        for k in range(1, steps + 1):
            payload = struct.pack("!BBH", event, 10, k * FRAME)
            self._packet(PT_EVENT, payload, marker=(k == 1), ts=start_ts)
            self.t += 0.02
        for _ in range(3):  # the end packet, sent three times (20 ms apart)
            self._packet(PT_EVENT, struct.pack("!BBH", event, 0x80 | 10, steps * FRAME), ts=start_ts)
            self.t += 0.02
        self.ts += (steps + 3) * FRAME

    @property
    def duration_s(self) -> float:
        return self.t

    def pcm(self) -> np.ndarray:
        """The audio this stream carries as sent; each telephone-event packet's 20 ms as silence."""
        out = []
        for _, datagram in self.packets:
            rtp = parse_rtp(datagram)
            out.append(ulaw_decode(rtp.payload) if rtp.payload_type == PT_PCMU else np.zeros(FRAME, np.int16))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)

    def write_pcap(self, path: Path, src_port: int = 6000, dst_port: int = 6002) -> None:
        """libpcap, Ethernet/IPv4/UDP: what SIPp's play_pcap_audio reads (it rewrites addresses/ports)."""
        write_rtp_pcap(path, self.packets, src_port, dst_port)


@dataclass(frozen=True)
class Datagram:
    time: float
    src_port: int
    dst_port: int
    payload: bytes


def read_pcap(path: Path) -> Iterator[Datagram]:
    """UDP datagrams of a libpcap file (Ethernet or Linux cooked captures, IPv4)."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        link = {1: 14, 113: 16, 276: 20}.get(linktype)
        if link is None or len(frame) < link + 28:
            continue
        ip = frame[link:]
        if ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        src, dst, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
        yield Datagram(sec + frac / (1e9 if nano else 1e6), src, dst, ip[ihl + 8:ihl + length])


@dataclass
class RtpStream:
    """One direction's RTP packets (arrival time, parsed packet), in capture order."""

    packets: list[tuple[float, RtpPacket]]

    @classmethod
    def to_port(cls, datagrams: list[Datagram], port: int) -> RtpStream:
        found = []
        for d in datagrams:
            if d.dst_port != port:
                continue
            try:
                found.append((d.time, parse_rtp(d.payload)))
            except ValueError:
                continue
        return cls(found)

    def audio(self) -> list[tuple[float, RtpPacket]]:
        return [(t, p) for t, p in self.packets if p.payload_type == PT_PCMU]

    def pcm(self, since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        """The PCMU audio received between two capture times, in arrival order."""
        chunks = [ulaw_decode(p.payload) for t, p in self.audio() if since <= t < until]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def best_correlation(sent: np.ndarray, received: np.ndarray) -> tuple[float, int]:
    """Peak normalised cross-correlation of ``sent`` found anywhere in ``received`` and its lag (samples):
    1.0 is the same waveform; an echo through two G.711 legs and the bridge's resamplers stays far above
    unrelated audio (MOH, silence, other speech: well under 0.5)."""
    a = sent.astype(np.float64)
    b = received.astype(np.float64)
    if len(b) < len(a) or not a.any():
        return 0.0, -1
    n = 1 << (len(a) + len(b)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: len(b) - len(a) + 1]
    energy = np.sqrt(np.convolve(b * b, np.ones(len(a)), mode="valid"))
    norm = np.linalg.norm(a) * np.maximum(energy, 1e-9)
    scores = corr / norm
    lag = int(np.argmax(scores))
    return float(scores[lag]), lag


@dataclass(frozen=True)
class EchoCheck:
    """How much of a sent utterance came back: each 0.5 s piece of it that has speech, looked for in what
    was received. A piece is found above 0.75: an echo scores 0.99+ on an idle machine and 0.88+ on a
    loaded one (the bridge conceals a late frame now and then), while a piece of other speech or of the
    music on hold scores 0.1-0.6 (measured). A glitch costs one piece; a wrong stream costs them all."""

    scores: tuple[float, ...]

    @property
    def found(self) -> float:
        """The share of pieces found (correlation above 0.75)."""
        return sum(s > 0.75 for s in self.scores) / max(1, len(self.scores))

    def __str__(self) -> str:
        scores = ", ".join(f"{s:.2f}" for s in self.scores)
        return f"{self.found:.0%} of {len(self.scores)} pieces found ({scores})"


def echo_check(sent: np.ndarray, received: np.ndarray, piece_s: float = 0.5) -> EchoCheck:
    step = int(RATE * piece_s)
    loud = rms(sent) * 0.3
    scores = []
    for start in range(0, len(sent) - step + 1, step):
        piece = sent[start:start + step]
        if rms(piece) > loud:
            scores.append(best_correlation(piece, received)[0])
    return EchoCheck(tuple(scores))


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0
