"""Child processes of the benchmarks and the load test: their CPU time, and ending them on every path."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far; None where /proc does not say."""
    split = proc_cpu_split_s(pid)
    return None if split is None else split[0] + split[1]


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live child processes (the bridge and its media workers)."""
    own = proc_cpu_s(pid)
    if own is None:
        return None
    return own + sum(proc_cpu_s(child) or 0.0 for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            children.append(int(stat.parent.name))
    return children


def proc_cpu_split_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds process ``pid`` has used so far; None where /proc does not say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def host_cpu_ticks() -> dict[str, int] | None:
    """The machine's CPU time so far by kind, in clock ticks over all CPUs (/proc/stat's ``cpu`` line); None
    where /proc does not say."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {name: int(value) for name, value in zip(names, first[1:], strict=False)}


def host_cpu_percent(
    before: dict[str, int] | None, after: dict[str, int] | None, wall_s: float
) -> dict[str, float] | None:
    """Between two :func:`host_cpu_ticks` readings ``wall_s`` apart: each kind's time as a share of that wall
    time, 100 = one core. ``steal`` is the time a virtual machine's CPUs were runnable but the hypervisor
    ran something else: while it is high, a process is stopped for milliseconds whatever its own load, and
    pacing shows it. (Against the wall clock, not the ticks' sum: on a virtual machine seen here, a third of
    the user and system ticks of a bursty load went uncounted, while idle and steal, which the kernel
    measures rather than samples, added up with the processes' own CPU time.)"""
    if before is None or after is None or wall_s <= 0:
        return None
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    return {name: round(100.0 * (after[name] - before.get(name, 0)) / (wall_s * ticks_per_s), 1)
            for name in after}


async def end_process(proc: asyncio.subprocess.Process | None, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; reaped either way (no zombie, no pipe left open)."""
    if proc is None or proc.returncode is not None:
        return
    proc.terminate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace_s)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
