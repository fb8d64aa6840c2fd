"""Linux timerfd through ctypes, for the media clock (media_clock.py).

asyncio's own timers round epoll timeouts up to whole milliseconds and wake 0-1.3 ms late, which alone breaks
a 1 ms pacing p99; a timerfd armed on an absolute CLOCK_MONOTONIC deadline (the clock time.monotonic reads)
wakes the loop through epoll within tens of microseconds. (A module of its own: media_clock.py is compiled
by mypyc, which does not compile ctypes structures.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


__all__ = ["arm_timerfd", "open_timerfd"]
