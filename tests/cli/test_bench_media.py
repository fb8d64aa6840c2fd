"""``aziza-admin bench media``: the calls are carried end to end (in this process, or on the bridge's own
media workers with --workers) and the JSON report has its keys. Behaviour only: no verdict on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from admin_cli.procs import host_cpu_percent, host_cpu_ticks

KEYS = {"calls_carried", "cpu_percent", "cpu_percent_per_call", "added_latency_p99_ms",
        "pacing_jitter_p99_ms", "output_expanded", "output_shrunk", "round_trip_end_vs_start_ms_max",
        "workers", "rtp_in", "host_steal_percent", "host_idle_percent", "media_scheduling",
        "engine_scheduling"}


@pytest.mark.parametrize(("workers", "window_ms"), [(1, 0), (2, 0), (1, 20)])
def test_bench_media_carries_every_call(workers: int, window_ms: int) -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "aziza-admin"), "bench", "media", "--calls", "3",
         "--seconds", "1.5", "--workers", str(workers), "--engine-window-ms", str(window_ms), "--json",
         *(["--realtime-priority", "0", "--engine-realtime-priority", "0"] if workers > 1 else [])],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert KEYS <= report.keys()
    assert report["calls_carried"] == 3 and report["workers"] == workers
    assert report["engine_window_ms"] == window_ms  # (with a window, the echo engine steps in rounds)
    assert report["rtp_in"] > 3 * 40  # 1.5 s of 20 ms packets per call reached the bridge
    assert report["lost_frames"] == 0
    if workers > 1:  # (its workers were told priority 0; elsewhere the default's, granted or not)
        assert report["media_scheduling"] == report["engine_scheduling"] == "normal"


def test_host_cpu_shares_come_from_two_readings_of_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's CPU by kind between two readings, as shares of the wall time between them (100 = one
    core): at 100 ticks a second, 200 ticks of steal in 5 s read 40."""
    monkeypatch.setattr("admin_cli.procs.os.sysconf", lambda name: 100)
    before = {"user": 100, "nice": 0, "system": 50, "idle": 1000, "iowait": 0, "irq": 0, "softirq": 0,
              "steal": 10}
    after = dict(before, user=400, system=150, idle=1400, steal=210)
    shares = host_cpu_percent(before, after, 5.0)
    assert shares is not None
    assert shares["steal"] == 40.0 and shares["user"] == 60.0 and shares["idle"] == 80.0
    assert shares["system"] == 20.0
    assert host_cpu_percent(before, after, 0.0) is None and host_cpu_percent(None, after, 5.0) is None
    reading = host_cpu_ticks()  # (this machine's own: every kind there, as counts)
    assert reading is None or {"user", "idle", "steal"} <= reading.keys()
