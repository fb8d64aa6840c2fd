"""The input path on virtual time: scripted datagram arrivals (clean, lost, stalled, junk floods, a new
stream) in, engine frames out. Exact verdicts; nothing depends on the machine's load."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest

from bridge.media.assets import load_speech_8k
from bridge.media.codecs import ulaw_encode
from bridge.media.inbound import FLOOD_CATCH_S, FLOOD_POLL_S, FLOOD_READS, JUNK_BURST, InboundPath, InputFrame
from bridge.media.metrics import MediaStats
from bridge.media.read_schedule import ReadSchedule
from bridge.media.rtp import PT_PCMU, RtpPacket, RtpSender, build_rtp

SOURCE = ("10.0.0.1", 4000)
T0 = 500.0


def _speech_payloads(count: int) -> list[bytes]:
    speech = np.tile(load_speech_8k(), 3)
    return [ulaw_encode(speech[i * 160 : (i + 1) * 160]) for i in range(count)]


@dataclass
class Datagram:
    at: float
    data: bytes
    addr: tuple[str, int] = SOURCE
    real: bool = True


def real_stream(count: int, *, ssrc: int = 0x1111, lose: frozenset[int] = frozenset(), start: float = T0,
                first_seq: int = 100) -> list[Datagram]:
    sender = RtpSender(PT_PCMU, ssrc=ssrc, initial_sequence=first_seq, initial_timestamp=8000)
    out = []
    for k, payload in enumerate(_speech_payloads(count)):
        data = sender.next_packet(payload, 160)
        if k not in lose:
            out.append(Datagram(start + k * 0.020 + 0.0003, data))
    return out


def junk_flood(start: float, seconds: float, per_s: float, *, ssrc: int = 0x1111) -> list[Datagram]:
    """Spoofed datagrams from the call's own source, of every kind: wrong payload type, wrong SSRC,
    malformed (truncated, bad version, bad padding), wrong size."""
    rng = random.Random(9)
    kinds = [
        lambda: build_rtp(RtpPacket(96, rng.getrandbits(16), 0, ssrc, b"\xff" * 160)),
        lambda: build_rtp(RtpPacket(PT_PCMU, rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(32),
                                    b"\x00" * 160)),
        lambda: build_rtp(RtpPacket(PT_PCMU, 1, 160, ssrc, b"\x00" * 160))[:9],
        lambda: bytes([0x40]) + build_rtp(RtpPacket(PT_PCMU, 1, 160, ssrc, b"\x00" * 160))[1:],
        lambda: build_rtp(RtpPacket(PT_PCMU, rng.getrandbits(16), 0, ssrc, b"\x00" * 80)),
        lambda: build_rtp(RtpPacket(PT_PCMU, rng.getrandbits(16), 0, ssrc, b"\x00" * 1200)),
    ]
    n = int(seconds * per_s)
    return [Datagram(start + i / per_s, kinds[i % len(kinds)](), real=False) for i in range(n)]


def run_path(datagrams: list[Datagram], until: float, *, read_as_callmedia: bool = False,
             path: InboundPath | None = None) -> tuple[InboundPath, list[InputFrame]]:
    """Deliver ``datagrams`` and poll at the path's deadlines. ``read_as_callmedia``: datagrams wait in a
    socket queue and are read the way CallMedia reads them: as they come, or, while the call is flooded,
    FLOOD_READS at a time at ``flood_poll_at`` and at the path's own deadlines."""
    stats = MediaStats()
    path = path or InboundPath(stats, now=T0, media_timeout_s=5.0)
    path.remote = SOURCE
    frames: list[InputFrame] = []
    queue = sorted(datagrams, key=lambda d: d.at)
    pos = 0
    now = T0
    next_flood_read = float("inf")

    def read(limit: int, at: float) -> None:
        nonlocal pos
        for _ in range(limit):
            if pos >= len(queue) or queue[pos].at > at:
                return
            d = queue[pos]
            pos += 1
            path.on_datagram(d.data, d.addr, at)

    while True:
        arrival = queue[pos].at if pos < len(queue) else float("inf")
        deadline = path.deadline if path.deadline is not None else float("inf")
        flooded = read_as_callmedia and path.flooded
        if flooded:
            next_flood_read = min(next_flood_read, path.flood_poll_at(now))
        else:
            next_flood_read = float("inf")
        t = min(deadline, next_flood_read, float("inf") if flooded else arrival)
        if t > T0 + until:
            break
        now = max(now, t)
        if not flooded and t == arrival:
            read(1, now)
        else:
            if flooded:
                read(FLOOD_READS, now)
                if t == next_flood_read:
                    next_flood_read = float("inf")
                path.flood_over(now)
            elif path.conceal_due(now):
                read(64, now)
        frames.extend(path.poll(now))
        if path.timed_out:
            break
    return path, frames


