"""One process-wide media clock: every call's 20 ms work driven by ONE timerfd, synchronously.

With a sleeping task per direction per call, 50 calls meant ~5000 task wake-ups a second (a future, a
``Task.__step`` and a ``timerfd_settime`` each) and 100 timerfds in epoll; the event loop spent most of its
time scheduling, and a deadline that fell while the loop was busy with a burst of engine frames (the engine
steps all its sessions together, so 50 frames arrive at once) went out up to a burst late.

:class:`MediaClock` is a heap of ``(deadline, callback)`` on the ``time.monotonic`` scale behind one timerfd
armed at the earliest deadline (sub-millisecond wake-ups; ``loop.call_at`` where there is no timerfd). The
callbacks are plain functions run in the timerfd's reader callback: no task switch. Hot paths that do media
work (a datagram batch read, an engine frame received) call :meth:`MediaClock.run_due` first, so a deadline
that falls in the middle of a burst is served between two units of work instead of after the whole burst.

With a tick (``acquire(tick_s)``, the bridge's ``media_tick_ms``), a deadline runs at the first tick at or
after it, less ``COALESCE_S``: the calls whose deadlines fall in one tick share one wake-up, which at 50
calls took the bridge from about 4,100 wake-ups a second to under 1,000, and most of its CPU with them.

Each call keeps its own grid and schedules its own deadlines; the clock only orders and fires them. A
callback that raises is logged and dropped: one call's bug never stops the others' clocks (CallMedia also
guards its callbacks so the failing call ends). The timerfd is opened by the first :meth:`acquire` and closed
by the last :meth:`release`, so no descriptor outlives the calls that used it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import heapq
import itertools
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

# -- Linux timerfd through ctypes: asyncio's own timers round epoll timeouts up to whole milliseconds and wake
# 0-1.3 ms late, which alone breaks a 1 ms pacing p99; a timerfd armed on an absolute CLOCK_MONOTONIC
# deadline (the clock time.monotonic reads) wakes the loop through epoll within tens of microseconds.

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p,
        ]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def open_timerfd() -> int:
    """A non-blocking CLOCK_MONOTONIC timerfd, or -1 where there is none (not Linux); the caller closes it."""
    if _LIBC is None:
        return -1
    fd = int(_LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
    return fd if fd >= 0 else -1


_SPEC = _Itimerspec()  # reused: arm_timerfd runs on the event loop's thread only
_SPEC_REF = ctypes.byref(_SPEC)
_SETTIME = _LIBC.timerfd_settime if _LIBC is not None else None


def arm_timerfd(fd: int, deadline: float) -> bool:
    """Arm ``fd`` to expire once at ``deadline`` (time.monotonic scale); False if the kernel refused."""
    if _SETTIME is None or fd < 0:
        return False
    deadline = max(deadline, 1e-6)  # an all-zero it_value would disarm the timer instead
    sec = int(deadline)
    value = _SPEC.it_value
    value.tv_sec = sec
    value.tv_nsec = int((deadline - sec) * 1e9)
    return bool(_SETTIME(fd, _TFD_TIMER_ABSTIME, _SPEC_REF, None) == 0)



# A deadline this close ahead is served now rather than arming the timer for it: with many calls, the sends
# of those whose ticks fall within it share one wake-up (each costs an epoll round, a read and a re-arm), for
# at most this much of pacing error.
COALESCE_S = 200e-6
BEHIND_MEMORY_S = 0.080  # a lag is remembered this long (a frame's worth: what arrives just after it is late)


class ClockHandle:
    """One scheduled callback; cancel() makes it never run."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


_Clocks = dict[str, "MediaClock"]
_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clocks] = weakref.WeakKeyDictionary()


