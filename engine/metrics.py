"""Prometheus metrics of one engine, in its own registry (one per app, so tests can run many engines)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.16)


class EngineMetrics:
    def __init__(self, num_slots: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.slots_total = Gauge("aziza_engine_slots_total", "Slots this engine has", registry=r)
        self.slots_total.set(num_slots)
        self.slots_busy = Gauge("aziza_engine_slots_busy", "Slots held by a session", registry=r)
        self.sessions_opened = Counter("aziza_engine_sessions_opened", "Sessions that got ready", registry=r)
        self.sessions_refused = Counter(
            "aziza_engine_sessions_refused", "Opens refused, by error code", ["code"], registry=r
        )
        self.sessions_closed = Counter(
            "aziza_engine_sessions_closed", "Sessions ended, by reason", ["reason"], registry=r
        )
        self.ticks = Counter("aziza_engine_ticks", "Backend steps run", registry=r)
        self.step_seconds = Histogram(
            "aziza_engine_step_seconds", "Wall time of one backend step", buckets=_STEP_BUCKETS, registry=r
        )
        self.step_overruns = Counter(
            "aziza_engine_step_overruns", "Steps that took longer than one 80 ms frame", registry=r
        )
        self.batch_size = Histogram(
            "aziza_engine_batch_size", "Slots stepped per tick",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.batch_wait_seconds = Histogram(
            "aziza_engine_batch_wait_seconds",
            "How long the oldest frame of a tick waited before its step started",
            buckets=_WAIT_BUCKETS, registry=r,
        )
        self.frames_in = Counter("aziza_engine_frames_in", "Input frames accepted", registry=r)
        self.frames_out = Counter("aziza_engine_frames_out", "Output frames produced", registry=r)
        self.input_dropped = Counter(
            "aziza_engine_input_frames_dropped", "Oldest input dropped: a session fell behind", registry=r
        )
        self.output_dropped = Counter(
            "aziza_engine_output_frames_dropped", "Output dropped because a client did not read", registry=r
        )
        self.stale_outputs = Counter(
            "aziza_engine_stale_outputs", "Outputs of a finished call (generation check)", registry=r
        )
        self.bad_frames = Counter("aziza_engine_bad_frames", "Binary frames rejected", registry=r)
        self.bad_messages = Counter("aziza_engine_bad_messages", "Control messages rejected", registry=r)
        self.lag_reports = Counter("aziza_engine_lag_reports", "lag messages sent to sessions", registry=r)
        self.round_moves = Counter(
            "aziza_engine_round_moves", "Input frames stepped a batching window earlier or later than their "
            "session's previous one (its round trip moves by a window), by cause: late (it came after its "
            "round), phase (its phase crossed a boundary)", ["cause"],
            registry=r,
        )
        self.lagging_sessions = Gauge("aziza_engine_lagging_sessions", "Sessions behind", registry=r)
        self.input_gaps = Counter(
            "aziza_engine_input_gap_frames", "Input frame numbers that did not arrive in order, by reason "
            "(missing, late, overflow)", ["reason"], registry=r,
        )
        self.backend_failures = Counter(
            "aziza_engine_backend_failures", "Backend calls that failed, by operation", ["op"], registry=r
        )

        self._queued: Callable[[], int] = lambda: 0
        self.registry.register(_LiveCollector(self))

    def watch_queue(self, queued: Callable[[], int]) -> None:
        """Where the scrape reads the input frames queued over all sessions."""
        self._queued = queued

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Read at scrape time: queue depth, and the GPU's memory (torch) and utilisation (NVML). The GPU
    families are absent on a machine without one (no zeros that look like an idle GPU)."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily("aziza_engine_queue_depth", "Input frames queued, all sessions")
        queue.add_metric([], float(self._metrics._queued()))
        yield queue
        yield from gpu_metrics()


def gpu_metrics() -> Iterator[GaugeMetricFamily]:
    import sys

    torch = sys.modules.get("torch")  # only a Moshi engine has imported it; the echo engine has no GPU
    if torch is None or not torch.cuda.is_available():
        return
    memory = GaugeMetricFamily("aziza_engine_gpu_memory_bytes", "GPU memory by kind (torch allocator)",
                               labels=["device", "kind"])
    for index in range(torch.cuda.device_count()):
        device = str(index)
        memory.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
        memory.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
        memory.add_metric([device, "peak"], float(torch.cuda.max_memory_allocated(index)))
    yield memory
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        util = GaugeMetricFamily("aziza_engine_gpu_utilization_ratio", "GPU busy fraction (NVML)",
                                 labels=["device"])
        for index in range(pynvml.nvmlDeviceGetCount()):
            rates = pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(index))
            util.add_metric([str(index)], rates.gpu / 100.0)
        yield util
    except Exception:  # no NVML library or driver: the family is absent, the scrape goes on
        return
