"""RTP (RFC 3550) packets: parsing, building and sequence arithmetic, sans-IO.

Only the fixed header, CSRC list, one header extension and padding are handled; RTCP is recognised and
rejected (reason ``"rtcp"``) so that a stray RTCP datagram on the media port is counted, not decoded as audio.

Sequence numbers wrap at 2**16 and timestamps at 2**32: always compare them with :func:`seq_diff` /
:func:`ts_diff`, never with ``<``.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

RTP_VERSION = 2
RTP_HEADER_SIZE = 12
#: Largest datagram accepted or built: an Ethernet MTU. A G.711 20 ms packet is 172 bytes.
MAX_DATAGRAM = 1500

PT_PCMU = 0
PT_PCMA = 8
PT_G722 = 9
#: Asterisk's dynamic payload type for slin16 (signed linear 16 kHz, big endian). Configurable per receiver.
PT_SLIN16 = 118

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32

_HEADER = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")


class RtpParseError(ValueError):
    """A datagram that is not a usable RTP packet. ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet. ``extension`` is the extension body (a multiple of 4 bytes) after its 4-byte header,
    whose 16-bit profile id is ``extension_profile``. ``padding`` is how many padding bytes the packet had on
    the wire (parse) or should get (build); it is never part of ``payload``.

    Treated as a value (nothing changes one once made), but not ``frozen``: a frozen dataclass sets each
    field through ``object.__setattr__``, which made one 8x dearer to build (2.5 against 0.3 µs), once per
    datagram received. :func:`parse_rtp` builds its packets without the range checks, which its parse does."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: bytes | None = None
    extension_profile: int = 0
    padding: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.payload_type <= 127:
            raise ValueError(f"payload_type {self.payload_type} not in 0..127")
        if not 0 <= self.sequence < SEQ_MOD:
            raise ValueError(f"sequence {self.sequence} not in 0..65535")
        if not 0 <= self.timestamp < TS_MOD:
            raise ValueError(f"timestamp {self.timestamp} not in 0..2**32-1")
        if not 0 <= self.ssrc < TS_MOD:
            raise ValueError(f"ssrc {self.ssrc} not in 0..2**32-1")
        if len(self.csrc) > 15 or not all(0 <= c < TS_MOD for c in self.csrc):
            raise ValueError("csrc: at most 15 values in 0..2**32-1")
        if self.extension is not None and (len(self.extension) % 4 or len(self.extension) > 4 * 0xFFFF):
            raise ValueError("extension body must be a multiple of 4 bytes, at most 4*65535")
        if not 0 <= self.extension_profile <= 0xFFFF:
            raise ValueError("extension_profile not in 0..65535")
        if self.extension is None and self.extension_profile:
            raise ValueError("extension_profile without an extension")
        if not 0 <= self.padding <= 255:
            raise ValueError("padding not in 0..255")

    @property
    def wire_size(self) -> int:
        """Size in bytes of this packet as :func:`build_rtp` writes it."""
        ext = 0 if self.extension is None else 4 + len(self.extension)
        return RTP_HEADER_SIZE + 4 * len(self.csrc) + ext + len(self.payload) + self.padding


_new_packet = object.__new__


def _raw_construction() -> bool:
    """Whether a packet can be made without ``__init__`` (interpreted: skips ``__post_init__``'s checks, which
    parse_rtp's parse makes); a class compiled by mypyc refuses it, and its checks cost next to nothing."""
    try:
        _new_packet(RtpPacket)
    except TypeError:
        return False
    return True


_RAW_CONSTRUCTION = _raw_construction()


