"""G.711 (µ-law, A-law) and L16 codecs plus packet-loss concealment, sans-IO.

PCM is always a 1-D ``numpy.int16`` array at the codec's own rate. G.711 goes through ``audioop`` (stdlib on
3.11/3.12, the ``audioop-lts`` package on 3.13+), which is table-driven C and exact to ITU-T G.711.

Concealment (:class:`LossConcealer`), in the spirit of G.711 Appendix I but simpler: on a lost 20 ms the last
pitch period of the history (found by autocorrelation, 2.5–15 ms) is repeated, overlap-added onto the history
for a click-free start; the repetition stays at full level for the first 10 ms, then fades linearly to silence
at 60 ms of consecutive loss. When real audio resumes after a loss, its first 4 ms are cross-faded from the
concealment signal so that the boundary does not click.
"""

from __future__ import annotations

import audioop
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from bridge.media.rtp import PT_PCMA, PT_PCMU, PT_SLIN16
from engine.protocol import float_to_int16

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]

#: One 20 ms ulaw packet of digital silence (µ-law 0xFF decodes to 0).
ULAW_SILENCE_20MS = b"\xff" * 160
#: One 20 ms alaw packet of digital silence (A-law 0xD5 decodes to +8, the smallest magnitude).
ALAW_SILENCE_20MS = b"\xd5" * 160


class CodecError(ValueError):
    """A payload that cannot be decoded (e.g. an odd number of bytes for L16)."""


class UnsupportedPayloadType(ValueError):
    """No inbound codec for this RTP payload type."""

    def __init__(self, payload_type: int) -> None:
        super().__init__(f"unsupported RTP payload type {payload_type}")
        self.payload_type = payload_type


def _as_int16(pcm: npt.ArrayLike) -> Int16Array:
    arr = np.asarray(pcm)
    if arr.ndim != 1:
        raise CodecError(f"PCM must be 1-D, got shape {arr.shape}")
    if arr.dtype != np.int16:
        raise CodecError(f"PCM must be int16, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype="<i2")


def ulaw_decode(payload: bytes) -> Int16Array:
    """(A read-only view on the decoded bytes: no copy. Nothing downstream writes into it.)"""
    return np.frombuffer(audioop.ulaw2lin(payload, 2), dtype=np.int16)


def ulaw_encode(pcm: Int16Array) -> bytes:
    return audioop.lin2ulaw(_as_int16(pcm).tobytes(), 2)


def alaw_decode(payload: bytes) -> Int16Array:
    return np.frombuffer(audioop.alaw2lin(payload, 2), dtype=np.int16)


def alaw_encode(pcm: Int16Array) -> bytes:
    return audioop.lin2alaw(_as_int16(pcm).tobytes(), 2)


def slin16_decode(payload: bytes) -> Int16Array:
    """Big-endian signed 16-bit linear (RFC 3551 L16, Asterisk slin/slin16) to native int16."""
    if len(payload) % 2:
        raise CodecError(f"L16 payload has an odd length ({len(payload)} bytes)")
    return np.frombuffer(payload, dtype=">i2").astype(np.int16)


def slin16_encode(pcm: Int16Array) -> bytes:
    return _as_int16(pcm).astype(">i2").tobytes()


def pcm16_to_float32(pcm: Int16Array) -> Float32Array:
    """int16 → float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.float32) * np.float32(1.0 / 32768.0)


def float32_to_pcm16(audio: npt.NDArray[np.floating]) -> Int16Array:
    """float32 in [-1, 1] → int16, rounded and clipped (resampler overshoot must not wrap around): the
    engine protocol's own conversion, so both sides of the bridge round alike."""
    return float_to_int16(audio)


class LossConcealer:
    """Pitch-repetition packet-loss concealment for one stream (see module docstring)."""

    HISTORY_MS: ClassVar[int] = 40
    MIN_PITCH_MS: ClassVar[float] = 2.5
    MAX_PITCH_MS: ClassVar[float] = 15.0
    FULL_LEVEL_MS: ClassVar[int] = 10
    SILENT_AFTER_MS: ClassVar[int] = 60
    OVERLAP_MS: ClassVar[float] = 1.0
    RESUME_FADE_MS: ClassVar[float] = 4.0

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        # The last chunks heard, newest last, enough for HISTORY_MS: joined only when a loss starts (joining
        # on every 20 ms chunk was a numpy concatenation per packet for a history rarely used).
        self._chunks: deque[Int16Array] = deque()
        self._chunks_len = 0
        self._period: Float32Array | None = None  # one pitch period being repeated
        self._phase = 0  # position in the period of the next concealed sample
        self._concealed = 0  # consecutive concealed samples so far
        self._ms = sample_rate / 1000.0

    @property
    def concealing(self) -> bool:
        return self._concealed > 0

    def _pitch_period(self, hist: Float32Array) -> int:
        lo = max(1, int(self.MIN_PITCH_MS * self._ms))
        hi = int(self.MAX_PITCH_MS * self._ms)
        window = int(10 * self._ms)
        if len(hist) < hi + window:
            return min(len(hist), int(10 * self._ms)) or 1
        target = hist[-window:]
        # Every candidate at once (row i: the window ending ``hi - i`` samples back, i.e. lag hi - i): one
        # matrix-vector product instead of two dot products per lag. This runs at the onset of every loss,
        # and a loop in a busy moment made concealment dearer than decoding.
        recent = hist[len(hist) - window - hi :]
        rows = np.lib.stride_tricks.sliding_window_view(recent, window)[: hi - lo + 1]
        energy = np.einsum("ij,ij->i", rows, rows)
        dots = rows @ target
        lags = hi - np.arange(len(rows))
        ok = energy > 0.0
        if not np.any(ok):
            return lo
        score = np.where(ok, dots / np.sqrt(np.where(ok, energy, 1.0)), -np.inf)
        best = score.max()
        return int(lags[score == best].min())  # the shortest lag among equals, as a scan from lo would

    def _synth(self, n: int) -> Float32Array:
        """The next ``n`` samples of the repeated period, with the loss-duration gain applied."""
        assert self._period is not None
        period = self._period
        idx = (self._phase + np.arange(n)) % len(period)
        out = period[idx].copy()
        pos = self._concealed + np.arange(n)
        full = self.FULL_LEVEL_MS * self._ms
        silent = self.SILENT_AFTER_MS * self._ms
        gain = np.clip(1.0 - (pos - full) / (silent - full), 0.0, 1.0).astype(np.float32)
        self._phase = int((self._phase + n) % len(period))
        self._concealed += n
        out *= gain
        return out

    def conceal(self, n_samples: int) -> Int16Array:
        """``n_samples`` standing in for lost audio (silence once the loss is long or nothing was heard)."""
        if n_samples <= 0:
            return np.zeros(0, dtype=np.int16)
        if self._concealed == 0:
            hist = self._history().astype(np.float32)
            if len(hist) == 0 or not np.any(hist):
                self._period = None
            else:
                lag = self._pitch_period(hist)
                self._period = hist[-lag:].copy()
                self._phase = 0
        if self._period is None:
            self._concealed += n_samples
            return np.zeros(n_samples, dtype=np.int16)
        out = self._synth(n_samples)
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    def observe(self, pcm: Int16Array) -> Int16Array:
        """Record decoded audio as history; after a loss, cross-fade its start from the concealment.

        Returns the audio to play (``pcm`` itself unless a fade was applied)."""
        if self._concealed and self._period is not None and len(pcm):
            n = min(len(pcm), int(self.RESUME_FADE_MS * self._ms))
            tail = self._synth(n)
            ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
            mixed = pcm.astype(np.float32)
            mixed[:n] = mixed[:n] * ramp + tail * (1.0 - ramp)
            pcm = np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)
        self._concealed = 0
        self._period = None
        keep = int(self.HISTORY_MS * self._ms)
        self._chunks.append(pcm)
        self._chunks_len += len(pcm)
        while self._chunks_len - len(self._chunks[0]) >= keep:
            self._chunks_len -= len(self._chunks.popleft())
        return pcm

    def _history(self) -> Int16Array:
        """The last HISTORY_MS heard (less at the start of the stream)."""
        keep = int(self.HISTORY_MS * self._ms)
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(list(self._chunks))[-keep:]


