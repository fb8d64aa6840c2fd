"""``aziza-admin loadtest``: calls with realistic turns, per-turn TTFB, a JSON + HTML report and a verdict.

``--via rtp`` (three processes, so each one's CPU is its own): the engine (an echo engine started here, or
``--engine-url``), the bridge's real per-call media path in this process (one ``CallMedia`` and engine session
per call: jitter buffer, codecs, resampling, framing, the engine protocol, the paced output) and the callers
as simulated Asterisk legs in a child process (``admin_cli/loadtest_legs.py``), over real RTP on loopback.

Each caller talks in turns (speech, then 2-3.5 s of silence); the bridge measures each turn's TTFB
(``bridge/media/turns.py``). The engine's ``/metrics`` is scraped every few seconds for its tick times, batch
sizes, queue depth and GPU memory. The report (``admin_cli/loadtest_report.py``) is written when the run ends,
also after Ctrl-C (with what was measured so far); the exit status is 0 when every criterion passed, 1 when
one failed, 130 after Ctrl-C.

``--via sip`` places the calls with SIPp through a running Asterisk and reads TTFB and concurrency from the
running bridge's ``/metrics`` (``admin_cli/loadtest_sip.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import click
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from admin_cli.loadtest_report import CallResult, RunData, Thresholds, build_report, write_report
from admin_cli.media_cmds import start_echo_engine_process
from admin_cli.procs import end_process, proc_cpu_s
from bridge.config import BridgeSettings
from bridge.engine_client import EngineError, EngineSession
from bridge.media.audio_file import AudioFileError
from bridge.media.call_media import CallMedia

RAMP_STEP_S = 10.0  # --ramp: one more call every this many seconds (a stability window each)
QUICK_RAMP_STEP_S = 4.0
SCRAPE_EVERY_S = 5.0
QUICK_SCRAPE_EVERY_S = 2.0
TAIL_S = 1.0  # after the callers stop: answers still in flight come back before the hang-up


class LoadTestError(click.ClickException):
    """One clear line for the operator (unreachable engine, unreadable audio, unwritable report...)."""


# -- engine metrics ------------------------------------------------------------------------------------------


def metrics_url(engine_url: str) -> tuple[str, str | None]:
    """The engine's /metrics URL (and its Unix socket, if on one) for its session URL (ws://, wss://, unix://)."""
    parts = urlsplit(engine_url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        return "http://localhost/metrics", path
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise LoadTestError(f"engine URL must be ws://, wss:// or unix://, got {engine_url!r}")
    return f"{scheme}://{parts.netloc}/metrics", None


async def fetch_metrics(url: str, unix_socket: str | None = None, timeout_s: float = 3.0) -> str:
    connector = aiohttp.UnixConnector(path=unix_socket) if unix_socket else None
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response,
    ):
        response.raise_for_status()
        return await response.text()


@dataclass
class HistogramSnapshot:
    """A Prometheus histogram's cumulative buckets (upper bound -> count), its sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def minus(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        return HistogramSnapshot(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.total - earlier.total,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as PromQL's histogram_quantile; None when empty."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound in sorted(self.buckets):
            count = self.buckets[bound]
            if count >= rank:
                if bound == float("inf"):
                    return lower_bound
                width = count - lower_count
                return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
            lower_bound, lower_count = bound, count
        return lower_bound

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def take(self, sample: Sample) -> None:
        """One sample of the histogram's family (``_bucket``, ``_sum`` or ``_count``)."""
        if sample.name.endswith("_bucket"):
            self.buckets[float(sample.labels["le"])] = sample.value
        elif sample.name.endswith("_sum"):
            self.total = sample.value
        elif sample.name.endswith("_count"):
            self.count = sample.value


@dataclass
class EngineMetrics:
    step: HistogramSnapshot
    batch: HistogramSnapshot
    queue_depth: float | None
    gpu_memory_bytes: float | None  # the torch allocator's peak, all devices; None without a GPU