def parse_rtp(data: bytes, max_size: int = MAX_DATAGRAM) -> RtpPacket:
    """Parse one datagram; raise :class:`RtpParseError` (and nothing else) when it is not valid RTP.

    Reasons: ``oversized``, ``truncated``, ``version``, ``rtcp``, ``padding``, ``extension``.
    """
    size = len(data)
    if size > max_size:
        raise RtpParseError("oversized", f"{size} > {max_size} bytes")
    if size < RTP_HEADER_SIZE:
        raise RtpParseError("truncated", f"{size} bytes, header needs {RTP_HEADER_SIZE}")
    b0, b1, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    version = b0 >> 6
    if version != RTP_VERSION:
        raise RtpParseError("version", f"version {version}")
    # RFC 5761 §4: second byte 192..223 is an RTCP packet type (SR, RR, SDES, BYE, APP...).
    if 192 <= b1 <= 223:
        raise RtpParseError("rtcp", f"RTCP packet type {b1}")
    has_padding = bool(b0 & 0x20)
    has_extension = bool(b0 & 0x10)
    csrc_count = b0 & 0x0F
    pos = RTP_HEADER_SIZE + 4 * csrc_count
    if pos > size:
        raise RtpParseError("truncated", f"{csrc_count} CSRCs do not fit in {size} bytes")
    csrc = struct.unpack_from(f"!{csrc_count}I", data, RTP_HEADER_SIZE) if csrc_count else ()
    extension: bytes | None = None
    extension_profile = 0
    if has_extension:
        if pos + 4 > size:
            raise RtpParseError("extension", "extension header truncated")
        extension_profile, words = _EXT_HEADER.unpack_from(data, pos)
        pos += 4
        if pos + 4 * words > size:
            raise RtpParseError("extension", f"extension of {words} words does not fit")
        extension = bytes(data[pos : pos + 4 * words])
        pos += 4 * words
    end = size
    padding = 0
    if has_padding:
        padding = data[-1]
        # The count includes itself, so 0 is invalid, and padding cannot eat into the header.
        if padding == 0 or pos + padding > size:
            raise RtpParseError("padding", f"padding count {padding} with {size - pos} bytes after header")
        end = size - padding
    payload_type, marker, payload = b1 & 0x7F, bool(b1 & 0x80), bytes(data[pos:end])
    if not _RAW_CONSTRUCTION:
        return RtpPacket(payload_type, sequence, timestamp, ssrc, payload, marker, tuple(csrc), extension,
                         extension_profile, padding)
    pkt = _new_packet(RtpPacket)  # (every field is in range by construction: no __post_init__ checks)
    pkt.payload_type = payload_type
    pkt.sequence = sequence
    pkt.timestamp = timestamp
    pkt.ssrc = ssrc
    pkt.payload = payload
    pkt.marker = marker
    pkt.csrc = tuple(csrc)
    pkt.extension = extension
    pkt.extension_profile = extension_profile
    pkt.padding = padding
    return pkt