def test_a_clean_stream_makes_a_frame_per_four_packets_with_no_wait() -> None:
    path, frames = run_path(real_stream(100), until=2.03)
    stats = path.stats
    assert stats.rtp_in == 100 and stats.slots_concealed == 0
    assert len(frames) == 25
    # Every packet popped as it came (the first waited for the second, to show it is a stream): the jitter
    # delay, one per frame (its last packet's wait: what the buffer adds to the frame), is nothing.
    assert stats.jitter_delay_ms.count == 25 and stats.jitter_delay_ms.max_seen_ms <= 0.05
    for n, frame in enumerate(frames):
        assert frame.pcm.shape == (1920,) and frame.pcm.dtype == np.float32
        # A frame is complete the moment the packet of its last slot arrives.
        assert frame.completed_at == pytest.approx(T0 + (4 * n + 3) * 0.020 + 0.0003, abs=1e-9)
        assert frame.first_arrival == pytest.approx(T0 + 4 * n * 0.020 + 0.0003, abs=1e-9)


def test_a_lost_packet_is_concealed_in_its_place_after_the_jitter_wait() -> None:
    path, frames = run_path(real_stream(100, lose=frozenset({42})), until=2.03)
    stats = path.stats
    assert stats.slots_concealed == 1 and path.jitter.stats.lost == 1
    assert len(frames) == 25
    # Slot 42 was concealed at its deadline (nominal + 40 ms jitter target) in case packet 42 was only
    # reordered, and packet 43 waited for its own deadline before 42 was given up: the frame holding them
    # was 40 ms late, and the frames after it were on time again.
    on_time = [T0 + (4 * n + 3) * 0.020 + 0.0003 for n in range(len(frames))]
    lateness_ms = [(f.completed_at - t) * 1000.0 for f, t in zip(frames, on_time, strict=True)]
    assert lateness_ms[10] == pytest.approx(40.0, abs=1e-6)
    assert all(abs(x) < 1e-6 for n, x in enumerate(lateness_ms) if n != 10)


def test_no_packets_ends_the_call_after_the_media_timeout_but_not_while_held() -> None:
    path, _ = run_path([], until=10.0)
    assert path.timed_out
    held = InboundPath(MediaStats(), now=T0, media_timeout_s=5.0)
    held.pause()
    path, _ = run_path([], until=10.0, path=held)
    assert not path.timed_out


def test_a_stalled_loop_reanchors_instead_of_concealing_a_burst() -> None:
    stats = MediaStats()
    path = InboundPath(stats, now=T0, media_timeout_s=5.0)
    path.remote = SOURCE
    stream = real_stream(60)
    for d in stream[:10]:
        path.on_datagram(d.data, d.addr, d.at)
        path.poll(d.at)
    # The loop stalls for 400 ms: 20 packets wait in the socket, then are read at once.
    late = stream[9].at + 0.400
    for d in stream[10:30]:
        path.on_datagram(d.data, d.addr, late)
    path.poll(late)
    assert stats.slots_concealed == 0  # the grid was re-anchored, not caught up with concealment
    assert path.jitter.depth <= path.jitter.max_packets  # the backlog is bounded by the buffer's maximum


def test_only_the_locked_source_is_heard_unless_learning() -> None:
    stats = MediaStats()
    path = InboundPath(stats, now=T0)
    datagram = real_stream(1)[0]
    assert not path.on_datagram(datagram.data, SOURCE, T0)
    assert stats.rtp_dropped == {"not_locked": 1}
    learning = InboundPath(MediaStats(), now=T0, learn_remote=True)
    first, second = real_stream(2)
    assert not learning.on_datagram(first.data, SOURCE, T0) and learning.remote == SOURCE  # (held)
    assert learning.on_datagram(second.data, SOURCE, T0 + 0.02) and learning.stats.rtp_in == 2
    assert not learning.on_datagram(datagram.data, ("10.0.0.2", 4000), T0)
    assert learning.stats.rtp_dropped == {"foreign_source": 1}


