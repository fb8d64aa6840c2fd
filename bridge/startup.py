"""Process start-up helpers shared by aziza-bridge, aziza-engine and the benchmarks."""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Call once the process has started up (imports, settings, pools): moves every object alive now out of
    the garbage collector's reach (``gc.freeze``). Full collections otherwise walk the whole startup heap
    (hundreds of thousands of objects: torch, pydantic, aiohttp, numpy...) and stop the event loop for tens
    of ms, which the far end hears as RTP pacing jitter. Measured with
    ``aziza-admin bench media --calls 50``."""
    gc.collect()
    gc.freeze()


def media_scheduling(priority: int, pid: int = 0) -> str:
    """Run this thread (a media process's event loop), or process ``pid``'s main thread, under ``SCHED_RR``
    at ``priority`` (1–99; 0 leaves the scheduling as it is), as Asterisk's ``-p`` does for its own; returns
    what it runs under: ``"rr:5"``, or ``"normal"`` (off, or refused: a warning says why).

    Why: on a box shared with other busy processes (the engine, Asterisk, the benchmark's callers), the media
    loop's timer wakes it on time but the kernel runs it only when the task on its CPU yields; measured with
    ``aziza-admin bench media --calls 200`` on 2 vCPUs, ticks came 1.7–4 ms late a few times a second (every
    call's packet of that tick off the grid at once: pacing p99 up to 1.95 ms). A real-time task preempts
    them at once. ``SCHED_RESET_ON_FORK``: processes it starts run normally. The kernel's real-time
    throttling (``sched_rt_runtime_us``, 95 % by default) leaves the rest of the box its share if the media
    loop ever spins. Allowed to root, ``CAP_SYS_NICE``, or up to ``RLIMIT_RTPRIO`` (systemd
    ``LimitRTPRIO=``, which the bridge's unit sets)."""
    if priority <= 0:
        return "normal"
    try:
        os.sched_setscheduler(pid, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except (AttributeError, OSError) as exc:  # (not Linux; EPERM: no privilege, or RLIMIT_RTPRIO below it)
        log.warning("media scheduling: SCHED_RR priority %d refused (%s): %s runs at normal priority, and "
                    "its timing may suffer beside busy processes (docs/configuration.md)", priority, exc,
                    f"process {pid}" if pid else "the media")
        return "normal"
    return f"rr:{priority}"


def process_scheduling(pid: int) -> str:
    """What process ``pid`` runs under, in :func:`media_scheduling`'s terms (``"unknown"`` if it is gone)."""
    try:
        policy = os.sched_getscheduler(pid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
        if policy in (getattr(os, "SCHED_RR", -1), getattr(os, "SCHED_FIFO", -1)):
            kind = "rr" if policy == os.SCHED_RR else "fifo"
            return f"{kind}:{os.sched_getparam(pid).sched_priority}"
    except (AttributeError, OSError):
        return "unknown"
    return "normal"
