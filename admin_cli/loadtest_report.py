"""The load test's report, pure: what a run measured in, ``report.json`` and a self-contained ``report.html``
(inline SVG plots, no scripts, no network) out. No I/O here but the two writes in :func:`write_report`.

Definitions (also in the JSON's ``definitions``):

* **TTFB**: caller turn end -> first agent audio sent, per turn, measured by the bridge
  (``bridge/media/turns.py``); percentiles are exact over every answered turn of the run.
* **Error rate**: (calls that failed + turns left unanswered) / (calls + turns). A call fails when it is
  refused, dropped (its media ended before the caller hung up) or got no audio back.
* **Max stable concurrency**: the most calls up during a window (10 s; 5 s with ``--quick``) whose turns' TTFB
  p95 stayed within the threshold with no error in it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    ttfb_p95_ms: float = 120.0
    error_rate: float = 0.001
    min_stable_sessions: int = 8
    min_minutes: float = 10.0


@dataclass
class CallResult:
    id: int
    started_t: float  # seconds from the run's start
    ended_t: float | None = None
    outcome: str = "ok"  # ok | refused | dropped | no_audio
    end_reason: str | None = None
    turns: int = 0
    unanswered: int = 0
    ttfb_ms: list[float] = field(default_factory=list)
    added_latency_p50_ms: float | None = None
    added_latency_p99_ms: float | None = None
    jitter_buffer_p50_ms: float | None = None  # how long caller packets waited in the jitter buffer
    jitter_buffer_p99_ms: float | None = None
    pacing_p99_ms: float | None = None
    packets_sent: int = 0
    packets_received: int = 0


@dataclass
class RunData:
    """Everything a run measured; times are seconds from its start."""

    config: dict[str, Any]
    started_at: str  # ISO time
    wall_s: float = 0.0
    interrupted: bool = False
    calls: list[CallResult] = field(default_factory=list)
    ttfb_events: list[tuple[float, float]] = field(default_factory=list)  # (t, ttfb ms)
    concurrency: list[tuple[float, int]] = field(default_factory=list)  # (t, calls up)
    ticks: list[tuple[float, float | None, float | None, float | None]] = field(default_factory=list)
    # ^ (t, tick p50 ms, tick p99 ms, mean batch size) per engine scrape interval
    tick_p50_ms: float | None = None
    tick_p99_ms: float | None = None
    batch_size_mean: float | None = None
    batch_size_max: float | None = None
    queue_depth_max: float | None = None
    gpu_memory_peak_bytes: float | None = None
    cpu_percent: dict[str, float | None] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def stability_windows(data: RunData, window_s: float, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The run cut in ``window_s`` windows: calls up (the most seen), TTFB p95, errors, stable or not."""
    windows = []
    n = max(1, math.ceil(data.wall_s / window_s))
    for k in range(n):
        lo, hi = k * window_s, (k + 1) * window_s
        up = [c for t, c in data.concurrency if lo <= t < hi]
        ttfb = [v for t, v in data.ttfb_events if lo <= t < hi]
        errors = sum(
            1
            for c in data.calls
            if c.outcome != "ok" and lo <= (c.ended_t if c.ended_t is not None else c.started_t) < hi
        )
        p95 = _pct(ttfb, 95)
        stable = bool(ttfb) and p95 is not None and p95 <= thresholds.ttfb_p95_ms and errors == 0
        windows.append(
            {
                "start_s": lo,
                "calls_up": max(up, default=0),
                "turns": len(ttfb),
                "ttfb_p95_ms": p95,
                "errors": errors,
                "stable": stable,
            }
        )
    return windows