def test_a_new_stream_is_taken_up_without_losing_a_packet() -> None:
    """The far end's SSRC changes (a re-INVITE): the old stream stops, the new one starts; its first packet
    waits for the second to show it is a stream, and both are played."""
    old = real_stream(50)
    new = real_stream(50, ssrc=0x2222, start=T0 + 1.0, first_seq=7000)
    path, frames = run_path(old + new, until=2.03)
    stats = path.stats
    assert stats.ssrc_changes == 1 and path.jitter.stats.resets == 1
    assert stats.rtp_in == 100 and stats.rtp_dropped == {}
    assert stats.slots_concealed <= 2  # (the gap between the two streams' grids)
    assert len(frames) == 25


def test_spoofed_junk_never_resets_the_stream_or_changes_its_audio() -> None:
    """1000 junk datagrams a second from the call's own source (every kind) beside the real stream: the
    frames for the engine are the same samples at the same moments as without it; every junk datagram is
    counted by reason; the call is marked flooded while it lasts, and not after."""
    clean_path, clean = run_path(real_stream(150), until=3.1)
    flood = junk_flood(T0 + 0.5, 2.0, 1000.0)
    path, frames = run_path(real_stream(150) + flood, until=3.1)
    stats = path.stats
    assert stats.ssrc_changes == 0 and path.jitter.stats.resets == 0
    assert stats.rtp_in == 150
    assert len(frames) == len(clean)
    for a, b in zip(frames, clean, strict=True):
        assert np.array_equal(a.pcm, b.pcm) and a.completed_at == b.completed_at
    dropped = stats.rtp_dropped
    assert sum(dropped.values()) == len(flood)
    assert {"payload_type", "ssrc", "truncated", "version", "size"} <= set(dropped)
    assert stats.junk_floods == 1
    assert path.flood_over(T0 + 10.0)  # the budget refills once the junk stops
    assert clean_path.stats.junk_floods == 0


@pytest.mark.parametrize("junk_per_s", [200.0, 2000.0, 10000.0])
def test_a_junk_flood_costs_the_real_audio_at_most_five_ms(junk_per_s: float) -> None:
    """Read the way CallMedia reads (per datagram; once flooded, in batches at flood_poll_at): a flood of
    junk from the call's source delays its frames to the engine by at most FLOOD_POLL_S (5 ms) at the
    99th percentile. (Up to FLOOD_READS / FLOOD_POLL_S datagrams a second; beyond that, the socket buffer
    decides what is lost: the flood benchmark measures it.)"""
    _, clean = run_path(real_stream(250), until=5.1, read_as_callmedia=True)
    flood = junk_flood(T0 + 0.3, 4.5, junk_per_s)
    real = real_stream(250)
    path, frames = run_path(real + flood, until=5.1, read_as_callmedia=True)
    added = [(f.completed_at - c.completed_at) * 1000.0 for f, c in zip(frames, clean, strict=True)]
    assert len(frames) == len(clean)
    assert float(np.percentile(added, 99)) <= FLOOD_POLL_S * 1000.0 + 1e-6
    # (on time, the stream's packets are read just after they are due: about FLOOD_CATCH_S late)
    assert float(np.percentile(added, 50)) <= FLOOD_CATCH_S * 1000.0 + 1e-6
    assert path.stats.ssrc_changes == 0 and path.stats.rtp_in == 250
    assert path.stats.junk_floods == (1 if junk_per_s * 1.0 > JUNK_BURST else 0)


def test_junk_that_comes_first_does_not_become_the_stream() -> None:
    """A spoofed packet of another SSRC arrives before the real stream's first (and keeps coming): the SSRC
    taken up is the one whose packets come in sequence."""
    real = real_stream(50)
    junk = [Datagram(T0 - 0.001 + k * 0.005, build_rtp(RtpPacket(PT_PCMU, 7, 0, 0xBAD, b"\xff" * 160)),
                     real=False) for k in range(200)]
    path, frames = run_path(junk + real, until=1.03)
    assert path.ssrc == 0x1111
    # (the last junk packet came after the stream's last: it is still held as a possible stream)
    assert path.stats.rtp_in == 50 and path.stats.rtp_dropped == {"ssrc": 199}
    assert len(frames) == 12


def _stalled_stream(count: int, stalls: dict[int, int]) -> list[Datagram]:
    """A clean stream but for sender stalls: ``stalls[k] = n`` holds packets k..k+n-1 back until packet k+n
    is sent (they leave together, 5 ms after it)."""
    out = real_stream(count)
    for first, n in stalls.items():
        release = out[first + n].at + 0.005
        for d in out[first : first + n]:
            d.at = release
    return out


