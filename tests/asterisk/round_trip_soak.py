"""Issue 12's round-trip check on the real appliance (a tool, not a test): N SIPp calls of S seconds
through the real Asterisk, the bridge (its media workers) and the echo engine; each call's round trip inside
the bridge at its end against its start, from its call record.

    .venv/bin/python -m tests.asterisk.round_trip_soak --calls 20 --seconds 60 [--engine-window-ms 20]

Needs what the ``asterisk`` test group needs (the cached Asterisk build, SIPp, root) and PostgreSQL/Redis as
the suite uses them (``AZIZA_TEST_PG_ADMIN_URL``). It builds the test appliance with room for the calls:
``capacity.slots`` = calls, and 6 Asterisk RTP ports per call (each call holds two RTP instances of an
even/odd pair; Asterisk 22.10.1 died when its range ran out). Prints one JSON object: per call
``round_trip_end_vs_start_ms``, and how many are within ±5 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from admin_cli.procs import host_cpu_percent, host_cpu_ticks
from tests.asterisk import appliance as ap


def _widen(app: ap.Appliance, calls: int) -> None:
    """Room for ``calls`` calls: slots, the engine's slots, Asterisk's and the bridge's RTP ranges."""
    config = Path(app.env["AZIZA_CONFIG"])
    text = config.read_text()
    base = app.ports["ast_rtp_min"]
    ast_ports = max(50, 6 * calls)
    bridge_ports = max(50, 4 * calls)
    if base + ast_ports + bridge_ports > 65535:
        base = 20000
    app.ports.update(ast_rtp_min=base, ast_rtp_max=base + ast_ports - 1,
                     bridge_rtp_min=base + ast_ports, bridge_rtp_max=base + ast_ports + bridge_ports - 1)
    p = app.ports
    text = re.sub(r"(?m)^slots = \d+$", f"slots = {calls}", text)
    for key in ("rtp_port_min", "rtp_port_max"):
        text = re.sub(rf"(?m)^{key} = \d+$", "@@" + key, text)
    # (the [bridge] table comes first in the file, then [asterisk])
    text = text.replace("@@rtp_port_min", f"rtp_port_min = {p['bridge_rtp_min']}", 1)
    text = text.replace("@@rtp_port_max", f"rtp_port_max = {p['bridge_rtp_max']}", 1)
    text = text.replace("@@rtp_port_min", f"rtp_port_min = {p['ast_rtp_min']}", 1)
    text = text.replace("@@rtp_port_max", f"rtp_port_max = {p['ast_rtp_max']}", 1)
    config.write_text(text)


_MOVES = ("rtp_in_rephased", "rtp_in_won_back",
          "slots_concealed", "underruns", "lost", "late", "rtp_out_expanded", "rtp_out_shrunk",
          "rtp_out_kept", "rtp_out_resyncs", "rtp_out_waited", "margins_unobserved", "engine_frames_lost")


def _find(obj: object, key: str) -> float | None:
    """The first value under ``key`` anywhere in a call record (its latency summary holds the media's)."""
    values: list[object]
    if isinstance(obj, dict):
        if isinstance(obj.get(key), int | float):
            return float(obj[key])
        values = list(obj.values())
    elif isinstance(obj, list):
        values = obj
    else:
        return None
    for value in values:
        found = _find(value, key)
        if found is not None:
            return found
    return None


