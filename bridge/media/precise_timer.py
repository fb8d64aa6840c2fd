"""Sub-millisecond wake-ups for the 20 ms RTP pacers, inside asyncio.

asyncio's own timers wait in ``epoll_wait``, whose timeout is rounded *up* to whole milliseconds, so a plain
``asyncio.sleep`` wakes 0–1.3 ms late at random: that alone puts the p99 of |inter-packet interval − 20 ms|
near 1 ms. A Linux ``timerfd`` armed on an absolute CLOCK_MONOTONIC deadline (the clock ``time.monotonic``
and the event loop read) wakes the loop through epoll within tens of microseconds instead. Where timerfd is
not available (not Linux) this falls back to ``asyncio.sleep``.

One :class:`PreciseTimer` per pacing task (single waiter), owned and closed by that task's owner.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys

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


class PreciseTimer:
    """``await timer.sleep_until(deadline)`` on the time.monotonic() scale; call close() when done."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        if _LIBC is not None:
            fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._loop.add_reader(fd, self._on_fire)

    @property
    def precise(self) -> bool:
        """True when backed by a timerfd (False: plain asyncio.sleep, ~1 ms granularity)."""
        return self._fd >= 0

    async def sleep_until(self, deadline: float) -> None:
        if self._fd < 0:
            self._waiter = self._loop.create_future()
            handle = self._loop.call_at(deadline, self.wake)
            try:
                await self._waiter
            finally:
                handle.cancel()
            return
        if deadline <= self._loop.time():
            await asyncio.sleep(0)
            return
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("PreciseTimer has one waiter at a time")
        self._waiter = self._loop.create_future()
        self._deadline = deadline
        sec = int(deadline)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((deadline - sec) * 1e9)))
        assert _LIBC is not None
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            self._loop.call_at(deadline, self.wake)  # timerfd refused: fall back to the loop's own timer
        await self._waiter

    def wake(self) -> None:
        """End the current sleep now (an event the sleeper also waits for, e.g. a packet arrived)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        except OSError:
            pass
        # An expiry armed for an earlier sleep (ended by wake()) must not end this one early.
        if self._loop.time() >= self._deadline - 50e-6:
            self.wake()

    def close(self) -> None:
        """Release the timerfd (idempotent); a pending waiter is cancelled."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._loop.remove_reader(fd)
            os.close(fd)