class MediaClock:
    """See the module docstring. One per event loop: :meth:`shared` gives the running loop's."""

    def __init__(self, now: Callable[[], float] = time.monotonic, *, tick_s: float = 0.0) -> None:
        self._now = now  # time.monotonic; tests give a virtual clock
        self.tick_s = tick_s
        # (when it runs: fire_at(deadline), 0 for a "first" callback else 1, scheduling order, handle)
        self._heap: list[tuple[float, int, int, ClockHandle]] = []
        self._order = itertools.count()  # ties broken by scheduling order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._armed_fire: float | None = None  # the heap key (fire time) the timer is armed for
        self._fallback: asyncio.TimerHandle | None = None
        self._users = 0
        self._in_run = False
        self.wakeups = 0  # timer expiries served (for benchmarks)
        self.callbacks_run = 0
        # How far behind the event loop last ran, and when. The clock's own callbacks are served between
        # units of work, so they stay on time while tasks (the engine sockets' readers) queue up behind a
        # burst: a probe queued with call_soon when the timer fires runs after what is queued, and its wait
        # measures that queue. (A timer of its own, every 10 ms, woke an idle loop for nothing and bent
        # single-call pacing.)
        self._behind_s = 0.0
        self._behind_at = -float("inf")
        self._probe_queued = False

    @classmethod
    def shared(cls, name: str = "media") -> MediaClock:
        """The running event loop's clock of that name (created on first use). The calls share "media"; the
        simulated far ends have their own, so that they keep their own timing, as Asterisk does."""
        clocks = _shared.setdefault(asyncio.get_running_loop(), {})
        clock = clocks.get(name)
        if clock is None:
            clock = clocks[name] = cls()
        return clock

    # -- users -------------------------------------------------------------------------------------------

    def acquire(self, tick_s: float | None = None) -> None:
        """A call starts using the clock (opens the timerfd on the first one). ``tick_s``: the clock's tick,
        set by its first user (every call of a process has the same settings)."""
        loop = asyncio.get_running_loop()
        if tick_s is not None and self._users == 0:
            self.tick_s = tick_s
        if self._loop is not None and self._loop is not loop:
            if self._users:
                raise RuntimeError("MediaClock is in use by another event loop")
            self._loop = None
        if self._loop is None:
            self._loop = loop
        if self._fd < 0:
            self._fd = open_timerfd()
            if self._fd >= 0:
                loop.add_reader(self._fd, self._on_fire)
        self._users += 1

    def release(self) -> None:
        """A call is done with the clock; the last one closes the timerfd and forgets pending callbacks."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            self.close()
            self._loop = None  # (the shared registry holds clocks weakly by loop: don't keep the loop alive)

    def close(self) -> None:
        """Close the timerfd and drop every pending callback (idempotent)."""
        self._heap.clear()
        self._armed_fire = None
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)

    @property
    def pending(self) -> int:
        """Scheduled callbacks not yet run (cancelled ones included until they reach the front)."""
        return len(self._heap)

    # -- scheduling --------------------------------------------------------------------------------------

    def call_at(self, deadline: float, callback: Callable[[], None], *, first: bool = False) -> ClockHandle:
        """Run ``callback()`` at ``deadline`` (time.monotonic scale), from the event loop's thread. ``first``:
        before the other callbacks that run in the same tick (a call's send: the work of the reads and frames
        of that tick must not come before it, or its packet leaves later by however much there is)."""
        if self._loop is None:
            raise RuntimeError("MediaClock.call_at before acquire()")
        handle = ClockHandle(deadline, callback)
        fire = self.fire_at(deadline)
        heapq.heappush(self._heap, (fire, 0 if first else 1, next(self._order), handle))
        armed = self._armed_fire
        if not self._in_run and (armed is None or fire < armed):
            self._arm(fire)
        return handle

    def fire_at(self, deadline: float) -> float:
        """When a callback for ``deadline`` runs: COALESCE_S before it, or with a tick, the first tick from
        then."""
        at = deadline - COALESCE_S
        tick = self.tick_s
        if tick:
            at = math.ceil(at / tick - 1e-9) * tick
        return at

    def run_due(self) -> None:
        """Run every callback whose deadline has come; cheap when none has. Re-entrant calls are no-ops."""
        heap = self._heap
        if self._in_run or not heap or heap[0][0] > self._now():
            return
        self._in_run = True
        try:
            while heap:
                fire, _, _, handle = heap[0]
                if handle.cancelled:
                    heapq.heappop(heap)
                    continue
                if fire > self._now():
                    break
                heapq.heappop(heap)
                self.callbacks_run += 1
                try:
                    handle.callback()
                except Exception:  # one call's bug must not stop every call's clock
                    log.exception("media clock callback failed")
        finally:
            self._in_run = False
        while heap and heap[0][3].cancelled:
            heapq.heappop(heap)
        if heap:
            if heap[0][0] != self._armed_fire:
                self._arm(heap[0][0])
        else:
            self._armed_fire = None

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (time.monotonic scale) on this clock (acquire() it first)."""
        if deadline <= self._now():
            await asyncio.sleep(0)
            return
        assert self._loop is not None
        woken: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        handle = self.call_at(deadline, wake)
        try:
            await woken
        finally:
            handle.cancel()

    def behind(self, now: float) -> float:
        """The worst lag (seconds) the event loop ran with in the last ``BEHIND_MEMORY_S`` before ``now`` (on
        the ``time.monotonic`` scale). A message handled while the loop runs this far behind was received
        late by this process, whenever it was sent."""
        return self._behind_s if now - self._behind_at <= BEHIND_MEMORY_S else 0.0

    def _queue_probe(self) -> None:
        if not self._probe_queued and self._loop is not None and not self._loop.is_closed():
            self._probe_queued = True
            self._loop.call_soon(self._on_probe, self._now())

    def _on_probe(self, queued_at: float) -> None:
        self._probe_queued = False
        self._note_behind(self._now() - queued_at)

    def _note_behind(self, lag: float) -> None:
        at = self._now()
        if lag >= self._behind_s or at - self._behind_at > BEHIND_MEMORY_S:
            self._behind_s, self._behind_at = max(lag, 0.0), at

    def _timer_at(self, fire: float) -> float:
        """When the timer wakes the loop for callbacks that run at ``fire``: the tick itself, or with no tick
        the deadline (a wake-up COALESCE_S early would only be one more)."""
        return fire if self.tick_s else fire + COALESCE_S

    def _arm(self, fire: float) -> None:
        self._armed_fire = fire
        at = self._timer_at(fire)
        if self._fd >= 0 and arm_timerfd(self._fd, at):
            return
        if self._loop is None:
            return
        if self._fallback is not None:  # no timerfd (or it refused): the loop's own, coarser timer
            self._fallback.cancel()
        self._fallback = self._loop.call_at(at, self._on_fallback)

    def _on_fallback(self) -> None:
        self._fallback = None
        self._armed_fire = None
        self.wakeups += 1
        self.run_due()
        if self._heap and self._armed_fire is None:
            self._arm(self._heap[0][0])

    def _on_fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        except OSError:
            pass
        self.wakeups += 1
        armed, self._armed_fire = self._armed_fire, None  # the expiry is spent: run_due re-arms for the rest
        if armed is not None:  # the timer itself served late: the loop was blocked or busy until now
            self._note_behind(self._now() - self._timer_at(armed))
        self._queue_probe()
        self.run_due()
        if self._heap and self._armed_fire is None:
            self._arm(self._heap[0][0])


__all__ = ["COALESCE_S", "ClockHandle", "MediaClock"]