def _engine_counter(app: ap.Appliance, name: str) -> float | None:
    """One counter of the engine's /metrics (None: not there, or no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.ports['engine']}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _sample(app: ap.Appliance, started: float, samples: dict[str, list[tuple[float, float]]],
            stop: threading.Event) -> None:
    """Every live call's current round trip (its live hash's latency_ms: the median of its last 2 s)."""
    while not stop.wait(0.5):
        try:
            calls = app.live_calls()
        except Exception:  # (a soak tool: a missed sample is a gap, not a failure)
            continue
        at = round(time.time() - started, 1)
        for call in calls:
            latency = call.get("latency_ms")
            if isinstance(latency, int | float):
                samples.setdefault(str(call.get("call_id")), []).append((at, float(latency)))


def _steps(samples: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per call whose round trip moved by more than 5 ms: each sample where it moved by more than 5 ms from
    the previous level (time from the soak's start, new round trip)."""
    out = {}
    for call, series in samples.items():
        level = series[0][1] if series else 0.0
        steps = []
        for at, value in series:
            if abs(value - level) > 5.0:
                steps.append((at, round(value, 1)))
                level = value
        if steps:
            out[call[-8:]] = [(series[0][0], round(series[0][1], 1)), *steps]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--engine-window-ms", type=float, default=None,
                        help="the engine's batching window (default: the appliance's, 20 ms)")
    parser.add_argument("--trace", action="store_true",
                        help="sample every live call's round trip each 0.5 s and print, per call that moved, "
                             "when its round trip stepped (seconds from the soak's start)")
    args = parser.parse_args()
    reason = ap.missing_prerequisite()
    if reason is not None:
        print(json.dumps({"skipped": reason}))
        return 2
    with tempfile.TemporaryDirectory(prefix="aziza-soak-") as tmp:
        app = ap.Appliance(Path(tmp))
        app.configure(operator_sip_port=ap.free_udp_pair()[0], busy_sip_port=ap.free_udp_pair()[0])
        _widen(app, args.calls)
        engine_args = [a if a != str(ap.SLOTS + 2) else str(args.calls + 2) for a in app.engine.args]
        if args.engine_window_ms is not None:
            engine_args += ["--batch-window-ms", str(args.engine_window_ms)]
        app.engine.args = engine_args
        try:
            app.provision()
            app.start()
            started = time.time()
            samples: dict[str, list[tuple[float, float]]] = {}
            sampling = threading.Event()
            sampler = threading.Thread(target=_sample, args=(app, started, samples, sampling), daemon=True)
            if args.trace:
                sampler.start()
            report_dir = Path(tmp) / "report"
            host0, host_at = host_cpu_ticks(), time.monotonic()
            done = subprocess.run(
                [str(ap.BIN / "aziza-admin"), "loadtest", "--via", "sip", "--quick",
                 "--calls", str(args.calls), "--seconds", str(args.seconds), "--report", str(report_dir),
                 "--did", ap.DID_MAIN,
                 "--sip-target", f"127.0.0.1:{app.ports['sip']}",
                 "--bridge-url", f"http://127.0.0.1:{app.ports['bridge_http']}", "--json"],
                env=app.env, capture_output=True, text=True, timeout=args.seconds + 600, check=False)
            host = host_cpu_percent(host0, host_cpu_ticks(), time.monotonic() - host_at)
            sampling.set()
            if args.trace:
                sampler.join()  # (its samples are read below)
            summary = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
            ap.wait_for(lambda: not app.live_calls() or None, 60, "every call over")
            round_moves = {cause: _engine_counter(app, f'aziza_engine_round_moves_total{{cause="{cause}"}}')
                           for cause in ("late", "phase")}
            rows = app.latest_records(started, did=ap.DID_MAIN)
            records = [app.call_record(row["id"]) for row in rows]
            per_call = [_find(record, "round_trip_end_vs_start_ms") for record in records]
            measured = [v for v in per_call if v is not None]
            # What moved the calls that moved: input re-phasings and concealment, output slots.
            moved = [{key: _find(record, key) for key in _MOVES} | {"round_trip_end_vs_start_ms": value}
                     for record, value in zip(records, per_call, strict=True)
                     if value is not None and abs(value) > 5.0]
            # ...and the same counts summed over the calls that ended within 5 ms (what they rode out).
            steady = [record for record, value in zip(records, per_call, strict=True)
                      if value is not None and abs(value) <= 5.0]
            steady_moves = {key: sum(_find(record, key) or 0.0 for record in steady) for key in _MOVES}
            print(json.dumps({
                "calls": args.calls, "seconds": args.seconds,
                "engine_window_ms": args.engine_window_ms if args.engine_window_ms is not None else "default",
                "records": len(rows), "loadtest_exit": done.returncode,
                "loadtest": {k: summary.get(k) for k in ("calls_ok", "ttfb_ms", "cpu_percent", "errors")},
                "round_trip_end_vs_start_ms": sorted(round(v, 2) for v in measured),
                "within_5_ms": sum(1 for v in measured if abs(v) <= 5.0),
                "beyond_5_ms": moved,
                "within_5_ms_moves": steady_moves,
                "engine_round_moves": round_moves,
                # (the machine over the calls, 100 = one core: a virtual machine's time taken by its host)
                "host_steal_percent": host["steal"] if host else None,
            } | ({"steps": _steps(samples)} if args.trace else {})))
            return 0
        finally:
            app.teardown()


if __name__ == "__main__":
    sys.exit(main())
