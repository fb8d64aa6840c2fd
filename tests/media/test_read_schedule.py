"""When a polled call's RTP socket is read (bridge/media/read_schedule.py), on scripted arrivals and virtual
time: the reads follow the stream's phase on the tick grid, at about one read per packet; a packet waits in
the socket at most a tick once the phase is learnt; a phase that moves earlier or later is followed; a stream
that stops sends the call back to readiness."""

from __future__ import annotations

import math

import pytest

from bridge.media.read_schedule import GIVE_UP_S, PROBE_EVERY, ReadSchedule

TICK = 0.004
PTIME = 0.020


def _tick_after(t: float) -> float:
    return math.ceil(t / TICK - 1e-9) * TICK


class _Socket:
    """Arrival times of a stream's packets; read() takes every one that has arrived by then."""

    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = sorted(arrivals)
        self.taken = 0

    def read(self, now: float) -> list[float]:
        got = []
        while self.taken < len(self.arrivals) and self.arrivals[self.taken] <= now:
            got.append(self.arrivals[self.taken])
            self.taken += 1
        return got


def _run(
    arrivals: list[float], until: float, serve_late_s: float = 0.0
) -> tuple[ReadSchedule, list[float], int]:
    """Drive a schedule as CallMedia does: readiness while waiting, else reads at its ticks (served
    ``serve_late_s`` after the tick, as a loop does). Returns it, each packet's wait in the socket and the
    number of reads."""
    sock = _Socket(arrivals)
    schedule = ReadSchedule(TICK)
    waits: list[float] = []
    reads = 0
    now = 0.0
    while now < until:
        if schedule.polled:
            assert schedule.next_read_at is not None
            now = _tick_after(schedule.next_read_at) + serve_late_s
            if now >= until:
                break
            reads += 1
            got = sock.read(now)
            if got:
                schedule.on_packets(now, polled_read=True)
            else:
                schedule.on_empty(now)
        else:
            if sock.taken >= len(sock.arrivals):
                break
            now = sock.arrivals[sock.taken]  # readiness: read the moment it comes
            reads += 1
            got = sock.read(now)
            schedule.on_packets(now, polled_read=False)
        waits.extend(now - a for a in got)
    return schedule, waits, reads


def test_a_steady_stream_is_read_once_per_packet_within_a_tick() -> None:
    arrivals = [0.0013 + k * PTIME for k in range(500)]  # 10 s at a phase between two ticks
    schedule, waits, reads = _run(arrivals, 10.0)
    assert len(waits) == 500
    assert max(waits) <= TICK + 1e-9  # each packet waited at most a tick
    # One read per packet, plus the probe a tick early every PROBE_EVERY packets (which finds nothing).
    assert reads <= 500 * (1 + 1.2 / PROBE_EVERY)
    assert schedule.polled and schedule.gave_up == 0


def test_reads_served_late_by_the_loop_do_not_drift_the_phase() -> None:
    arrivals = [0.0013 + k * PTIME for k in range(500)]
    _, waits, _ = _run(arrivals, 10.0, serve_late_s=0.0003)  # each tick served 0.3 ms late
    assert max(waits) <= TICK + 0.0003 + 1e-9


def test_a_stream_whose_phase_moves_earlier_is_followed_within_a_few_probes() -> None:
    # Packets come 10 ms earlier from packet 100 on (a re-bridged channel, a new timing source).
    arrivals = [0.0113 + k * PTIME - (0.010 if k >= 100 else 0.0) for k in range(500)]
    _, waits, _ = _run(arrivals, 10.0)
    late_waits = waits[100 + 4 * PROBE_EVERY:]  # 10 ms is 2.5 ticks: three probes
    assert max(late_waits) <= TICK + 1e-9
    assert max(waits[100:]) <= 0.010 + TICK + 1e-9  # meanwhile no more than the move itself


def test_a_packet_later_than_its_read_is_read_on_the_next_tick() -> None:
    arrivals = [0.0013 + k * PTIME for k in range(100)]
    arrivals[50] += 0.009  # 9 ms late (jitter): the reads after its expected time find nothing, then it
    schedule, waits, _ = _run(arrivals, 2.0)
    assert schedule.misses >= 2
    assert max(waits) <= TICK + 1e-9  # it too was read within a tick of coming
    assert schedule.gave_up == 0


def test_a_stopped_stream_goes_back_to_readiness_and_its_return_is_read_at_once() -> None:
    arrivals = [0.0013 + k * PTIME for k in range(50)] + [3.0007 + k * PTIME for k in range(50)]
    schedule, waits, reads = _run(arrivals, 4.0)  # (ends before the give-up after the last packet)
    assert schedule.gave_up == 1
    assert len(waits) == 100
    assert waits[50] == 0.0  # the first packet after the gap: read by readiness, the moment it came
    assert max(waits) <= TICK + 1e-9
    # Polling a silent socket stopped after GIVE_UP_S: a few reads, not one per tick for 3 s.
    assert reads <= 100 * (1 + 1.2 / PROBE_EVERY) + GIVE_UP_S / TICK + 2


def test_tick_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReadSchedule(0.0)


def test_a_stamped_read_sets_the_phase_from_the_arrival_and_the_input_can_move_the_next_read() -> None:
    schedule = ReadSchedule(TICK)
    schedule.expect(1.0)  # (nothing before the stream has a phase)
    assert schedule.next_read_at is None
    # Read 7 ms after it came (a busy loop): the stamp, not the read, is the phase.
    schedule.on_packets(0.0213 + 0.007, polled_read=True, arrival=0.0213)
    assert schedule.polled and schedule.next_read_at == pytest.approx(_tick_after(0.0213) + PTIME)
    # The input needs the packet three slots later first: one read for the frame, not three.
    schedule.expect(0.0813)
    assert schedule.next_read_at == 0.0813
    schedule.on_empty(0.084)  # not there yet: the next tick, as for a read per packet
    assert schedule.next_read_at == pytest.approx(0.088)
