"""The process-wide media clock: one timerfd for every call's deadlines, callbacks run in order, a failing
callback does not stop the others, the descriptor is closed with the last user; and two real calls share
one clock end to end."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from bridge.engine_client import EngineSession
from bridge.media.call_media import CallMedia
from bridge.media.media_clock import BEHIND_MEMORY_S, COALESCE_S, MediaClock
from bridge.media.simleg import SimLeg
from tests.media.fixtures import bridge_settings


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_callbacks_run_in_deadline_order_never_early() -> None:
    clock = MediaClock()
    clock.acquire()
    try:
        ran: list[tuple[str, float, float]] = []
        done = asyncio.Event()
        now = time.monotonic()
        plan = {"c": 0.030, "a": 0.010, "b": 0.020, "d": 0.020}
        for name, delay in plan.items():
            clock.call_at(now + delay, lambda n=name, d=now + delay: ran.append((n, d, time.monotonic())))
        clock.call_at(now + 0.040, done.set)
        await asyncio.wait_for(done.wait(), 2.0)
        assert [name for name, _, _ in ran] == ["a", "b", "d", "c"]  # ties in scheduling order
        assert all(at >= deadline - COALESCE_S for _, deadline, at in ran)
    finally:
        clock.release()


async def test_cancelled_callback_never_runs_and_a_failing_one_does_not_stop_others() -> None:
    clock = MediaClock()
    clock.acquire()
    try:
        ran: list[str] = []
        done = asyncio.Event()
        now = time.monotonic()

        def boom() -> None:
            raise RuntimeError("a bug in one call")

        clock.call_at(now + 0.005, boom)
        handle = clock.call_at(now + 0.006, lambda: ran.append("cancelled"))
        clock.call_at(now + 0.007, lambda: ran.append("after"))
        clock.call_at(now + 0.010, done.set)
        handle.cancel()
        await asyncio.wait_for(done.wait(), 2.0)
        assert ran == ["after"]
    finally:
        clock.release()


async def test_run_due_serves_deadlines_from_a_busy_path_without_the_timer() -> None:
    now = [100.0]
    clock = MediaClock(now=lambda: now[0])  # virtual time: the verdict cannot depend on the machine's load
    clock.acquire()
    try:
        ran: list[int] = []
        clock.call_at(100.002, lambda: ran.append(1))
        clock.run_due()
        assert ran == []  # not due yet
        now[0] = 100.003  # the loop is busy with media work: the timerfd is not served...
        clock.run_due()  # ...but the busy path serves what is due
        assert ran == [1]
        assert clock.wakeups == 0
    finally:
        clock.release()


async def test_last_release_closes_the_timerfd_and_drops_pending() -> None:
    before = _open_fds()
    clock = MediaClock()
    clock.acquire()
    clock.acquire()
    ran: list[int] = []
    clock.call_at(time.monotonic() + 0.01, lambda: ran.append(1))
    clock.release()
    assert clock.pending == 1  # one user left: still live
    clock.release()
    assert clock.pending == 0
    assert _open_fds() == before
    await asyncio.sleep(0.03)
    assert ran == []
    clock.release()  # extra releases are harmless
    assert _open_fds() == before


async def test_call_at_without_a_user_is_refused() -> None:
    clock = MediaClock()
    try:
        clock.call_at(time.monotonic(), lambda: None)
    except RuntimeError:
        pass
    else:
        raise AssertionError("call_at before acquire() must fail")


async def test_shared_clock_is_one_per_loop() -> None:
    assert MediaClock.shared() is MediaClock.shared()


async def test_two_calls_share_one_clock_end_to_end(engine_url: str, speech_8k: np.ndarray) -> None:
    clock = MediaClock()
    calls: list[tuple[CallMedia, SimLeg, EngineSession]] = []
    tasks: list[asyncio.Task[str]] = []
    try:
        for i in range(2):
            engine = await EngineSession.open(engine_url, None, f"shared-{i}")
            media = CallMedia(bridge_settings(), engine, f"shared-{i}", media_clock=clock)
            leg = SimLeg(None, speech_8k)
            calls.append((media, leg, engine))
            leg.set_remote(await media.bind())
            media.lock_remote(*(await leg.bind()))
            tasks.append(asyncio.create_task(media.run()))
        await asyncio.gather(*(leg.run(1.5, tail_s=0.3) for _, leg, _ in calls))
        for media, _, _ in calls:
            await media.stop()
        reasons = await asyncio.gather(*tasks)
    finally:
        for media, leg, engine in calls:
            await media.stop()
            leg.close()
            await engine.close()
    assert reasons == ["stopped", "stopped"]
    for media, leg, _ in calls:
        assert media.stats.frames_to_engine >= 10
        assert media.stats.frames_from_engine >= 10
        assert leg.packets_received >= 50  # paced RTP came back on the shared clock
        assert leg.timestamp_errors == 0 or media.stats.rtp_out_skipped > 0  # (a stall skips slots)
    assert clock.callbacks_run > 0
    assert clock.pending == 0  # the last call's release dropped what was left
    for media, _, _ in calls:
        with pytest.raises(RuntimeError):
            _ = media.local_address  # the call's socket is closed


async def test_behind_reports_how_far_the_loop_ran_behind_and_forgets_it() -> None:
    """The clock's timer fires; work already queued on the loop (here: a callback blocking for 40 ms) delays
    what comes after it, and ``behind`` reports at least that wait. (Real time, so only the lower bound,
    which load can only raise.)"""
    clock = MediaClock()
    clock.acquire()
    loop = asyncio.get_running_loop()
    try:
        fired = asyncio.Event()

        def busy() -> None:
            time.sleep(0.040)  # work of the same loop iteration as the clock's timer

        due = time.monotonic() + 0.010
        clock.call_at(due, fired.set)
        loop.call_at(loop.time() + (due - time.monotonic()), busy)
        await fired.wait()
        await asyncio.sleep(0.001)
        assert clock.behind(time.monotonic()) >= 0.025
    finally:
        clock.release()


async def test_behind_is_remembered_for_a_frame_then_forgotten() -> None:
    now = [50.0]
    clock = MediaClock(now=lambda: now[0])
    clock.acquire()
    try:
        assert clock.behind(now[0]) == 0.0  # an idle loop is on time
        clock._note_behind(0.030)
        now[0] += BEHIND_MEMORY_S - 0.001
        assert clock.behind(now[0]) == pytest.approx(0.030)
        clock._note_behind(0.010)  # a smaller lag within the memory does not hide the larger one
        assert clock.behind(now[0]) == pytest.approx(0.030)
        now[0] += BEHIND_MEMORY_S + 0.001
        assert clock.behind(now[0]) == 0.0  # remembered for BEHIND_MEMORY_S, not for good
    finally:
        clock.release()


async def test_with_a_tick_callbacks_run_on_the_tick_they_fall_in() -> None:
    """``tick_s``: a deadline runs at the first tick at or after it (less COALESCE_S), so the calls whose
    deadlines fall between two ticks share one wake-up; never before its tick, on virtual time."""
    now = [100.0]
    clock = MediaClock(now=lambda: now[0])
    clock.acquire(tick_s=0.004)
    try:
        assert clock.tick_s == 0.004
        assert clock.fire_at(100.0011) == pytest.approx(100.004)
        assert clock.fire_at(100.004) == pytest.approx(100.004)
        assert clock.fire_at(100.004 + COALESCE_S / 2) == pytest.approx(100.004)  # within the coalescing
        assert clock.fire_at(100.0045) == pytest.approx(100.008)
        ran: list[str] = []
        clock.call_at(100.0011, lambda: ran.append("a"))
        clock.call_at(100.0035, lambda: ran.append("b"))
        clock.call_at(100.0050, lambda: ran.append("c"))
        now[0] = 100.0036  # past a's and b's deadlines, before their tick
        clock.run_due()
        assert ran == []
        now[0] = 100.00401
        clock.run_due()
        assert ran == ["a", "b"]  # one wake-up for both
        now[0] = 100.0079
        clock.run_due()
        assert ran == ["a", "b"]
        now[0] = 100.008
        clock.run_due()
        assert ran == ["a", "b", "c"]
    finally:
        clock.release()


async def test_the_tick_is_set_by_the_first_user_only() -> None:
    clock = MediaClock()
    clock.acquire(tick_s=0.002)
    clock.acquire(tick_s=0.005)  # a later user does not change the running clock's tick
    try:
        assert clock.tick_s == 0.002
    finally:
        clock.release()
        clock.release()
    clock.acquire()  # (no tick asked: the clock keeps the last one)
    try:
        assert clock.tick_s == 0.002
    finally:
        clock.release()


async def test_calls_and_simulated_legs_have_their_own_clocks() -> None:
    assert MediaClock.shared() is MediaClock.shared("media")
    assert MediaClock.shared("legs") is not MediaClock.shared()


async def test_in_a_tick_the_sends_run_before_the_other_callbacks() -> None:
    """``first`` callbacks (each call's send) of a tick run before its other ones (reads, frames), whatever
    their deadlines within the tick: a read's work must not delay a packet due in the same tick."""
    now = [100.0]
    clock = MediaClock(now=lambda: now[0])
    clock.acquire(tick_s=0.004)
    try:
        ran: list[str] = []
        clock.call_at(100.0005, lambda: ran.append("read a"))
        clock.call_at(100.0030, lambda: ran.append("send b"), first=True)
        clock.call_at(100.0010, lambda: ran.append("read c"))
        clock.call_at(100.0020, lambda: ran.append("send d"), first=True)
        clock.call_at(100.0050, lambda: ran.append("send e (next tick)"), first=True)
        now[0] = 100.004
        clock.run_due()
        assert ran == ["send b", "send d", "read a", "read c"]
        now[0] = 100.008
        clock.run_due()
        assert ran[-1] == "send e (next tick)"
    finally:
        clock.release()