def parse_engine_metrics(text: str) -> EngineMetrics:
    step, batch = HistogramSnapshot(), HistogramSnapshot()
    queue: float | None = None
    gpu: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            target = {"aziza_engine_step_seconds": step, "aziza_engine_batch_size": batch}.get(family.name)
            if target is not None:
                target.take(sample)
            elif family.name == "aziza_engine_queue_depth":
                queue = sample.value
            elif family.name == "aziza_engine_gpu_memory_bytes" and sample.labels.get("kind") == "peak":
                gpu = (gpu or 0.0) + sample.value
    return EngineMetrics(step, batch, queue, gpu)


def record_engine_interval(data: RunData, previous: EngineMetrics, current: EngineMetrics, t: float) -> None:
    """One engine scrape interval into the run: tick p50/p99 and mean batch (bucket deltas), queue depth,
    GPU memory and largest batch (shared by ``--via rtp`` and ``--via sip``)."""
    step = current.step.minus(previous.step)
    batch = current.batch.minus(previous.batch)
    p50, p99 = step.quantile(0.5), step.quantile(0.99)
    data.ticks.append(
        (
            round(t, 3),
            None if p50 is None else round(p50 * 1000, 3),
            None if p99 is None else round(p99 * 1000, 3),
            None if batch.mean is None else round(batch.mean, 2),
        )
    )
    if current.queue_depth is not None:
        data.queue_depth_max = max(data.queue_depth_max or 0.0, current.queue_depth)
    if current.gpu_memory_bytes is not None:
        data.gpu_memory_peak_bytes = max(data.gpu_memory_peak_bytes or 0.0, current.gpu_memory_bytes)
    if batch.count > 0:
        # The largest batch is within the first bucket holding them all (beyond the last bound: that bound).
        top = min((le for le, n in batch.buckets.items() if n >= batch.count), default=None)
        finite = [le for le in batch.buckets if le != float("inf")]
        if top == float("inf") and finite:
            top = max(finite)
        if top is not None:
            data.batch_size_max = max(data.batch_size_max or 0.0, top)


def record_engine_totals(data: RunData, first: EngineMetrics, last: EngineMetrics) -> None:
    """The whole run's tick p50/p99 and mean batch size, from the first and last scrapes."""
    step = last.step.minus(first.step)
    batch = last.batch.minus(first.batch)
    p50, p99 = step.quantile(0.5), step.quantile(0.99)
    data.tick_p50_ms = None if p50 is None else round(p50 * 1000, 3)
    data.tick_p99_ms = None if p99 is None else round(p99 * 1000, 3)
    data.batch_size_mean = None if batch.mean is None else round(batch.mean, 2)


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Options:
    calls: int
    seconds: float
    ramp: bool
    via: str
    report_dir: Path
    quick: bool
    audio: Path | None
    engine_url: str | None
    thresholds: Thresholds
    seed: int = 1
    sip: dict[str, Any] | None = None  # --via sip: bridge_url, target, did


@dataclass
class _Call:
    result: CallResult
    media: CallMedia | None = None
    engine: EngineSession | None = None
    run: asyncio.Task[str] | None = None
    ttfb_seen: int = 0


