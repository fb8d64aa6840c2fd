"""``aziza-admin loadtest`` (issue 14): the report's pure parts on made-up runs, then the real command.

The real runs assert behaviour only (fields present, plots drawn, exit status following the criteria), never
how fast this machine is: the one criterion that must fail is made impossible (an error rate below 0), and
the live run is not asked to pass.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from admin_cli.loadtest import HistogramSnapshot, metrics_url, parse_engine_metrics
from admin_cli.loadtest_legs import SAMPLE_RATE, TAIL_SILENCE_S, caller_turns, load_caller_speech
from admin_cli.loadtest_report import CallResult, RunData, Thresholds, build_report, render_html
from bridge.media.audio_file import AudioFileError

BIN = Path(sys.executable).parent
REPORT_FIELDS = (
    "passed",
    "criteria",
    "calls",
    "calls_ok",
    "errors",
    "error_rate",
    "turns",
    "ttfb_ms",
    "max_stable_concurrency",
    "max_concurrency",
    "added_latency_p99_ms_worst_call",
    "pacing_p99_ms_worst_call",
    "engine",
    "gpu_memory_peak_bytes",
    "gpu",
    "cpu_percent",
    "windows",
    "per_call",
    "series",
    "definitions",
    "interrupted",
    "duration_s",
    "thresholds",
    "config",
)


# -- pure parts ------------------------------------------------------------------------------------------


def _run(
    ttfb_by_call: list[list[float]],
    *,
    wall_s: float = 30.0,
    outcomes: list[str] | None = None,
    unanswered: int = 0,
    calls: int | None = None,
) -> RunData:
    data = RunData(
        config={"calls": calls or len(ttfb_by_call), "via": "rtp"}, started_at="2026-11-30T00:00:00"
    )
    data.wall_s = wall_s
    for i, ttfb in enumerate(ttfb_by_call):
        outcome = outcomes[i] if outcomes else "ok"
        data.calls.append(
            CallResult(
                id=i,
                started_t=0.0,
                ended_t=wall_s,
                outcome=outcome,
                turns=len(ttfb),
                unanswered=unanswered if i == 0 else 0,
                ttfb_ms=ttfb,
            )
        )
        for k, value in enumerate(ttfb):
            data.ttfb_events.append((1.0 + k * wall_s / max(1, len(ttfb)) * 0.9, value))
    data.concurrency = [(float(t), len(ttfb_by_call)) for t in range(int(wall_s))]
    return data


def test_report_passes_when_every_criterion_holds() -> None:
    data = _run([[50.0, 60.0, 70.0]] * 8, wall_s=600.0)
    report = build_report(data, Thresholds(), window_s=10.0)
    assert report["passed"] is True
    assert report["max_stable_concurrency"] == 8
    assert report["ttfb_ms"]["count"] == 24 and report["ttfb_ms"]["p50"] == 60.0
    assert report["error_rate"] == 0.0
    assert {c["name"] for c in report["criteria"]} == {
        "max_stable_concurrency",
        "ttfb_p95_ms",
        "error_rate",
        "duration_minutes",
    }


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"ttfb": 500.0}, "ttfb_p95_ms"),
        ({"outcome": "dropped"}, "error_rate"),
        ({"unanswered": 1}, "error_rate"),
        ({"wall_s": 60.0}, "duration_minutes"),
    ],
)
def test_each_criterion_can_fail(change: dict[str, Any], failing: str) -> None:
    ttfb = change.get("ttfb", 50.0)
    outcomes = ["ok"] * 7 + [change["outcome"]] if "outcome" in change else None
    data = _run(
        [[ttfb] * 3] * 8,
        wall_s=change.get("wall_s", 600.0),
        outcomes=outcomes,
        unanswered=change.get("unanswered", 0),
    )
    report = build_report(data, Thresholds(), window_s=10.0)
    assert report["passed"] is False
    assert failing in [c["name"] for c in report["criteria"] if not c["pass"]]


def test_stable_sessions_target_is_every_call_when_fewer_than_eight() -> None:
    report = build_report(_run([[40.0]] * 2, wall_s=600.0), Thresholds(), window_s=10.0)
    criterion = next(c for c in report["criteria"] if c["name"] == "max_stable_concurrency")
    assert criterion["threshold"] == 2 and criterion["pass"]
    report = build_report(_run([[40.0]] * 2, wall_s=600.0, calls=10), Thresholds(), window_s=10.0)
    assert not next(c for c in report["criteria"] if c["name"] == "max_stable_concurrency")["pass"]


def test_a_window_with_slow_turns_is_not_stable() -> None:
    data = _run([[50.0]] * 4, wall_s=40.0)
    data.ttfb_events.append((25.0, 900.0))
    data.ttfb_events.append((26.0, 900.0))
    report = build_report(data, Thresholds(), window_s=10.0)
    assert report["windows"][0]["stable"] and not report["windows"][2]["stable"]


def test_histogram_quantile_interpolates_like_promql() -> None:
    snap = HistogramSnapshot({0.001: 0.0, 0.002: 50.0, 0.004: 100.0, float("inf"): 100.0}, 0.25, 100.0)
    assert snap.quantile(0.5) == pytest.approx(0.002)
    assert snap.quantile(0.75) == pytest.approx(0.003)
    assert HistogramSnapshot().quantile(0.5) is None
    later = HistogramSnapshot({0.001: 0.0, 0.002: 60.0, 0.004: 200.0, float("inf"): 200.0}, 0.5, 200.0)
    delta = later.minus(snap)
    assert delta.count == 100.0 and delta.quantile(0.1) == pytest.approx(0.002)


def test_engine_metrics_parse() -> None:
    text = (
        "# TYPE aziza_engine_step_seconds histogram\n"
        'aziza_engine_step_seconds_bucket{le="0.01"} 3\naziza_engine_step_seconds_bucket{le="+Inf"} 4\n'
        "aziza_engine_step_seconds_sum 0.05\naziza_engine_step_seconds_count 4\n"
        "# TYPE aziza_engine_batch_size histogram\n"
        'aziza_engine_batch_size_bucket{le="8.0"} 4\naziza_engine_batch_size_bucket{le="+Inf"} 4\n'
        "aziza_engine_batch_size_sum 20\naziza_engine_batch_size_count 4\n"
        "# TYPE aziza_engine_queue_depth gauge\naziza_engine_queue_depth 2\n"
        "# TYPE aziza_engine_gpu_memory_bytes gauge\n"
        'aziza_engine_gpu_memory_bytes{device="0",kind="peak"} 1e9\n'
        'aziza_engine_gpu_memory_bytes{device="0",kind="allocated"} 5e8\n'
    )
    parsed = parse_engine_metrics(text)
    assert parsed.step.count == 4 and parsed.step.buckets[0.01] == 3
    assert parsed.batch.mean == 5.0
    assert parsed.queue_depth == 2
    assert parsed.gpu_memory_bytes == 1e9
    assert parse_engine_metrics("").gpu_memory_bytes is None


def test_metrics_url_for_each_engine_url_form() -> None:
    assert metrics_url("ws://127.0.0.1:8998/session")[0] == "http://127.0.0.1:8998/metrics"
    assert metrics_url("wss://engine:443/session")[0] == "https://engine:443/metrics"
    assert metrics_url("unix:///run/aziza/engine.sock") == (
        "http://localhost/metrics",
        "/run/aziza/engine.sock",
    )


def test_caller_turns_alternate_speech_and_silence() -> None:
    speech = load_caller_speech(None)
    audio = caller_turns(speech, 30.0, seed=3)
    assert len(audio.pcm) == 30 * SAMPLE_RATE
    assert len(audio.turns) >= 4
    for (start, end), (next_start, _) in zip(audio.turns, audio.turns[1:], strict=False):
        assert 1.5 - 1e-9 <= end - start <= 4.0 + 1e-9
        assert 2.0 - 1e-9 <= next_start - end <= 3.5 + 1e-9
        gap = audio.pcm[int(end * SAMPLE_RATE) : int(next_start * SAMPLE_RATE)]
        assert not gap.any()  # the caller listens
    assert not audio.pcm[-int(TAIL_SILENCE_S * SAMPLE_RATE) :].any()
    assert caller_turns(speech, 30.0, seed=3).turns == audio.turns
    assert caller_turns(speech, 30.0, seed=4).turns != audio.turns


def test_caller_audio_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="no such file"):
        load_caller_speech(str(tmp_path / "none.wav"))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioFileError, match="not a readable audio file"):
        load_caller_speech(str(junk))


def test_html_report_holds_the_four_plots_and_the_verdict() -> None:
    data = _run([[50.0, 70.0]] * 3, wall_s=20.0)
    data.ticks = [(2.0, 1.0, 3.0, 3.0), (4.0, 1.2, 2.5, 3.0)]
    page = render_html(build_report(data, Thresholds(min_minutes=0.0), window_s=5.0))
    for plot in ("ttfb_over_time", "ttfb_cdf", "concurrency", "ticks"):
        assert f'data-plot="{plot}"' in page
    assert '<span id="verdict">PASS</span>' in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


# -- the real command --------------------------------------------------------------------------------------


def _admin(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "aziza-admin"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One quick run with an impossible criterion: exit 1 whatever the machine's load, report written."""
    folder = tmp_path_factory.mktemp("loadtest") / "report"
    done = _admin(
        "loadtest",
        "--quick",
        "--calls",
        "2",
        "--seconds",
        "20",
        "--via",
        "rtp",
        "--report",
        str(folder),
        "--max-error-rate",
        "-1",
    )
    return done, folder


