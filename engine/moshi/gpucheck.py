"""Combine ``provisioning/gpu-check.sh``'s step outputs into one JSON with the issue's targets judged.

    python -m engine.moshi.gpucheck WORKDIR > gpu-check.json

WORKDIR holds ``<step>.json`` (the step's stdout) and ``<step>.rc`` ({rc, seconds}) for each step. A target
whose rows are missing is reported with ``"ok": null`` and the reason; only a measured miss is ``false``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STEPS = ("selftest", "bench", "capacity", "adapters", "plan", "plan_h100")
TICK_32_MS = 35.0  # 32 slots
P99_64_FP8_MS = 60.0  # 64 slots, FP8 (H100-class)
SLOTS_ON_H200 = 128
FP8_SPEEDUP = 1.4
PREFIX_START_MS = 10.0
ADAPTER_LOAD_MS = 500.0


def _load(work: Path, name: str) -> tuple[Any, dict[str, Any]]:
    rc_path = work / f"{name}.rc"
    rc = json.loads(rc_path.read_text()) if rc_path.exists() else {"rc": None, "seconds": None}
    out_path = work / f"{name}.json"
    text = out_path.read_text().strip() if out_path.exists() else ""
    try:
        return (json.loads(text.splitlines()[-1]) if text else None), rc
    except ValueError:
        return {"unparsed": text[-2000:]}, rc


def _rows(*reports: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for report in reports:
        if isinstance(report, dict):
            rows += [r for r in report.get("results", []) if isinstance(r, dict)]
    return rows


def _pick(rows: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and all(r.get(k) == v for k, v in want.items())]


def _not_run(why: str = "not run") -> dict[str, Any]:
    return {"ok": None, "detail": why}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def judge(reports: dict[str, Any]) -> dict[str, Any]:
    rows = _rows(reports.get("bench"), reports.get("capacity"), reports.get("adapters"))
    targets: dict[str, Any] = {}
    at32 = _pick(rows, slots=32, adapters=0)
    if at32:
        r = min(at32, key=lambda x: x["tick_p50_ms"])
        targets["tick_32_slots"] = {"limit_ms": TICK_32_MS, "dtype": r["dtype"], "kv_dtype": r["kv_dtype"],
                                    "p50_ms": r["tick_p50_ms"], "p99_ms": r["tick_p99_ms"],
                                    "ok": r["tick_p50_ms"] <= TICK_32_MS}
    else:
        targets["tick_32_slots"] = _not_run()
    at64 = _pick(rows, slots=64, dtype="fp8", adapters=0)
    if at64:
        r = min(at64, key=lambda x: x["tick_p99_ms"])
        targets["p99_64_slots_fp8"] = {"limit_ms": P99_64_FP8_MS, "kv_dtype": r["kv_dtype"],
                                       "p99_ms": r["tick_p99_ms"], "ok": r["tick_p99_ms"] <= P99_64_FP8_MS}
    else:
        targets["p99_64_slots_fp8"] = _not_run()
    capacity = _dict(reports.get("capacity"))
    ran_128 = _pick(rows, slots=SLOTS_ON_H200, dtype="fp8", kv_dtype="fp8")
    tried_128 = [r for r in rows if r.get("slots") == SLOTS_ON_H200]
    plan = _dict(reports.get("plan"))
    if tried_128:
        targets["slots_128_fit"] = {"ran": bool(ran_128), "plan_slots": plan.get("slots"),
                                    "peak_bytes": ran_128[0]["device_peak_bytes"] if ran_128 else None,
                                    "ok": bool(ran_128)}
    else:
        targets["slots_128_fit"] = _not_run()
    summary = _dict(_dict(reports.get("bench")).get("summary"))
    ratios = summary.get("fp8_vs_bf16_throughput") or {}
    if ratios:
        top = max(ratios, key=int)
        targets["fp8_vs_bf16"] = {"at_slots": int(top), "ratio": ratios[top], "limit": FP8_SPEEDUP,
                                  "ok": ratios[top] >= FP8_SPEEDUP, "all": ratios}
    else:
        targets["fp8_vs_bf16"] = _not_run()
    adapters = _dict(_dict(reports.get("adapters")).get("summary"))
    start = adapters.get("prefix_start_ms_max")
    targets["prefix_start"] = ({"limit_ms": PREFIX_START_MS, "ms": start, "ok": start <= PREFIX_START_MS}
                               if start is not None else _not_run())
    load = adapters.get("adapter_load_ms_max")
    targets["adapter_load"] = ({"limit_ms": ADAPTER_LOAD_MS, "ms": load, "ok": load <= ADAPTER_LOAD_MS}
                               if load is not None else _not_run())
    cost = adapters.get("adapter_tick_ratio") or {}
    targets["adapter_tick_ratio"] = {"ratios": cost, "ok": None, "detail": "reported (CPU target: <= 1.3)"}
    agreement = _dict(capacity.get("summary")).get("fp8_kv_agreement")
    targets["fp8_kv_agreement"] = ({"ok": None, **agreement, "detail": "reported"} if agreement
                                   else _not_run())
    return targets


def environment() -> dict[str, Any]:
    try:
        import torch

        env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                       capability=list(torch.cuda.get_device_capability(0)))
        return env
    except Exception as exc:  # the report is still written without it
        return {"error": str(exc)}


def main(argv: list[str]) -> int:
    work = Path(argv[1])
    reports: dict[str, Any] = {}
    steps: dict[str, Any] = {}
    for name in STEPS:
        reports[name], steps[name] = _load(work, name)
    targets = judge(reports)
    steps_ok = all(s.get("rc") == 0 for s in steps.values())
    selftest_ok = bool((reports.get("selftest") or {}).get("ok"))
    ok = steps_ok and selftest_ok and all(t["ok"] is not False for t in targets.values())
    print(json.dumps({"environment": environment(), "steps": steps, **reports, "targets": targets, "ok": ok},
                     indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