def build_report(data: RunData, thresholds: Thresholds, window_s: float) -> dict[str, Any]:
    ttfb = [v for c in data.calls for v in c.ttfb_ms]
    turns = sum(c.turns for c in data.calls)
    unanswered = sum(c.unanswered for c in data.calls)
    failed = {
        kind: sum(1 for c in data.calls if c.outcome == kind) for kind in ("refused", "dropped", "no_audio")
    }
    attempts = len(data.calls) + turns
    error_rate = (sum(failed.values()) + unanswered) / attempts if attempts else 1.0
    windows = stability_windows(data, window_s, thresholds)
    max_stable = max((w["calls_up"] for w in windows if w["stable"]), default=0)
    added_p99 = [c.added_latency_p99_ms for c in data.calls if c.added_latency_p99_ms is not None]
    pacing_p99 = [c.pacing_p99_ms for c in data.calls if c.pacing_p99_ms is not None]
    min_stable = min(thresholds.min_stable_sessions, int(data.config.get("calls", 1)))
    p95 = _pct(ttfb, 95)
    criteria = [
        _criterion("max_stable_concurrency", max_stable, ">=", min_stable),
        _criterion("ttfb_p95_ms", p95, "<=", thresholds.ttfb_p95_ms),
        _criterion("error_rate", round(error_rate, 6), "<=", thresholds.error_rate),
        _criterion("duration_minutes", round(data.wall_s / 60.0, 3), ">=", thresholds.min_minutes),
    ]
    return {
        "config": data.config,
        "thresholds": asdict(thresholds),
        "started_at": data.started_at,
        "duration_s": round(data.wall_s, 2),
        "interrupted": data.interrupted,
        "passed": all(c["pass"] for c in criteria),
        "criteria": criteria,
        "calls": len(data.calls),
        "calls_ok": sum(1 for c in data.calls if c.outcome == "ok"),
        "errors": {**failed, "unanswered_turns": unanswered},
        "error_rate": round(error_rate, 6),
        "turns": turns,
        "ttfb_ms": {
            "count": len(ttfb),
            "p50": _pct(ttfb, 50),
            "p95": p95,
            "p99": _pct(ttfb, 99),
            "max": round(max(ttfb), 2) if ttfb else None,
        },
        "max_stable_concurrency": max_stable,
        "max_concurrency": max((c for _, c in data.concurrency), default=0),
        "added_latency_p99_ms_worst_call": max(added_p99, default=None),
        "pacing_p99_ms_worst_call": max(pacing_p99, default=None),
        "engine": {
            "tick_p50_ms": data.tick_p50_ms,
            "tick_p99_ms": data.tick_p99_ms,
            "batch_size_mean": data.batch_size_mean,
            "batch_size_max": data.batch_size_max,
            "queue_depth_max": data.queue_depth_max,
        },
        "gpu_memory_peak_bytes": data.gpu_memory_peak_bytes,
        "gpu": "measured" if data.gpu_memory_peak_bytes is not None else "absent (the engine reports no GPU)",
        "cpu_percent": data.cpu_percent,
        "windows": windows,
        "per_call": [asdict(c) for c in data.calls],
        "series": {"ttfb": data.ttfb_events, "concurrency": data.concurrency, "ticks": data.ticks},
        "definitions": {
            "ttfb": "caller turn end (its last voiced 80 ms frame complete at the bridge) -> the first "
            "voiced agent frame answering it leaves as RTP; bridge/media/turns.py",
            "error_rate": "(failed calls + unanswered turns) / (calls + turns); failed: refused, dropped, "
            "no audio back",
            "max_stable_concurrency": f"most calls up in a {window_s:g} s window whose TTFB p95 <= threshold "
            "and with no errors",
            "cpu_percent": "100 = one core",
        },
    }


def _criterion(name: str, value: float | None, op: str, threshold: float) -> dict[str, Any]:
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "pass": ok}


# -- HTML --------------------------------------------------------------------------------------------------