def build_rtp(pkt: RtpPacket) -> bytes:
    """Serialise ``pkt``; the inverse of :func:`parse_rtp` (``parse_rtp(build_rtp(p)) == p``)."""
    b0 = (RTP_VERSION << 6) | len(pkt.csrc)
    if pkt.padding:
        b0 |= 0x20
    if pkt.extension is not None:
        b0 |= 0x10
    b1 = pkt.payload_type | (0x80 if pkt.marker else 0)
    parts = [_HEADER.pack(b0, b1, pkt.sequence, pkt.timestamp, pkt.ssrc)]
    if pkt.csrc:
        parts.append(struct.pack(f"!{len(pkt.csrc)}I", *pkt.csrc))
    if pkt.extension is not None:
        parts.append(_EXT_HEADER.pack(pkt.extension_profile, len(pkt.extension) // 4))
        parts.append(pkt.extension)
    parts.append(pkt.payload)
    if pkt.padding:
        parts.append(bytes(pkt.padding - 1) + bytes((pkt.padding,)))
    return b"".join(parts)


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 16-bit sequence numbers, in -32768..32767 (wrap-aware)."""
    return ((a - b + (SEQ_MOD >> 1)) % SEQ_MOD) - (SEQ_MOD >> 1)


def ts_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 32-bit RTP timestamps, in -2**31..2**31-1 (wrap-aware)."""
    return ((a - b + (TS_MOD >> 1)) % TS_MOD) - (TS_MOD >> 1)


class RtpSender:
    """Numbers outgoing packets of one stream (sans-IO: returns bytes, sends nothing).

    SSRC, first sequence number and first timestamp are random (RFC 3550 §5.1) unless given. The timestamp
    advances by the samples of each packet, independent of wall-clock time, so it cannot drift. The marker bit
    is set on the first packet and on the first packet after :meth:`mark_talkspurt`.
    """

    def __init__(
        self,
        payload_type: int = PT_PCMU,
        *,
        ssrc: int | None = None,
        initial_sequence: int | None = None,
        initial_timestamp: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        rand = rng if rng is not None else random.SystemRandom()
        self.payload_type = payload_type
        self.ssrc = ssrc if ssrc is not None else rand.getrandbits(32)
        self.sequence = initial_sequence if initial_sequence is not None else rand.getrandbits(16)
        self.timestamp = initial_timestamp if initial_timestamp is not None else rand.getrandbits(32)
        self.packets_sent = 0
        self.octets_sent = 0
        self._marker_next = True

    def mark_talkspurt(self) -> None:
        """Set the marker on the next packet (first packet after a silence gap, RFC 3551 §4.1)."""
        self._marker_next = True

    def skip(self, samples: int) -> None:
        """Advance the timestamp over ``samples`` not sent (a pause), so the receiver sees real time pass."""
        self.timestamp = (self.timestamp + samples) % TS_MOD

    def next_rtp_packet(self, payload: bytes, samples: int) -> RtpPacket:
        """The next packet as a dataclass; advances sequence and timestamp."""
        if samples <= 0:
            raise ValueError(f"samples must be > 0, got {samples}")
        pkt = RtpPacket(
            payload_type=self.payload_type,
            sequence=self.sequence,
            timestamp=self.timestamp,
            ssrc=self.ssrc,
            payload=payload,
            marker=self._marker_next,
        )
        self._marker_next = False
        self.sequence = (self.sequence + 1) % SEQ_MOD
        self.timestamp = (self.timestamp + samples) % TS_MOD
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return pkt

    def next_packet(self, payload: bytes, samples: int) -> bytes:
        """The next packet, serialised (the per-packet path: a 12-byte header and the payload, no objects)."""
        if samples <= 0:
            raise ValueError(f"samples must be > 0, got {samples}")
        b1 = self.payload_type | (0x80 if self._marker_next else 0)
        header = _HEADER.pack(RTP_VERSION << 6, b1, self.sequence, self.timestamp, self.ssrc)
        self._marker_next = False
        self.sequence = (self.sequence + 1) % SEQ_MOD
        self.timestamp = (self.timestamp + samples) % TS_MOD
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return header + payload


@dataclass(slots=True)
class RtpReceiverStats:
    """Counters of one receiving socket. ``dropped`` maps a reason to a count: the parse reasons plus
    ``payload_type`` (a payload type this stream does not accept)."""

    received: int = 0
    octets: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    ssrc_changes: int = 0
    ssrc: int | None = None

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class RtpReceiver:
    """Parses incoming datagrams and keeps :class:`RtpReceiverStats`; never raises on bad input.

    ``accepted_payload_types``: packets with any other payload type are dropped (counted ``payload_type``);
    ``None`` accepts all. SSRC changes are counted here; the jitter buffer resets on them.
    """

    def __init__(self, accepted_payload_types: frozenset[int] | None = None, max_size: int = MAX_DATAGRAM):
        self.accepted_payload_types = accepted_payload_types
        self.max_size = max_size
        self.stats = RtpReceiverStats()

    def receive(self, data: bytes) -> RtpPacket | None:
        """The packet in ``data``, or ``None`` if it was dropped (and counted)."""
        try:
            pkt = parse_rtp(data, self.max_size)
        except RtpParseError as exc:
            self.stats.count_drop(exc.reason)
            return None
        if self.accepted_payload_types is not None and pkt.payload_type not in self.accepted_payload_types:
            self.stats.count_drop("payload_type")
            return None
        if self.stats.ssrc is not None and pkt.ssrc != self.stats.ssrc:
            self.stats.ssrc_changes += 1
        self.stats.ssrc = pkt.ssrc
        self.stats.received += 1
        self.stats.octets += len(pkt.payload)
        return pkt
