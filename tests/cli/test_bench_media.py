"""``aziza-admin bench media``: the calls are carried end to end (in this process, or on the bridge's own
media workers with --workers) and the JSON report has its keys. Behaviour only: no verdict on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {"calls_carried", "cpu_percent", "cpu_percent_per_call", "added_latency_p99_ms",
        "pacing_jitter_p99_ms", "output_expanded", "output_shrunk", "round_trip_end_vs_start_ms_max",
        "workers", "rtp_in"}


@pytest.mark.parametrize(("workers", "window_ms"), [(1, 0), (2, 0), (1, 20)])
def test_bench_media_carries_every_call(workers: int, window_ms: int) -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "aziza-admin"), "bench", "media", "--calls", "3",
         "--seconds", "1.5", "--workers", str(workers), "--engine-window-ms", str(window_ms), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert KEYS <= report.keys()
    assert report["calls_carried"] == 3 and report["workers"] == workers
    assert report["engine_window_ms"] == window_ms  # (with a window, the echo engine steps in rounds)
    assert report["rtp_in"] > 3 * 40  # 1.5 s of 20 ms packets per call reached the bridge
    assert report["lost_frames"] == 0
