"""The media processes' real-time scheduling (bridge.media_realtime_priority, bridge/startup.py): granted, it
is what the kernel reports and the processes they start run normally; refused, the media runs normally and
says why."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from bridge import startup

_PROBE = """
import json, os, subprocess, sys
from bridge.startup import media_scheduling, process_scheduling
got = media_scheduling(3)
report = "import os; from bridge.startup import process_scheduling as p; print(p(os.getpid()))"
child = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, check=True)
print(json.dumps({"got": got, "kernel": process_scheduling(os.getpid()), "child": child.stdout.strip()}))
"""


def test_granted_scheduling_is_the_kernels_and_is_not_inherited() -> None:
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    probe = json.loads(run.stdout)
    assert probe["got"] in ("rr:3", "normal") and probe["got"] == probe["kernel"]
    if probe["got"] == "normal":  # (no privilege here: root, CAP_SYS_NICE or RLIMIT_RTPRIO >= 3)
        assert "SCHED_RR priority 3 refused" in run.stderr
    assert probe["child"] == "normal"  # SCHED_RESET_ON_FORK: what the media process starts runs normally


def test_refused_scheduling_runs_normally_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(startup.os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="bridge.startup"):
        assert startup.media_scheduling(5) == "normal"
    assert "SCHED_RR priority 5 refused" in caplog.text and "Operation not permitted" in caplog.text


def test_priority_zero_leaves_the_scheduling_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(pid: int, policy: int, param: object) -> None:
        raise AssertionError("sched_setscheduler called for priority 0")

    monkeypatch.setattr(startup.os, "sched_setscheduler", forbidden)
    assert startup.media_scheduling(0) == "normal"


def test_another_process_is_given_its_scheduling_by_pid() -> None:
    """(The benchmark's echo engine: a child whose scheduling its parent sets.)"""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        got = startup.media_scheduling(2, child.pid)
        assert got in ("rr:2", "normal") and got == startup.process_scheduling(child.pid)
        assert startup.process_scheduling(os.getpid()) == "normal"  # (this process is left as it was)
    finally:
        child.kill()
        child.wait()
    assert startup.process_scheduling(child.pid) == "unknown"  # (gone)
