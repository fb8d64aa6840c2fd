"""``aziza-admin loadtest --via sip`` against the real appliance: SIPp calls through Asterisk into the bridge
and the echo engine, the numbers read from the bridge's and the engine's /metrics.

The verdict (exit status) is not asserted: TTFB on a loaded machine may pass 120 ms. What is asserted are
facts of the run: both calls answered and kept to their end, turns counted, TTFB measured, both calls up
together."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.asterisk.appliance import BIN, DID_MAIN, SLOTS, Appliance, wait_for

pytestmark = pytest.mark.asterisk


async def test_loadtest_via_sip_quick(app: Appliance, tmp_path: Path) -> None:
    assert SLOTS >= 2
    report_dir = tmp_path / "report"
    args = [
        str(BIN / "aziza-admin"), "loadtest", "--via", "sip", "--quick", "--calls", "2", "--seconds", "20",
        "--report", str(report_dir), "--did", DID_MAIN, "--sip-target", f"127.0.0.1:{app.ports['sip']}",
        "--bridge-url", f"http://127.0.0.1:{app.ports['bridge_http']}", "--json",
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, args, env=app.env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: a criterion failed (machine load)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert (report_dir / "report.html").exists()
    detail = json.dumps({k: report[k] for k in ("per_call", "errors", "config", "cpu_percent")}, indent=1)
    assert report["calls"] == 2 and report["calls_ok"] == 2, detail
    assert report["errors"]["refused"] == report["errors"]["dropped"] == 0, detail
    assert report["turns"] > 0, detail
    ttfb = report["ttfb_ms"]
    assert ttfb["count"] > 0 and None not in (ttfb["p50"], ttfb["p95"], ttfb["p99"]), detail
    assert 0 < ttfb["p50"] <= ttfb["p95"] <= ttfb["p99"], ttfb
    assert report["max_concurrency"] == 2, report["series"]["concurrency"]
    assert report["interrupted"] is False
    assert report["config"]["via"] == "sip" and "bucket" in report["config"]["ttfb_source"]
    # The engine and the bridge run on this machine: their CPU was found and measured.
    assert report["cpu_percent"]["bridge"] is not None and report["cpu_percent"]["engine"] is not None, detail
    assert report["series"]["ticks"], "no engine tick intervals scraped"
    assert report["engine"]["tick_p50_ms"] is not None


async def test_ctrl_c_hangs_up_and_still_writes_the_report(app: Appliance, tmp_path: Path) -> None:
    """SIGINT mid-run: the calls are hung up through the bridge (the ``app`` fixture then finds no call,
    channel or bridge left), the exit status is 130 and the report holds what was measured."""
    report_dir = tmp_path / "report"
    args = [
        str(BIN / "aziza-admin"), "loadtest", "--via", "sip", "--quick", "--calls", "2", "--seconds", "120",
        "--report", str(report_dir), "--did", DID_MAIN, "--sip-target", f"127.0.0.1:{app.ports['sip']}",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, env=app.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:

        def both_up() -> bool:
            return len(app.live_calls()) == 2

        await asyncio.to_thread(wait_for, both_up, 60, "both load test calls live in the bridge")
        await asyncio.sleep(8)  # a few turns
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, out.decode() + err.decode()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["interrupted"] is True and report["calls"] == 2
    assert report["calls_ok"] == 2, report["per_call"]  # ended by the stop: no error
    assert report["duration_s"] < 100 and report["turns"] > 0