_W, _H, _PAD = 640, 260, 48
_COLORS = ("#1f77b4", "#d62728", "#2ca02c")


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def svg_plot(
    plot_id: str,
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    *,
    x_label: str,
    y_label: str,
    threshold: float | None = None,
    points: bool = False,
    step: bool = False,
    x_from_zero: bool = False,
) -> str:
    """One inline SVG chart: lines (or points) per named series, axes with min/max labels."""
    xs = [x for _, s in series for x, _ in s]
    ys = [y for _, s in series for _, y in s] + ([threshold] if threshold is not None else [])
    parts = [
        f'<svg class="plot" data-plot="{plot_id}" xmlns="http://www.w3.org/2000/svg" width="{_W}" '
        f'height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
    ]
    if not xs:
        parts.append(
            f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="empty">no data</text></svg>'
        )
        return "".join(parts)
    x0, x1 = (0.0 if x_from_zero else min(xs)), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    sx, sy = _scale(x0, x1, _PAD, _W - 12), _scale(y0, y1, _H - 32, 24)
    parts.append(
        f'<rect x="{_PAD}" y="24" width="{_W - 12 - _PAD}" height="{_H - 56}" fill="none" stroke="#999"/>'
    )
    for value, y in ((y0, _H - 32), (y1, 28)):
        parts.append(f'<text x="{_PAD - 4}" y="{y}" text-anchor="end" font-size="10">{value:.4g}</text>')
    for value, anchor in ((x0, "start"), (x1, "end")):
        parts.append(
            f'<text x="{sx(value):.1f}" y="{_H - 18}" text-anchor="{anchor}" font-size="10">'
            f"{value:.4g}</text>"
        )
    parts.append(
        f'<text x="{_W / 2}" y="{_H - 4}" text-anchor="middle" font-size="11">{html.escape(x_label)}'
        f'</text><text x="12" y="{_H / 2}" font-size="11" transform="rotate(-90 12 {_H / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )
    if threshold is not None:
        ty = sy(threshold)
        parts.append(
            f'<line class="threshold" x1="{_PAD}" x2="{_W - 12}" y1="{ty:.1f}" y2="{ty:.1f}" '
            'stroke="#ff7f0e" stroke-dasharray="5,4"/>'
        )
    for k, (name, s) in enumerate(series):
        color = _COLORS[k % len(_COLORS)]
        if points:
            for px, py in s:
                parts.append(f'<circle cx="{sx(px):.1f}" cy="{sy(py):.1f}" r="2.2" fill="{color}"/>')
        elif s:
            coords: list[str] = []
            for i, (px, py) in enumerate(s):
                if step and i:
                    coords.append(f"{sx(px):.1f},{sy(s[i - 1][1]):.1f}")
                coords.append(f"{sx(px):.1f},{sy(py):.1f}")
            parts.append(
                f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.8" '
                f'points="{" ".join(coords)}"/>'
            )
        parts.append(
            f'<text x="{_W - 16}" y="{40 + 14 * k}" text-anchor="end" font-size="11" fill="{color}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _cdf(values: list[float]) -> list[tuple[float, float]]:
    ordered = sorted(values)
    n = len(ordered)
    return [(v, (i + 1) / n) for i, v in enumerate(ordered)]


def render_html(report: dict[str, Any]) -> str:
    thresholds = report["thresholds"]
    series = report["series"]
    ttfb_points = [(float(t), float(v)) for t, v in series["ttfb"]]
    ticks = series["ticks"]
    plots = [
        svg_plot(
            "ttfb_over_time",
            "TTFB per caller turn",
            [("TTFB", ttfb_points)],
            x_label="run time (s)", x_from_zero=True,
            y_label="ms",
            threshold=thresholds["ttfb_p95_ms"],
            points=True,
        ),
        svg_plot(
            "ttfb_cdf",
            "TTFB distribution (CDF)",
            [("TTFB", _cdf([v for _, v in ttfb_points]))],
            x_label="TTFB (ms)",
            y_label="fraction of turns",
            step=True,
        ),
        svg_plot(
            "concurrency",
            "Calls up",
            [("calls", [(float(t), float(c)) for t, c in series["concurrency"]])],
            x_label="run time (s)", x_from_zero=True,
            y_label="calls",
            step=True,
        ),
        svg_plot(
            "ticks",
            "Engine tick time",
            [
                ("p50", [(float(t), float(p50)) for t, p50, _, _ in ticks if p50 is not None]),
                ("p99", [(float(t), float(p99)) for t, _, p99, _ in ticks if p99 is not None]),
            ],
            x_label="run time (s)", x_from_zero=True,
            y_label="ms",
        ),
    ]
    rows = "".join(
        f'<tr class="{"pass" if c["pass"] else "fail"}"><td>{html.escape(c["name"])}</td>'
        f"<td>{html.escape(str(c['value']))}</td><td>{html.escape(c['op'])} {c['threshold']:g}</td>"
        f"<td>{'PASS' if c['pass'] else 'FAIL'}</td></tr>"
        for c in report["criteria"]
    )
    ttfb = report["ttfb_ms"]
    eng = report["engine"]
    facts = [
        ("calls (ok / all)", f"{report['calls_ok']} / {report['calls']}"),
        ("turns", report["turns"]),
        ("TTFB p50 / p95 / p99 (ms)", f"{ttfb['p50']} / {ttfb['p95']} / {ttfb['p99']}"),
        ("max stable concurrency", report["max_stable_concurrency"]),
        ("error rate", report["error_rate"]),
        ("errors", json.dumps(report["errors"])),
        ("engine tick p50 / p99 (ms)", f"{eng['tick_p50_ms']} / {eng['tick_p99_ms']}"),
        ("batch size mean / max", f"{eng['batch_size_mean']} / {eng['batch_size_max']}"),
        (
            "GPU memory peak",
            report["gpu_memory_peak_bytes"] if report["gpu_memory_peak_bytes"] is not None else report["gpu"],
        ),
        ("CPU % (100 = one core)", json.dumps(report["cpu_percent"])),
        ("duration (s)", report["duration_s"]),
        ("interrupted", report["interrupted"]),
    ]
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    call_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            c["id"], c["outcome"], c["end_reason"], c["turns"], c["unanswered"],
            _pct(c["ttfb_ms"], 50), _pct(c["ttfb_ms"], 95), c["added_latency_p99_ms"],
            c.get("jitter_buffer_p50_ms"), c["pacing_p99_ms"],
        )) + "</tr>"
        for c in report["per_call"]
    )
    verdict = "PASS" if report["passed"] else "FAIL"
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Aziza load test</title><style>'
        "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}tr.pass td:last-child{color:#2ca02c}"
        "tr.fail td:last-child{color:#d62728;font-weight:bold}.plots svg{margin:6px;border:1px solid #eee}"
        f'</style></head><body><h1>Aziza load test: <span id="verdict">{verdict}</span></h1>'
        f"<p>{html.escape(report['started_at'])}, via {html.escape(str(report['config'].get('via')))}, "
        f"{report['config'].get('calls')} calls{' (ramp)' if report['config'].get('ramp') else ''}</p>"
        f'<h2>Criteria</h2><table id="criteria"><tr><th>criterion</th><th>value</th><th>threshold</th>'
        f"<th>result</th></tr>{rows}</table><h2>Numbers</h2><table>{fact_rows}</table>"
        f'<h2>Plots</h2><div class="plots">{"".join(plots)}</div>'
        '<h2>Calls</h2><table id="calls"><tr><th>call</th><th>outcome</th><th>end</th><th>turns</th>'
        "<th>unanswered</th><th>TTFB p50 (ms)</th><th>TTFB p95 (ms)</th><th>added latency p99 (ms)</th>"
        "<th>jitter buffer p50 (ms)</th>"
        f"<th>pacing p99 (ms)</th></tr>{call_rows}</table></body></html>"
    )


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "report.json", folder / "report.html"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    html_path.write_text(render_html(report))
    return json_path, html_path