def test_quick_run_writes_every_field_and_an_impossible_threshold_exits_1(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, folder = quick_run
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "error_rate" in done.stdout
    report = json.loads((folder / "report.json").read_text())
    for name in REPORT_FIELDS:
        assert name in report, name
    assert report["passed"] is False
    assert report["calls"] == 2
    assert report["turns"] >= 2  # 20 s of turns each: speech, then silence
    assert report["ttfb_ms"]["count"] > 0 and report["ttfb_ms"]["p50"] is not None
    assert report["ttfb_ms"]["p50"] <= report["ttfb_ms"]["p95"] <= report["ttfb_ms"]["p99"]
    assert report["max_concurrency"] == 2
    assert report["engine"]["tick_p50_ms"] is not None and report["engine"]["batch_size_mean"] is not None
    assert report["gpu_memory_peak_bytes"] is None and report["gpu"].startswith("absent")
    assert report["cpu_percent"]["bridge"] is not None and report["cpu_percent"]["engine"] is not None
    assert len(report["per_call"]) == 2
    failing = {c["name"] for c in report["criteria"] if not c["pass"]}
    assert "error_rate" in failing
    assert (folder / "report.html").is_file()


def _png_pixels(path: Path) -> np.ndarray:
    """RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium's screenshots are)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6)
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        else:  # Sub, Average, Paeth depend on the left neighbour: pixel by pixel
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                up, up_left = prev[x], (prev[x - channels] if x >= channels else 0)
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up) // 2
                else:
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                cur[x] = (line[x] + pred) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(height, width, channels)[:, :, :3]


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_headless_chromium_renders_the_plots(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
    tmp_path: Path,
) -> None:
    _, folder = quick_run
    page = (folder / "report.html").resolve()
    base = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot in ("ttfb_over_time", "ttfb_cdf", "concurrency", "ticks"):
        assert f'data-plot="{plot}"' in dom.stdout, plot
    assert dom.stdout.count("<circle") >= 2  # a TTFB point per answered turn
    assert dom.stdout.count('class="series"') >= 3  # CDF, calls up, tick lines
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*base, "--window-size=1400,1800", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = _png_pixels(shot).astype(np.int32)
    # The series colours are painted (#1f77b4 points and lines, #d62728 the p99 tick line and the FAIL
    # verdict): the SVG was drawn, not just parsed.
    blue = np.all(np.abs(pixels - np.array([0x1F, 0x77, 0xB4])) <= 40, axis=2).sum()
    red = np.all(np.abs(pixels - np.array([0xD6, 0x27, 0x28])) <= 40, axis=2).sum()
    assert blue > 500, blue
    assert red > 100, red


def test_unreachable_engine_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    done = _admin(
        "loadtest",
        "--quick",
        "--calls",
        "1",
        "--seconds",
        "5",
        "--report",
        str(tmp_path / "r"),
        "--engine-url",
        f"ws://127.0.0.1:{port}/session",
        timeout=60,
    )
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr


def test_unreadable_audio_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "caller.wav"
    bad.write_text("not audio")
    done = _admin(
        "loadtest",
        "--quick",
        "--seconds",
        "5",
        "--report",
        str(tmp_path / "r"),
        "--audio",
        str(bad),
        timeout=60,
    )
    assert done.returncode == 1
    assert "caller audio" in done.stderr and "not a readable audio file" in done.stderr
    assert "Traceback" not in done.stderr


def test_unwritable_report_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    done = _admin("loadtest", "--quick", "--seconds", "5", "--report", str(blocker / "report"), timeout=60)
    assert done.returncode == 1
    assert "cannot write the report" in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_still_writes_the_report(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    proc = subprocess.Popen(
        [
            str(BIN / "aziza-admin"),
            "loadtest",
            "--quick",
            "--calls",
            "1",
            "--seconds",
            "120",
            "--report",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90  # a hang guard: the first progress line comes once the call is up
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            if "calls up 1/1" in line or not line:
                break
        assert "calls up 1/1" in seen, seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    report = json.loads((folder / "report.json").read_text())
    assert report["interrupted"] is True
    assert report["calls"] == 1 and report["duration_s"] < 120
    assert (folder / "report.html").is_file()


def test_ramp_adds_one_call_per_step(tmp_path: Path) -> None:  # (4 s steps with --quick)
    # A threshold every turn meets keeps every step stable whatever the load: the ramp climbs to --calls.
    folder = tmp_path / "ramp"
    done = _admin("loadtest", "--quick", "--ramp", "--calls", "2", "--seconds", "9", "--max-p95-ms",
                  "100000", "--report", str(folder))
    report = json.loads((folder / "report.json").read_text())
    assert report["config"]["ramp"] is True
    starts = [c["started_t"] for c in report["per_call"]]
    assert len(starts) == 2 and starts == sorted(starts)
    assert all(3.5 <= b - a for a, b in itertools.pairwise(starts))  # one step (4 s) apart or more
    assert report["max_concurrency"] == 2
    counts = [c for _, c in report["series"]["concurrency"]][:-1]  # (the last sample: after the hang-up)
    assert counts == sorted(counts)  # calls only added while it ramps
    assert done.returncode == (0 if report["passed"] else 1)
