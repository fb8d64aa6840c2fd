"""`aziza-admin demo --json` end to end (in-process echo engine, real UDP), through click's runner."""

from __future__ import annotations

import json
import wave
from pathlib import Path

from click.testing import CliRunner

from admin_cli.main import cli


def test_demo_json(tmp_path: Path) -> None:
    out = tmp_path / "back.wav"
    result = CliRunner().invoke(cli, ["demo", "--json", "--seconds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    for key in ("frames_sent", "frames_received", "lost_frames", "added_latency_p50_ms",
                "added_latency_p99_ms", "pacing_jitter_p99_ms", "output_wav"):
        assert key in data
    assert data["frames_sent"] >= 20  # 2 s = 25 frames of 80 ms
    assert data["frames_received"] >= data["frames_sent"] - 2
    assert data["lost_frames"] == 0
    assert 0 < data["added_latency_p50_ms"] <= data["added_latency_p99_ms"]
    assert data["pacing_jitter_p99_ms"] >= 0
    # The RTP clock is exact, but for slots skipped after a stall of the process (a loaded machine).
    assert data["rtp_timestamp_errors"] == 0 or data["pacer_skipped"] > 0
    assert data["output_wav"] == str(out)
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 8000 and wav.getnframes() > 8000


def test_demo_human_summary_and_bad_engine(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--seconds", "1", "--out", str(tmp_path / "x.wav")])
    assert result.exit_code == 0, result.output
    assert "added latency" in result.output and "wrote" in result.output
    bad = CliRunner().invoke(cli, ["demo", "--engine-url", "ws://127.0.0.1:1/session",
                                   "--out", str(tmp_path / "y.wav")])
    assert bad.exit_code != 0
    assert "demo failed: EngineUnavailable" in bad.output
