"""Every sample name the bridge's and the engine's ``/metrics`` can expose, collected in-process from their
real registries (so the dashboard and alert rules are checked against the code, not against a list)."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from bridge.call_deps import CapacityReport
from bridge.controller import ControllerMetrics
from engine.metrics import EngineMetrics

# What a family of each type is scraped as (the parser reports counters without their _total).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
METRIC_NAME = re.compile(r"\baziza_[a-z0-9_]+\b")


def _names(registry: CollectorRegistry) -> set[str]:
    return {fam.name + suffix for fam in registry.collect() for suffix in _SUFFIXES.get(fam.type, ("",))}


def _fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch with one CUDA device and an NVML, so the engine's GPU families (absent on this CPU machine)
    are collected by the real collector too."""
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, memory_allocated=lambda i: 1.0,
                           memory_reserved=lambda i: 2.0, max_memory_allocated=lambda i: 3.0)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=50)))


def _registries(monkeypatch: pytest.MonkeyPatch) -> list[CollectorRegistry]:
    bridge = ControllerMetrics()
    bridge.watch_capacity(lambda: CapacityReport(slots=1, held=0, refused_full=0, leases_lost=0,
                                                 renew_failures=0))
    _fake_gpu(monkeypatch)
    return [bridge.registry, EngineMetrics(2).registry]


def exposed_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every sample name as scraped (``aziza_turns_total``, ``aziza_ttfb_seconds_bucket``, ...)."""
    return {name for registry in _registries(monkeypatch) for name in _names(registry)}


def family_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """One name per family as an operator reads it: counters with ``_total``, histograms by their base."""
    return {fam.name + ("_total" if fam.type == "counter" else "")
            for registry in _registries(monkeypatch) for fam in registry.collect()}


def metric_names(promql: str) -> set[str]:
    return set(METRIC_NAME.findall(promql))
