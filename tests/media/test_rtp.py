"""RTP parsing/building (RFC 3550), sequence arithmetic, sender numbering, receiver counters."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.media.rtp import (
    MAX_DATAGRAM,
    PT_PCMU,
    RtpPacket,
    RtpParseError,
    RtpReceiver,
    RtpSender,
    build_rtp,
    parse_rtp,
    seq_diff,
    ts_diff,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127).filter(lambda pt: not 64 <= pt <= 95),  # 72..76 | marker look like RTCP
    sequence=u16,
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=400),
    marker=st.booleans(),
    csrc=st.lists(u32, max_size=15).map(tuple),
    padding=st.integers(0, 255),
).flatmap(
    lambda p: st.one_of(
        st.just(p),
        st.builds(
            lambda ext, profile: dataclasses.replace(p, extension=ext, extension_profile=profile),
            st.binary(max_size=64).map(lambda b: b[: len(b) // 4 * 4]),
            u16,
        ),
    )
)


@given(packets)
def test_build_parse_round_trip(pkt: RtpPacket) -> None:
    data = build_rtp(pkt)
    assert len(data) == pkt.wire_size
    assert parse_rtp(data, max_size=len(data)) == pkt


@given(st.binary(max_size=1600))
def test_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    try:
        pkt = parse_rtp(data)
    except RtpParseError as exc:
        assert exc.reason in {"oversized", "truncated", "version", "rtcp", "padding", "extension"}
    else:
        # Whatever parsed must serialise back to the same bytes (the parser lost nothing).
        assert build_rtp(pkt)[: len(data) - pkt.padding] == data[: len(data) - pkt.padding]


def _header(b0: int = 0x80, b1: int = 0, seq: int = 1, ts: int = 160, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", b0, b1, seq, ts, ssrc)


def test_known_packet_fields() -> None:
    data = _header(0x80, 0x80 | 8, 0xBEEF, 0xDEADBEEF, 0xCAFEBABE) + b"\xd5" * 160
    pkt = parse_rtp(data)
    assert (pkt.payload_type, pkt.marker, pkt.sequence) == (8, True, 0xBEEF)
    assert (pkt.timestamp, pkt.ssrc, pkt.payload) == (0xDEADBEEF, 0xCAFEBABE, b"\xd5" * 160)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (_header()[:11], "truncated"),
        (_header(b0=0x40) + b"x", "version"),
        (_header(b0=0x00), "version"),
        (_header(b0=0x83) + b"\0" * 8, "truncated"),  # 3 CSRCs announced, 2 present
        (_header(b0=0x90) + b"\0\0", "extension"),  # extension header cut
        (_header(b0=0x90) + b"\xbe\xde\x00\x02" + b"\0" * 4, "extension"),  # 2 words announced, 1 present
        (_header(b0=0xA0) + b"abc\x00", "padding"),  # padding count 0
        (_header(b0=0xA0) + b"ab\x09", "padding"),  # padding longer than what follows the header
        (_header(b1=200) + b"\0" * 16, "rtcp"),  # an RTCP sender report
        (_header() + b"\0" * MAX_DATAGRAM, "oversized"),
    ],
)
def test_bad_datagrams_have_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(RtpParseError) as info:
        parse_rtp(data)
    assert info.value.reason == reason


def test_csrc_extension_and_padding_are_stripped_from_payload() -> None:
    data = (
        _header(b0=0x80 | 0x20 | 0x10 | 2)
        + struct.pack("!II", 11, 22)
        + b"\xbe\xde\x00\x01"
        + b"EXT!"
        + b"audio"
        + b"\0\0\x03"
    )
    pkt = parse_rtp(data)
    assert pkt.csrc == (11, 22)
    assert (pkt.extension_profile, pkt.extension) == (0xBEDE, b"EXT!")
    assert pkt.payload == b"audio"
    assert pkt.padding == 3
    assert build_rtp(pkt) == data


def test_packet_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError):
        RtpPacket(payload_type=128, sequence=0, timestamp=0, ssrc=0, payload=b"")
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=65536, timestamp=0, ssrc=0, payload=b"")
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=0, timestamp=0, ssrc=0, payload=b"", extension=b"abc")
    with pytest.raises(ValueError):
        RtpPacket(payload_type=0, sequence=0, timestamp=0, ssrc=0, payload=b"", extension_profile=1)


def test_seq_and_ts_diff_wrap() -> None:
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(5, 65530) == 11
    assert seq_diff(100, 100) == 0
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert ts_diff(80, 0xFFFFFFF0) == 96
    assert ts_diff(0xFFFFFFF0, 80) == -96


@given(u16, st.integers(-32768, 32767))
def test_seq_diff_inverts_addition(base: int, delta: int) -> None:
    assert seq_diff((base + delta) % 65536, base) == delta


@given(u32, st.integers(-(2**31), 2**31 - 1))
def test_ts_diff_inverts_addition(base: int, delta: int) -> None:
    assert ts_diff((base + delta) % 2**32, base) == delta


def test_sender_numbers_packets_across_wrap() -> None:
    sender = RtpSender(PT_PCMU, ssrc=7, initial_sequence=65534, initial_timestamp=2**32 - 160)
    parsed = [parse_rtp(sender.next_packet(b"\xff" * 160, 160)) for _ in range(4)]
    assert [p.sequence for p in parsed] == [65534, 65535, 0, 1]
    assert [p.timestamp for p in parsed] == [2**32 - 160, 0, 160, 320]
    assert [p.marker for p in parsed] == [True, False, False, False]
    assert {p.ssrc for p in parsed} == {7}
    sender.mark_talkspurt()
    sender.skip(1600)
    after_gap = parse_rtp(sender.next_packet(b"\xff" * 160, 160))
    assert after_gap.marker and after_gap.timestamp == 480 + 1600 and after_gap.sequence == 2
    assert sender.packets_sent == 5 and sender.octets_sent == 800


def test_sender_random_start_differs() -> None:
    a, b = RtpSender(rng=random.Random(1)), RtpSender(rng=random.Random(2))
    assert (a.ssrc, a.sequence, a.timestamp) != (b.ssrc, b.sequence, b.timestamp)
    with pytest.raises(ValueError):
        a.next_packet(b"", 0)


def test_receiver_counts_drops_and_ssrc_changes() -> None:
    rx = RtpReceiver(accepted_payload_types=frozenset({PT_PCMU}))
    good = RtpSender(PT_PCMU, ssrc=1)
    other = RtpSender(PT_PCMU, ssrc=2)
    assert rx.receive(good.next_packet(b"\xff" * 160, 160)) is not None
    assert rx.receive(b"\x00garbage-garbage") is None
    assert rx.receive(b"") is None
    assert rx.receive(RtpSender(8, ssrc=1).next_packet(b"\xd5", 1)) is None
    assert rx.receive(other.next_packet(b"\xff" * 160, 160)) is not None
    assert rx.stats.received == 2
    assert rx.stats.octets == 320
    assert rx.stats.dropped == {"version": 1, "truncated": 1, "payload_type": 1}
    assert rx.stats.dropped_total == 3
    assert rx.stats.ssrc_changes == 1
