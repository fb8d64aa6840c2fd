"""Combine ``provisioning/gpu-check.sh``'s step outputs into one JSON with the issue's targets judged.

    python -m engine.moshi.gpucheck WORKDIR > gpu-check.json

WORKDIR holds ``<step>.json`` (the step's stdout) and ``<step>.rc`` ({rc, seconds}) for each step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# (name, what, limit): judged from the bench rows; a target whose rows are missing is reported "not run".
TICK_32_MS = 35.0
P99_64_FP8_MS = 60.0
FP8_SPEEDUP = 1.4


def _load(work: Path, name: str) -> tuple[Any, dict[str, Any]]:
    rc_path = work / f"{name}.rc"
    rc = json.loads(rc_path.read_text()) if rc_path.exists() else {"rc": None, "seconds": None}
    out_path = work / f"{name}.json"
    text = out_path.read_text().strip() if out_path.exists() else ""
    try:
        return (json.loads(text.splitlines()[-1]) if text else None), rc
    except ValueError:
        return {"unparsed": text[-2000:]}, rc


def _row(rows: list[dict[str, Any]], dtype: str, slots: int) -> dict[str, Any] | None:
    for r in rows:
        if r.get("dtype") == dtype and r.get("slots") == slots and not r.get("error"):
            return r
    return None


def judge(bench: dict[str, Any] | None) -> dict[str, Any]:
    rows = (bench or {}).get("results", [])
    targets: dict[str, Any] = {}
    best32 = [r for r in (_row(rows, d, 32) for d in ("fp8", "bf16")) if r]
    if best32:
        r = min(best32, key=lambda x: x["tick_p50_ms"])
        targets["tick_32_slots"] = {"limit_ms": TICK_32_MS, "dtype": r["dtype"], "p50_ms": r["tick_p50_ms"],
                                    "p99_ms": r["tick_p99_ms"], "ok": r["tick_p99_ms"] <= TICK_32_MS}
    else:
        targets["tick_32_slots"] = {"ok": None, "detail": "not run"}
    r64 = _row(rows, "fp8", 64)
    targets["p99_64_slots_fp8"] = ({"limit_ms": P99_64_FP8_MS, "p99_ms": r64["tick_p99_ms"],
                                    "ok": r64["tick_p99_ms"] <= P99_64_FP8_MS}
                                   if r64 else {"ok": None, "detail": "not run"})
    ratios = ((bench or {}).get("summary") or {}).get("fp8_vs_bf16_throughput") or {}
    if ratios:
        top = max(ratios, key=int)
        targets["fp8_vs_bf16"] = {"at_slots": int(top), "ratio": ratios[top], "limit": FP8_SPEEDUP,
                                  "ok": ratios[top] >= FP8_SPEEDUP, "all": ratios}
    else:
        targets["fp8_vs_bf16"] = {"ok": None, "detail": "not run"}
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
    selftest, selftest_rc = _load(work, "selftest")
    bench, bench_rc = _load(work, "bench")
    targets = judge(bench if isinstance(bench, dict) else None)
    steps_ok = selftest_rc.get("rc") == 0 and bench_rc.get("rc") == 0
    ok = bool(steps_ok and (selftest or {}).get("ok") and all(t["ok"] is not False for t in targets.values()))
    report = {"environment": environment(), "steps": {"selftest": selftest_rc, "bench": bench_rc},
              "selftest": selftest, "bench": bench, "targets": targets, "ok": ok}
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