class _Progress:
    """The live line: elapsed, calls up, p95 so far. Redrawn in place on a terminal, every 10 s otherwise."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.tty = sys.stderr.isatty()
        self._last_line_at = -1e9

    def show(self, t: float, up: int, calls: int, turns: int, p95: float | None, errors: int) -> None:
        line = (
            f"[{t:6.0f}/{self.total_s:.0f} s] calls up {up}/{calls}  turns {turns}  TTFB p95 "
            f"{'-' if p95 is None else f'{p95:.1f} ms'}  errors {errors}"
        )
        if self.tty:
            sys.stderr.write("\r" + line.ljust(90))
            sys.stderr.flush()
        elif t - self._last_line_at >= 10.0:
            self._last_line_at = t
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class _Legs:
    """The legs child process (admin_cli/loadtest_legs.py), one JSON line each way per command."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, audio: Path | None, seed: int) -> _Legs:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "admin_cli.loadtest_legs",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        legs = cls(proc)
        await legs._say({"audio_path": str(audio) if audio else None, "seed": seed})
        return legs

    async def _say(self, message: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def ask(self, message: Any) -> Any:
        await self._say(message)
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise LoadTestError("the simulated callers' process ended early (see its error above)")
        return json.loads(line)

    async def close(self) -> None:
        await end_process(self.proc)


async def _check_engine(url: str) -> EngineMetrics:
    target, unix_socket = metrics_url(url)
    try:
        return parse_engine_metrics(await fetch_metrics(target, unix_socket))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise LoadTestError(f"the engine at {url} is unreachable ({type(exc).__name__}: {exc})") from None


class RtpRun:
    """One ``--via rtp`` run: see the module docstring."""

    def __init__(
        self, opts: Options, stop: asyncio.Event, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.opts = opts
        self.stop = stop
        self.clock = clock
        self.calls: list[_Call] = []
        self.data = RunData(config=_config(opts), started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.settings = BridgeSettings(rtp_port_min=40000, rtp_port_max=49999)
        self.t0 = 0.0

    def now(self) -> float:
        return self.clock() - self.t0

    async def run(self) -> RunData:
        opts = self.opts
        engine_proc: asyncio.subprocess.Process | None = None
        legs: _Legs | None = None
        url = opts.engine_url
        try:
            if url is None:
                engine_proc, url = await start_echo_engine_process(opts.calls)
            previous = await _check_engine(url)
            legs = await _Legs.start(opts.audio, opts.seed)
            await self._drive(url, legs, previous, engine_proc)
        finally:
            await self._hang_up_all()
            if legs is not None:
                await legs.close()
            await end_process(engine_proc)
        return self.data

    async def _add_call(self, url: str, legs: _Legs, leg_port: int) -> None:
        i = len(self.calls)
        call = _Call(CallResult(id=i, started_t=round(self.now(), 3)))
        self.calls.append(call)
        try:
            call.engine = await EngineSession.open(url, None, f"loadtest-{i}")
        except EngineError as exc:
            call.result.outcome, call.result.end_reason = "refused", str(exc)
            call.result.ended_t = round(self.now(), 3)
            return
        call.media = CallMedia(self.settings, call.engine, f"loadtest-{i}")
        _, port = await call.media.bind()
        call.media.lock_remote("127.0.0.1", leg_port)
        call.run = asyncio.create_task(call.media.run(), name=f"loadtest-call-{i}")
        await legs.ask({"op": "start", "calls": [{"id": i, "port": port}]})

    async def _drive(
        self, url: str, legs: _Legs, previous: EngineMetrics, engine_proc: asyncio.subprocess.Process | None
    ) -> None:
        opts = self.opts
        total = opts.seconds
        self.t0 = self.clock()
        progress = _Progress(total)
        scrape_every = QUICK_SCRAPE_EVERY_S if opts.quick else SCRAPE_EVERY_S
        ramp_step = QUICK_RAMP_STEP_S if opts.quick else RAMP_STEP_S
        next_scrape = scrape_every
        first = previous
        ramp_open = True
        # When each call would start: spread over a second (calls do not arrive in lockstep), or one per ramp
        # step. Every caller is built first, so building one never stalls the others' packets.
        planned = [k / opts.calls for k in range(opts.calls)] if not opts.ramp else [
            k * ramp_step for k in range(opts.calls) if k * ramp_step < total]
        reply = await legs.ask({"op": "add", "calls": [{"id": k, "seconds": total - start}
                                                       for k, start in enumerate(planned)]})
        leg_ports = [int(p) for p in reply["ports"]]
        cpu0 = os.times()
        engine_cpu0 = proc_cpu_s(engine_proc.pid) if engine_proc else None
        self.t0 = self.clock()
        if not opts.ramp:
            for k, start in enumerate(planned):
                await self._sleep_until(start)
                await self._add_call(url, legs, leg_ports[k])
        next_ramp = 0.0
        while not self.stop.is_set() and self.now() < total:
            t = self.now()
            if opts.ramp and ramp_open and t >= next_ramp and len(self.calls) < len(leg_ports):
                if self.calls and not self._last_step_stable(next_ramp - ramp_step, next_ramp):
                    ramp_open = False  # p95 passed the threshold or errors appeared: no more calls
                else:
                    await self._add_call(url, legs, leg_ports[len(self.calls)])
                next_ramp += ramp_step
            self._sample(t)
            if t >= next_scrape:
                next_scrape += scrape_every
                previous = await self._scrape(url, previous, t)
            progress.show(
                t, self._up(), opts.calls, len(self.data.ttfb_events), self._p95_so_far(), self._errors()
            )
            await self._sleep_until(min(total, float(int(t) + 1)))
        self.data.interrupted = self.stop.is_set()
        progress.done()
        # The callers stop; what is in flight comes back; then every call hangs up at once.
        final = await legs.ask({"op": "stop"})
        if not self.data.interrupted:
            await asyncio.sleep(TAIL_S)
        wall = self.now()
        self.data.wall_s = wall
        now = os.times()
        await self._scrape(url, previous, wall)
        with contextlib.suppress(Exception):
            last = parse_engine_metrics(await fetch_metrics(*metrics_url(url)))
            self._engine_totals(first, last)
        await self._hang_up_all()
        self._sample(wall)
        engine_cpu1 = proc_cpu_s(engine_proc.pid) if engine_proc else None
        self.data.cpu_percent = {
            "bridge": round(100.0 * (now.user - cpu0.user + now.system - cpu0.system) / wall, 1),
            "engine": round(100.0 * (engine_cpu1 - engine_cpu0) / wall, 1)
            if engine_cpu0 is not None and engine_cpu1 is not None
            else None,
            "callers": round(100.0 * float(final.get("cpu_s", 0.0)) / wall, 1),
        }
        self._finish_calls(final.get("legs", {}))

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    def _up(self) -> int:
        return sum(1 for c in self.calls if c.run is not None and not c.run.done())

    def _errors(self) -> int:
        failed = sum(
            1 for c in self.calls if c.result.outcome == "refused" or (c.run is not None and c.run.done())
        )
        return failed + sum(c.media.stats.turns.unanswered for c in self.calls if c.media is not None)

    def _p95_so_far(self) -> float | None:
        values = [v for _, v in self.data.ttfb_events]
        return float(np.percentile(values, 95)) if values else None

    def _sample(self, t: float) -> None:
        self.data.concurrency.append((round(t, 3), self._up()))
        for call in self.calls:
            if call.media is None:
                continue
            ttfb = call.media.stats.turns.ttfb_ms
            for value in ttfb[call.ttfb_seen :]:
                self.data.ttfb_events.append((round(t, 3), round(value, 2)))
            call.ttfb_seen = len(ttfb)
            if call.run is not None and call.run.done() and call.result.ended_t is None:
                call.result.ended_t = round(t, 3)  # ended before the caller hung up: dropped

    def _last_step_stable(self, lo: float, hi: float) -> bool:
        ttfb = [v for t, v in self.data.ttfb_events if lo <= t < hi]
        if self._errors():
            return False
        return not ttfb or float(np.percentile(ttfb, 95)) <= self.opts.thresholds.ttfb_p95_ms

    async def _scrape(self, url: str, previous: EngineMetrics, t: float) -> EngineMetrics:
        try:
            current = parse_engine_metrics(await fetch_metrics(*metrics_url(url)))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return previous  # one missed scrape is a gap in the plot, not an error of the run
        record_engine_interval(self.data, previous, current, t)
        return current

    def _engine_totals(self, first: EngineMetrics, last: EngineMetrics) -> None:
        record_engine_totals(self.data, first, last)

    async def _hang_up_all(self) -> None:
        for call in self.calls:
            if call.media is not None:
                await call.media.stop()
        for call in self.calls:
            if call.run is not None:
                with contextlib.suppress(Exception):
                    await call.run
            if call.engine is not None:
                with contextlib.suppress(Exception):
                    await call.engine.close()

    def _finish_calls(self, legs: dict[str, Any]) -> None:
        for call in self.calls:
            result = call.result
            self.data.calls.append(result)
            if call.media is None or call.run is None:
                continue
            stats = call.media.stats
            result.turns, result.unanswered = stats.turns.turns, stats.turns.unanswered
            result.ttfb_ms = [round(v, 2) for v in stats.turns.ttfb_ms]
            if stats.added_latency_ms.count:
                result.added_latency_p50_ms = round(stats.added_latency_ms.percentile(50), 2)
                result.added_latency_p99_ms = round(stats.added_latency_ms.percentile(99), 2)
            if stats.jitter_delay_ms.count:
                result.jitter_buffer_p50_ms = round(stats.jitter_delay_ms.percentile(50), 2)
                result.jitter_buffer_p99_ms = round(stats.jitter_delay_ms.percentile(99), 2)
            reason = call.run.result() if call.run.done() and not call.run.cancelled() else None
            result.end_reason = reason
            leg = legs.get(str(result.id), {})
            result.pacing_p99_ms = leg.get("pacing_p99_ms")
            result.packets_sent = int(leg.get("packets_sent", 0))
            result.packets_received = int(leg.get("packets_received", 0))
            if reason not in (None, "stopped"):
                result.outcome = "dropped"
            elif result.packets_received == 0 or float(leg.get("received_rms", 0.0)) < 30.0:
                result.outcome = "no_audio"
            if result.ended_t is None or result.outcome == "ok":
                result.ended_t = round(self.data.wall_s, 3)


def _config(opts: Options) -> dict[str, Any]:
    return {
        "calls": opts.calls,
        "seconds": opts.seconds,
        "ramp": opts.ramp,
        "via": opts.via,
        "quick": opts.quick,
        "audio": str(opts.audio) if opts.audio else "bundled speech sample",
        "engine_url": opts.engine_url or "echo engine started by the load test",
        "seed": opts.seed,
    }


def _check_report_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".aziza-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LoadTestError(f"cannot write the report to {folder}: {exc.strerror or exc}") from None


def _check_audio(path: Path | None) -> None:
    from admin_cli.loadtest_legs import load_caller_speech

    if path is None:
        return
    try:
        load_caller_speech(str(path))
    except AudioFileError as exc:
        raise LoadTestError(f"caller audio: {exc}") from None


async def run_loadtest(opts: Options) -> tuple[dict[str, Any], Path, Path]:
    """Run, then write the report (also after Ctrl-C); the report and where it went."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        if opts.via == "sip":
            from admin_cli.loadtest_sip import run_sip

            data = await run_sip(opts, stop)
        else:
            data = await RtpRun(opts, stop).run()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
    window = 5.0 if opts.quick else 10.0
    report = build_report(data, opts.thresholds, window)
    json_path, html_path = write_report(report, opts.report_dir)
    return report, json_path, html_path


@click.command("loadtest")
@click.option(
    "--calls",
    type=click.IntRange(1, 500),
    default=10,
    show_default=True,
    help="Simultaneous calls (with --ramp: the most it ramps to).",
)
@click.option("--minutes", type=click.FloatRange(0.05, 24 * 60), default=10.0, show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(3, 24 * 3600),
    default=None,
    help="Run length in seconds (instead of --minutes).",
)
@click.option(
    "--ramp",
    is_flag=True,
    help="Add one call per step until TTFB p95 passes the threshold or errors "
    "appear (max stable concurrency).",
)
@click.option("--via", type=click.Choice(["rtp", "sip"]), default="rtp", show_default=True)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for report.json and report.html (default: ./loadtest-<time>).",
)
@click.option("--quick", is_flag=True, help="Short stability windows and no minimum run length (smoke runs).")
@click.option(
    "--audio",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The callers' speech (any audio file; default: the bundled sample).",
)
@click.option(
    "--engine-url", default=None, help="--via rtp: a running engine (default: start an echo engine)."
)
@click.option("--max-p95-ms", type=float, default=120.0, show_default=True, help="TTFB p95 criterion.")
@click.option("--max-error-rate", type=float, default=0.001, show_default=True)
@click.option(
    "--min-stable",
    type=int,
    default=8,
    show_default=True,
    help="Stable sessions required (or every call, when fewer are placed).",
)
@click.option(
    "--min-minutes", type=float, default=None, help="Run length required (default 10, 0 with --quick)."
)
@click.option(
    "--bridge-url", default=None, help="--via sip: the running bridge's control API (its /metrics)."
)
@click.option(
    "--sip-target", default="127.0.0.1:5060", show_default=True, help="--via sip: Asterisk's SIP address."
)
@click.option("--did", default=None, help="--via sip: the number to dial (a DID routed to the aziza app).")
@click.option("--json", "as_json", is_flag=True, help="Print the report's summary as JSON.")
def loadtest(
    calls: int,
    minutes: float,
    seconds: float | None,
    ramp: bool,
    via: str,
    report_dir: Path | None,
    quick: bool,
    audio: Path | None,
    engine_url: str | None,
    max_p95_ms: float,
    max_error_rate: float,
    min_stable: int,
    min_minutes: float | None,
    bridge_url: str | None,
    sip_target: str,
    did: str | None,
    as_json: bool,
) -> None:
    """Calls with turns through bridge and engine; report.json + report.html; exit 1 if a criterion fails."""
    folder = report_dir or Path(f"loadtest-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    _check_report_dir(folder)
    _check_audio(audio)
    thresholds = Thresholds(
        ttfb_p95_ms=max_p95_ms,
        error_rate=max_error_rate,
        min_stable_sessions=min_stable,
        min_minutes=min_minutes if min_minutes is not None else (0.0 if quick else 10.0),
    )
    opts = Options(
        calls,
        seconds if seconds is not None else minutes * 60.0,
        ramp,
        via,
        folder,
        quick,
        audio,
        engine_url,
        thresholds,
    )
    if via == "sip":
        from admin_cli.loadtest_sip import check_sip_prerequisites

        check_sip_prerequisites(bridge_url, sip_target, did)
        opts.sip = {"bridge_url": bridge_url, "target": sip_target, "did": did}
    report, json_path, html_path = asyncio.run(run_loadtest(opts))
    summary = {
        k: report[k]
        for k in (
            "passed",
            "interrupted",
            "calls",
            "calls_ok",
            "turns",
            "ttfb_ms",
            "max_stable_concurrency",
            "error_rate",
            "criteria",
        )
    }
    if as_json:
        click.echo(json.dumps({**summary, "report_json": str(json_path), "report_html": str(html_path)}))
    else:
        ttfb = report["ttfb_ms"]
        click.echo(
            f"{'PASS' if report['passed'] else 'FAIL'}{' (interrupted)' if report['interrupted'] else ''}: "
            f"{report['calls_ok']}/{report['calls']} calls ok, {report['turns']} turns, TTFB p50/p95/p99 "
            f"{ttfb['p50']}/{ttfb['p95']}/{ttfb['p99']} ms, max stable concurrency "
            f"{report['max_stable_concurrency']}, error rate {report['error_rate']}"
        )
        for c in report["criteria"]:
            click.echo(
                f"  {'ok  ' if c['pass'] else 'FAIL'} {c['name']}: {c['value']} {c['op']} {c['threshold']:g}"
            )
        click.echo(f"report: {json_path} {html_path}")
    if report["interrupted"]:
        sys.exit(130)
    if not report["passed"]:
        sys.exit(1)