@dataclass(frozen=True, slots=True)
class CodecInfo:
    name: str
    payload_type: int
    sample_rate: int


class InboundCodec:
    """Decoder + concealment for one inbound RTP stream of one payload type."""

    def __init__(self, info: CodecInfo) -> None:
        self.info = info
        self._plc = LossConcealer(info.sample_rate)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def payload_type(self) -> int:
        return self.info.payload_type

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def samples_per_20ms(self) -> int:
        return self.info.sample_rate // 50

    def _decode_raw(self, payload: bytes) -> Int16Array:
        if self.info.name == "ulaw":
            return ulaw_decode(payload)
        if self.info.name == "alaw":
            return alaw_decode(payload)
        return slin16_decode(payload)

    def rms(self, payload: bytes) -> int:
        """One payload's 16-bit RMS level, decoded aside: the concealment's history is not touched (raises
        :class:`CodecError` on a malformed one)."""
        return int(audioop.rms(self._decode_raw(payload).tobytes(), 2))

    def decode(self, payload: bytes) -> Int16Array:
        """Decode one payload (raises :class:`CodecError` on a malformed one; state is then unchanged)."""
        return self._plc.observe(self._decode_raw(payload))

    def conceal(self, n_samples: int | None = None) -> Int16Array:
        """Audio standing in for a lost packet (default: 20 ms)."""
        return self._plc.conceal(self.samples_per_20ms if n_samples is None else n_samples)


ULAW = CodecInfo("ulaw", PT_PCMU, 8000)
ALAW = CodecInfo("alaw", PT_PCMA, 8000)


def codec_for_payload_type(payload_type: int, slin16_payload_type: int = PT_SLIN16) -> InboundCodec:
    """A fresh :class:`InboundCodec` for ``payload_type``; slin16's dynamic type is configurable."""
    if payload_type == PT_PCMU:
        return InboundCodec(ULAW)
    if payload_type == PT_PCMA:
        return InboundCodec(ALAW)
    if payload_type == slin16_payload_type:
        return InboundCodec(CodecInfo("slin16", slin16_payload_type, 16000))
    raise UnsupportedPayloadType(payload_type)
