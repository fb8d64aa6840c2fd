"""The Grafana dashboard and the alert rules name only metrics the code exposes; the dashboard covers what
the operator watches and shows 24 h by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.exposed import exposed_names, metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "provisioning" / "grafana" / "aziza-dashboard.json"
RULES = ROOT / "provisioning" / "prometheus" / "aziza-rules.yml"


def _exprs(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}


def test_dashboard_names_only_exposed_metrics_and_covers_the_criteria(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["time"]["from"] == "now-24h" and dashboard["time"]["to"] == "now"
    exposed = exposed_names(monkeypatch)
    panels = _exprs(dashboard)
    named: set[str] = set()
    for title, exprs in panels.items():
        assert exprs, f"panel {title!r} has no query"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"panel {title!r}: {expr!r} names no aziza metric"
            assert names <= exposed, f"panel {title!r}: {sorted(names - exposed)} are not exposed by the code"
            named |= names
    for needed in ("aziza_active_sessions", "aziza_ttfb_seconds_bucket", "aziza_engine_batch_size_bucket",
                   "aziza_engine_step_seconds_bucket", "aziza_engine_queue_depth",
                   "aziza_engine_gpu_utilization_ratio", "aziza_engine_gpu_memory_bytes",
                   "aziza_sessions_total"):
        assert needed in named, f"no panel shows {needed}"
    every = " ".join(e for exprs in panels.values() for e in exprs)
    for quantile in ("0.5", "0.95", "0.99"):  # TTFB p50/p95/p99
        assert f"histogram_quantile({quantile}, sum by (le) (rate(aziza_ttfb_seconds_bucket" in every


def test_alert_rules_name_only_exposed_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    exposed = exposed_names(monkeypatch)
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"AzizaTtfbP95High", "AzizaCapacityFull", "AzizaEngineDown",
                                           "AzizaCapacityLeasesLost"}
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names <= exposed, f"{rule['alert']}: {sorted(names - exposed)} are not exposed by the code"


def test_exposed_names_come_from_the_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the collector of names itself: a name the code does not have is not in it.
    exposed = exposed_names(monkeypatch)
    assert {"aziza_ttfb_seconds_bucket", "aziza_turns_total", "aziza_engine_slots_total",
            "aziza_capacity_leases_lost_total", "aziza_engine_gpu_memory_bytes"} <= exposed
    assert "aziza_ttfb_seconds" not in exposed and "aziza_latency_seconds_bucket" not in exposed
