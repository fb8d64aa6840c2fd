"""provisioning/gpu-check.sh's verdicts (engine/moshi/gpucheck.py): each target judged from the step
outputs, a missing measurement reported as not run (null), only a measured miss as false."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.moshi.gpucheck import judge, main


def row(slots: int, dtype: str, p50: float, p99: float, kv: str = "auto", adapters: int = 0,
        error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"slots": slots, "dtype": dtype, "kv_dtype": kv, "adapters": adapters, "tick_p50_ms": p50,
            "tick_p99_ms": p99, "device_peak_bytes": 10 << 30, "error": error, **extra}


REPORTS = {
    "bench": {"results": [row(32, "bf16", 30.0, 33.0), row(32, "fp8", 20.0, 24.0),
                          row(64, "fp8", 41.0, 55.0)],
              "summary": {"fp8_vs_bf16_throughput": {"1": 1.1, "32": 1.5}}},
    "capacity": {"results": [row(64, "fp8", 44.0, 58.0, kv="fp8"), row(128, "fp8", 80.0, 95.0, kv="fp8")],
                 "summary": {"fp8_kv_agreement": {"tokens": 0.97}}},
    "adapters": {"results": [], "summary": {"prefix_start_ms_max": 3.2, "adapter_load_ms_max": 120.0,
                                            "adapter_tick_ratio": {"bf16/auto/3/32": 1.08}}},
    "plan": {"slots": 139},
}


def test_targets_met() -> None:
    targets = judge(REPORTS)
    assert targets["tick_32_slots"]["ok"] is True and targets["tick_32_slots"]["dtype"] == "fp8"
    assert targets["p99_64_slots_fp8"] == {"limit_ms": 60.0, "kv_dtype": "auto", "p99_ms": 55.0, "ok": True}
    assert targets["slots_128_fit"]["ok"] is True and targets["slots_128_fit"]["plan_slots"] == 139
    assert targets["fp8_vs_bf16"]["ok"] is True and targets["fp8_vs_bf16"]["at_slots"] == 32
    assert targets["prefix_start"]["ok"] is True and targets["adapter_load"]["ok"] is True


def test_misses_and_absences_are_told_apart() -> None:
    reports = json.loads(json.dumps(REPORTS))
    reports["bench"]["results"][1]["tick_p50_ms"] = 36.0
    reports["bench"]["results"][0]["tick_p50_ms"] = 40.0
    reports["capacity"]["results"][1]["error"] = "OutOfMemoryError: CUDA out of memory"
    reports["bench"]["summary"]["fp8_vs_bf16_throughput"]["32"] = 1.2
    del reports["adapters"]
    targets = judge(reports)
    assert targets["tick_32_slots"]["ok"] is False
    assert targets["slots_128_fit"]["ok"] is False
    assert targets["fp8_vs_bf16"]["ok"] is False
    assert targets["prefix_start"]["ok"] is None and targets["adapter_load"]["ok"] is None
    assert judge({})["tick_32_slots"] == {"ok": None, "detail": "not run"}


def test_main_writes_one_json_with_ok_last(tmp_path: Path, capsys: Any) -> None:
    for name, report in REPORTS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        (tmp_path / f"{name}.rc").write_text('{"rc": 0, "seconds": 1}')
    (tmp_path / "selftest.json").write_text(json.dumps({"ok": True}))
    (tmp_path / "selftest.rc").write_text('{"rc": 0, "seconds": 1}')
    (tmp_path / "plan_h100.json").write_text("{}")
    (tmp_path / "plan_h100.rc").write_text('{"rc": 0, "seconds": 1}')
    assert main(["gpucheck", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[-1] == "ok" and out["ok"] is True
    (tmp_path / "selftest.rc").write_text('{"rc": 1, "seconds": 1}')  # a failed step fails the check
    assert main(["gpucheck", str(tmp_path)]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_selftest_on_cuda() -> None:
    """``pytest -m gpu`` on a GPU machine: the same checks gpu-check.sh's first step runs."""
    from engine.moshi.selftest import run_selftest

    report = run_selftest(device="cuda")
    failed = {run["dtype"]: run.get("error") or {k: v for k, v in run["checks"].items() if not v["ok"]}
              for run in report["runs"] if not run["ok"]}
    assert report["ok"], failed
