"""The bridge's media metrics when calls run in media workers: this process's families plus each worker's
(Prometheus text it sends every second), summed sample by sample.

Every media family is a sum over calls (counters, gauges of live things, fixed-bucket histograms), so the
sum over processes is the appliance's value. A worker that dies leaves the counters and histograms of its
last text behind as a baseline (:func:`retire`), so they do not go backwards; its gauges go with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from bridge.media.prometheus import MEDIA_METRICS


def sum_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families of the same name summed sample by sample (same sample name and labels); the first source
    that has a family gives its type, help and sample order."""
    merged: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in sources:
        for family in families:
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (Metric(family.name, family.documentation, family.type), {})
            values = entry[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = values.get(key, 0.0) + float(sample.value)
    out: list[Metric] = []
    for metric, values in merged.values():
        for (name, labels), value in values.items():
            metric.add_sample(name, dict(labels), value)
        out.append(metric)
    return out


def parse_text(text: str) -> list[Metric]:
    """A worker's exposition text as families (ValueError if it does not parse: the scrape then leaves that
    text out, so one bad report cannot break /metrics)."""
    return list(text_string_to_metric_families(text))


def retire(retired: str, last: str) -> str:
    """The counts of processes that are gone, with one more process's ``last`` text folded in: its
    counters and histograms, summed; not its gauges (what a dead worker held live, it holds no more)."""
    sources: list[list[Metric]] = []
    for text in (retired, last):
        try:
            sources.append([f for f in parse_text(text) if f.type != "gauge"])
        except ValueError:
            continue
    return render(sum_families(sources))


def render(families: list[Metric]) -> str:
    """Families as Prometheus exposition text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry).decode()


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class MediaMetricsFanIn(Collector):
    """``local`` (this process's MediaMetrics) plus the texts ``remote()`` returns, summed at scrape."""

    def __init__(self, local: Collector) -> None:
        self.local = local
        self._remote: list[Callable[[], list[str]]] = []
        self._lock = threading.Lock()

    def add_remote(self, texts: Callable[[], list[str]]) -> None:
        with self._lock:
            self._remote.append(texts)

    def remove_remote(self, texts: Callable[[], list[str]]) -> None:
        with self._lock:
            if texts in self._remote:
                self._remote.remove(texts)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            remote = list(self._remote)
        local = list(self.local.collect())
        if not remote:
            yield from local
            return
        sources: list[list[Metric]] = [local]
        for texts in remote:
            for text in texts():
                try:
                    sources.append(parse_text(text))
                except ValueError:
                    continue
        yield from sum_families(sources)


#: What the bridge's /metrics exposes of the media path: this process's MEDIA_METRICS, plus its media
#: workers' when it has them (MediaWorkerPool adds them).
MEDIA_FANIN = MediaMetricsFanIn(MEDIA_METRICS)

__all__ = ["MEDIA_FANIN", "MediaMetricsFanIn", "parse_text", "render", "retire", "sum_families"]