def _slot_waits_ms(frames: list[InputFrame]) -> list[float]:
    """Per frame: how long after its last packet arrived it was complete (the wait for its slot)."""
    return [(f.completed_at - f.last_arrival) * 1000.0 for f in frames]


def _stalls_with_jitter() -> list[Datagram]:
    """Two sender stalls later than the 40 ms jitter target (65 ms, then 85 ms), and 3 ms of jitter on every
    other packet: enough that the jitter buffer's shedding (a whole spare packet buffered at every pop for a
    second) never sees the delay the stalls leave."""
    stream = _stalled_stream(400, {100: 3, 200: 4})
    for k, d in enumerate(stream):
        if k % 2 and not (100 <= k < 104 or 200 <= k < 205):
            d.at += 0.003
    return stream


def test_delay_left_by_underruns_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each stall conceals slots and puts the stream later on the grid: the slots are won back (a quiet packet
    # cut, or after 0.5 s the next one), and a frame waits no more than the jitter within a few frames.
    path, frames = run_path(_stalls_with_jitter(), until=7.99)  # (the stream's end would conceal slots)
    waits = _slot_waits_ms(frames)
    assert path.stats.rtp_in_won_back == path.jitter.stats.concealed and path.slots_behind() == 0
    assert max(waits[26:50]) < 4.0 and max(waits[54:]) < 4.0  # (the stalls: frames 25 and 50)

    # Without the win-back, the grid moves earlier by the least wait once a second of packets all waited.
    monkeypatch.setattr("bridge.media.inbound.QUIET_RMS", 0)
    monkeypatch.setattr("bridge.media.inbound.BEHIND_WAIT_S", 10.0**9)
    path, frames = run_path(_stalls_with_jitter(), until=8.1)
    waits = _slot_waits_ms(frames)
    assert path.stats.rtp_in_won_back == 0
    assert max(waits[20:25]) < 1.0 and min(waits[27:47]) > 15.0  # the first stall's delay...
    assert path.stats.rtp_in_rephased >= 2
    assert max(waits[-25:]) < 4.0  # ...and the second's are gone: the last 2 s wait no more than the jitter

    monkeypatch.setattr("bridge.media.inbound.REPHASE_WINDOW", 10**9)  # without either:
    path, frames = run_path(_stalls_with_jitter(), until=8.1)
    assert path.stats.rtp_in_rephased == 0
    assert min(_slot_waits_ms(frames)[-25:]) > 15.0  # every frame waits most of a slot, to the end


def test_the_grid_never_moves_for_packets_that_do_not_wait() -> None:
    # On time, or read late by the I/O layer (a busy loop): played as read, no wait to win back.
    stream = real_stream(300)
    for k, d in enumerate(stream):
        d.at += 0.003 * (k % 2)  # jitter within the slot
    path, _ = run_path(stream, until=5.99)  # (the stream's end would conceal the slots after it)
    assert path.stats.rtp_in_rephased == 0
    assert path.stats.slots_concealed == 0


def test_no_look_at_a_slot_whose_packet_is_not_queued() -> None:
    # The first packet came 3 ms late (the grid is anchored on it), so every later packet arrives before its
    # slot's nominal time. Each is played as it comes; a look at the next slot's early time, with nothing
    # queued for it, would wake the call once per packet for nothing.
    stream = real_stream(200)
    stream[0].at += 0.003
    path = InboundPath(MediaStats(), now=T0, media_timeout_s=5.0)
    path.remote = SOURCE
    empty_looks = played = 0
    for d in stream:
        while path.deadline is not None and path.deadline < d.at:
            now = path.deadline
            frames = path.poll(now)
            if not frames and path.stats.slots_played == played:
                empty_looks += 1
            played = path.stats.slots_played
        path.on_datagram(d.data, d.addr, d.at)
        path.poll(d.at)
        played = path.stats.slots_played
    assert path.stats.rtp_in == 200 and path.stats.slots_concealed == 0
    assert path.stats.slots_played >= 199  # (the last one waits for its slot's time)
    assert empty_looks <= 2  # the start (before the stream is taken up), never per packet


def test_a_packet_queued_ahead_of_its_slot_is_played_at_its_early_time() -> None:
    # Packets 10..13 come in a burst with packet 9. A queued packet is played one ptime ahead of its slot's
    # nominal time (its early time) by the path's own look, with no arrival to trigger it: slot 11 at slot
    # 10's nominal time, which completes the frame of slots 8..11.
    stream = real_stream(40)
    for k in range(10, 14):
        stream[k].at = stream[9].at + 0.0001 * (k - 9)
    path, frames = run_path(stream, until=0.79)
    assert path.stats.slots_concealed == 0
    assert frames[2].completed_at == pytest.approx(T0 + 10 * 0.020 + 0.0003, abs=1e-9)
    assert frames[3].completed_at == pytest.approx(T0 + 15 * 0.020 + 0.0003, abs=1e-9)  # packet 15, on time


TICK = 0.004


def _tick_after(t: float) -> float:
    return math.ceil(t / TICK - 1e-9) * TICK


def run_framed(datagrams: list[Datagram], until: float) -> tuple[InboundPath, list[InputFrame], list[float]]:
    """Read the socket as CallMedia does on a ticking media clock with kernel-stamped arrivals: by readiness
    until the stream has a phase, then once per frame at the phase of the packet that completes it
    (ReadSchedule.expect), waking at the path's frame deadline otherwise. Returns the path, its frames and
    the times it woke up."""
    path = InboundPath(MediaStats(), now=T0, media_timeout_s=5.0)
    path.remote = SOURCE
    reads = ReadSchedule(TICK)
    queue = sorted(datagrams, key=lambda d: d.at)
    pos, now = 0, T0
    frames: list[InputFrame] = []
    wakes: list[float] = []

    def read(at: float) -> float | None:
        nonlocal pos
        newest = None
        while pos < len(queue) and queue[pos].at <= at:
            d = queue[pos]
            pos += 1
            if path.on_datagram(d.data, d.addr, d.at):  # (the kernel's stamp stands for the arrival)
                newest = d.at
        return newest

    while True:
        deadline = (path.frame_deadline() if reads.polled else path.deadline) or float("inf")
        if reads.polled:
            assert reads.next_read_at is not None
            t = _tick_after(min(reads.next_read_at, deadline))
        else:
            arrival = queue[pos].at if pos < len(queue) else float("inf")
            t = min(arrival, _tick_after(deadline))
        if t > T0 + until:
            break
        now = max(now, t)
        wakes.append(now)
        newest: float | None = None
        if not reads.polled:
            newest = read(now)
            if newest is not None:
                reads.on_packets(now, polled_read=False, arrival=newest)
        elif reads.next_read_at is not None and _tick_after(reads.next_read_at) <= now:
            newest = read(now)
            if newest is not None:
                reads.on_packets(now, polled_read=True, arrival=newest)
            else:
                reads.on_empty(now)
        if path.conceal_due(now):
            read(now)
        frames.extend(path.poll(now))
        frame_at = path.frame_arrival_at()
        if newest is not None and frame_at is not None:
            reads.expect(frame_at)
        if path.timed_out:
            break
    return path, frames, wakes


@pytest.mark.parametrize("stream", ["clean", "lost", "jittered", "underrun"])
def test_reading_once_per_frame_gives_the_engine_the_same_frames_within_a_tick(stream: str) -> None:
    rng = random.Random(4)
    if stream == "clean":
        datagrams = real_stream(200)
    elif stream == "lost":
        datagrams = real_stream(200, lose=frozenset({42, 101, 102, 150}))
    elif stream == "jittered":  # every packet up to 12 ms late (within the 40 ms jitter wait: none concealed)
        datagrams = [Datagram(d.at + rng.uniform(0.0, 0.012), d.data) for d in real_stream(200)]
    else:  # packet 42 comes 50 ms late (an underrun: the stream plays a slot later from then on)
        datagrams = real_stream(200)
        datagrams[42] = Datagram(datagrams[42].at + 0.050, datagrams[42].data)
    end = max(d.at for d in datagrams) + TICK  # (until the stream ends: then slots are concealed)
    reference_path, reference = run_path(datagrams, until=end - T0)
    path, frames, wakes = run_framed(datagrams, until=end - T0)
    flowing = [t for t in wakes if t <= end]
    assert len(frames) == len(reference) >= 49
    assert path.stats.slots_concealed == reference_path.stats.slots_concealed
    for got, want in zip(frames, reference, strict=True):
        assert np.array_equal(got.pcm, want.pcm)  # the same audio, in the same frames
        # ...each complete when the tick after its last packet serves it (the reference reads each packet
        # the moment it comes)
        assert 0.0 <= got.completed_at - want.completed_at <= TICK + 1e-9
    # One wake-up per frame (and the stream's first two packets), not one per packet. A read that finds the
    # frame's last packet not there yet looks again each tick; so does one that finds a packet missing, for
    # the 40 ms it may still come in (reordered), and a late packet is played as soon as it is read.
    allowed = {"clean": 50 + 3, "lost": 50 + 3 + 4 * 10, "jittered": 50 * 3, "underrun": 50 + 3 + 20}[stream]
    assert len(flowing) <= allowed


def test_the_frame_deadline_waits_for_the_frames_last_slot_only_with_nothing_queued() -> None:
    path = InboundPath(MediaStats(), now=T0, media_timeout_s=5.0)
    path.remote = SOURCE
    stream = real_stream(12, lose=frozenset({9}))
    for d in stream[:8]:  # two whole frames, popped as their packets come
        path.on_datagram(d.data, d.addr, d.at)
        path.poll(d.at)
    now = stream[7].at
    assert path.slots_to_frame() == 4 and path.jitter.depth == 0
    # The next frame's four packets can wait unread: the look is its last slot's concealment deadline.
    assert path.frame_deadline() == pytest.approx(T0 + 11 * 0.020 + 0.0003 + 0.040, abs=1e-9)
    assert path.deadline == pytest.approx(T0 + 8 * 0.020 + 0.0003 + 0.040, abs=1e-9)
    # Packet 8 read, packet 9 lost, 10 queued: the missing slot's own deadline, as per datagram.
    for d in stream[8:10]:
        path.on_datagram(d.data, d.addr, d.at)
    path.poll(stream[9].at)
    assert path.jitter.depth == 1 and path.slots_to_frame() == 3
    assert path.frame_deadline() == path.deadline
    path.pause()
    path.poll(now)
    assert path.frame_deadline() == path.deadline


def _tone_stream(
    count: int, *, quiet: frozenset[int] = frozenset(), late: dict[int, float]
) -> list[Datagram]:
    """A loud 400 Hz tone (packets in ``quiet`` silent), packet k ``late[k]`` seconds late."""
    sender = RtpSender(PT_PCMU, ssrc=0x2222, initial_sequence=7, initial_timestamp=0)
    t = np.arange(160) / 8000.0
    loud = ulaw_encode((np.sin(2 * np.pi * 400 * t) * 12000).astype(np.int16))
    silent = ulaw_encode(np.zeros(160, dtype=np.int16))
    return [Datagram(T0 + k * 0.020 + 0.0003 + late.get(k, 0.0),
                     sender.next_packet(silent if k in quiet else loud, 160)) for k in range(count)]


def _frame_lateness_ms(frames: list[InputFrame]) -> list[float]:
    """Each frame's completion against the clean stream's (frame n complete when packet 4n + 3 comes)."""
    clean = [T0 + (4 * n + 3) * 0.020 + 0.0003 for n in range(len(frames))]
    return [round((f.completed_at - at) * 1000.0, 3) for f, at in zip(frames, clean, strict=True)]


@pytest.mark.parametrize("quiet_at", [60, None], ids=["quiet-packet", "no-quiet-packet"])
def test_a_slot_an_underrun_put_the_stream_behind_is_won_back(quiet_at: int | None) -> None:
    # Packet 42 comes 50 ms late: slot 42 is concealed while the jitter buffer waits for it, and from then on
    # packet k plays in slot k + 1, its frame complete a packet early: the caller's audio reaches the engine
    # a slot later than it came.
    datagrams = _tone_stream(200, quiet=frozenset({quiet_at} if quiet_at else set()), late={42: 0.050})
    path, frames = run_path(datagrams, until=4.0)
    assert path.jitter.stats.concealed == 1 and path.jitter.stats.lost == 0
    assert path.stats.rtp_in_won_back == 1 and path.slots_behind() == 0
    lateness = _frame_lateness_ms(frames)
    assert lateness[:10] == [0.0] * 10
    assert lateness[10] == 30.0 and lateness[11:15] == [-20.0] * 4  # (the wait; then a packet early)
    # Won back: the silent packet 60 (frame 15), else the next one after 0.5 s behind (in frame 17); the
    # frames after that are the clean stream's again, to the packet (nothing lost but the cut slot).
    settled = 15 if quiet_at else 17
    assert lateness[settled:49] == [0.0] * (49 - settled)
    assert len(frames) >= 49
