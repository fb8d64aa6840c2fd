"""``aziza-admin demo`` and ``aziza-admin bench media``: the media path end to end on one machine.

demo: the echo engine (in this process, or ``--engine-url``), one CallMedia endpoint and one simulated
Asterisk leg playing the bundled speech sample over real RTP on loopback; what comes back goes to a WAV.

bench media: N simultaneous calls. Three processes, so that the CPU measured is the bridge's alone:
this process runs the N CallMedia endpoints (the bridge), ``aziza-engine`` (echo) runs as a subprocess, and
the N simulated legs run in a third process (``python -m admin_cli.media_cmds``), which talks to this one with
JSON lines on stdin/stdout: it prints its ports, waits for "go", runs, prints its measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from pydantic import ValidationError

from admin_cli.procs import end_process, host_cpu_percent, host_cpu_ticks, proc_cpu_s, proc_cpu_split_s
from bridge import native
from bridge.config import BridgeSettings
from bridge.engine_client import EngineMux, EngineSession
from bridge.media.assets import load_speech_8k
from bridge.media.audio_file import write_pcm16_wav
from bridge.media.call_media import CallMedia
from bridge.media.metrics import Histogram, merge_histograms
from bridge.media.simleg import SimLeg
from bridge.media.workers import MediaWorkerPool, WorkerEngine, WorkerMedia
from bridge.startup import freeze_startup_heap, media_scheduling, process_scheduling
from engine.config import EngineSettings
from engine.protocol import PersonaParams

DEFAULT_WAV = "aziza-demo-out.wav"
# The echo engine steps each frame as it comes: batching buys an echo nothing, and a window would add
# 0..window ms of jitter to a backend whose delay is meant to be fixed (the Moshi engine batches; its
# step time is the engine's own delay, which the added-latency figure leaves out).
ECHO_BATCH_WINDOW_MS = 0


@contextlib.asynccontextmanager
async def _engine(url: str | None, slots: int) -> AsyncIterator[str]:
    """The given engine URL, or an in-process echo engine on a private Unix socket."""
    if url:
        yield url
        return
    from engine.server import run_engine  # imported only when the demo starts its own engine

    with tempfile.TemporaryDirectory(prefix="aziza-demo-") as tmp:
        settings = EngineSettings(unix_socket=str(Path(tmp) / "engine.sock"), num_slots=slots,
                                  batch_window_ms=ECHO_BATCH_WINDOW_MS)
        async with run_engine(settings) as engine_url:
            yield engine_url


def _bridge_settings(
    media_tick_ms: float | None = None, engine_mux: bool | None = None, realtime_priority: int | None = None,
) -> BridgeSettings:
    fields: dict[str, object] = {"rtp_port_min": 40000, "rtp_port_max": 49999}
    if realtime_priority is not None:
        fields["media_realtime_priority"] = realtime_priority
    if media_tick_ms is not None:
        fields["media_tick_ms"] = media_tick_ms
    if engine_mux is not None:
        fields["engine_mux"] = engine_mux
    return BridgeSettings.model_validate(fields)



async def _demo(seconds: float | None, out: Path, engine_url: str | None) -> dict[str, Any]:
    speech = load_speech_8k()
    duration = seconds if seconds is not None else len(speech) / 8000 + 0.5
    async with _engine(engine_url, slots=2) as url:
        engine = await EngineSession.open(url, None, "demo")
        try:
            media = CallMedia(_bridge_settings(), engine, "demo")
            async with SimLeg(None, speech) as leg:
                leg.set_remote(await media.bind())
                media.lock_remote(*leg.local_address)
                freeze_startup_heap()
                run = asyncio.create_task(media.run())
                await leg.run(duration, tail_s=0.3)
                await media.stop()
                reason = await run
        finally:
            await engine.close()
    write_pcm16_wav(out, leg.received_audio_8k(), 8000)
    stats = media.stats
    snap = media.snapshot()
    return {
        "frames_sent": stats.frames_to_engine,
        "frames_received": stats.frames_from_engine,
        "lost_frames": stats.engine_frames_lost,
        "rtp_packets_sent": leg.packets_sent,
        "rtp_packets_received": leg.packets_received,
        "lost_packets": leg.sequence_gaps,
        "added_latency_p50_ms": round(stats.added_latency_ms.percentile(50), 2),
        "added_latency_p99_ms": round(stats.added_latency_ms.percentile(99), 2),
        "jitter_buffer_delay_p50_ms": round(stats.jitter_delay_ms.percentile(50), 2),
        "jitter_buffer_delay_p99_ms": round(stats.jitter_delay_ms.percentile(99), 2),
        "resampler_delay_ms": snap["resampler_delay_ms"],
        "pacing_jitter_p99_ms": round(leg.pacing_jitter_ms_p99, 3),
        "rtp_timestamp_errors": leg.timestamp_errors,
        # Slots the output had to skip after a stall of this process (each makes timestamp errors after it).
        "pacer_skipped": stats.rtp_out_skipped,
        "end_reason": reason,
        "output_wav": str(out),
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_WAV,
              show_default=True, help="Where to write the audio that came back (8 kHz WAV).")
@click.option("--seconds", type=click.FloatRange(0.5, 600), default=None,
              help="How long the simulated caller sends (default: the speech sample plus 0.5 s).")
@click.option("--engine-url", default=None, help="Use a running engine (ws://... or unix://...) instead "
              "of an in-process echo engine.")
def demo(as_json: bool, out: Path, seconds: float | None, engine_url: str | None) -> None:
    """Play the bundled speech through the echo engine over real RTP on loopback; write what came back."""
    try:
        result = asyncio.run(_demo(seconds, out, engine_url))
    except Exception as exc:  # a clear message, not a traceback, for an operator
        raise click.ClickException(f"demo failed: {type(exc).__name__}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"call: {result['frames_sent']} frames to the engine, {result['frames_received']} back, "
        f"{result['lost_frames']} lost; RTP {result['rtp_packets_sent']} sent, "
        f"{result['rtp_packets_received']} received, {result['lost_packets']} lost ({result['end_reason']})\n"
        f"added latency (bridge in + out): p50 {result['added_latency_p50_ms']} ms, "
        f"p99 {result['added_latency_p99_ms']} ms; jitter buffer p50 {result['jitter_buffer_delay_p50_ms']} "
        f"ms; resampling {result['resampler_delay_ms']} ms\n"
        f"output pacing |interval - 20 ms| p99: {result['pacing_jitter_p99_ms']} ms; "
        f"RTP timestamp errors: {result['rtp_timestamp_errors']}\n"
        f"wrote {result['output_wav']}"
    )


# -- bench media --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_echo_engine_process(
    slots: int, unix_socket: str | None = None, batch_window_ms: float = ECHO_BATCH_WINDOW_MS
) -> tuple[asyncio.subprocess.Process, str]:
    """``aziza-engine --backend echo`` as a child, unbatched, on a free loopback port or on ``unix_socket``;
    (process, session URL) once it accepts connections (bench media and the load test)."""
    port = _free_port()
    where = ["--unix-socket", unix_socket] if unix_socket else ["--host", "127.0.0.1", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.server", *where,
        "--backend", "echo", "--slots", str(slots), "--batch-window-ms", str(batch_window_ms),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"unix://{unix_socket}" if unix_socket else f"ws://127.0.0.1:{port}/session"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if unix_socket:
                _r, w = await asyncio.open_unix_connection(unix_socket)
            else:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return proc, url
        except OSError:
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    raise click.ClickException("aziza-engine did not start")


async def _read_json_line(stream: asyncio.StreamReader) -> Any:
    line = await stream.readline()
    if not line:
        raise click.ClickException("the simulated legs process ended early")
    return json.loads(line)


_HISTOGRAMS = ("added_latency_ms", "latency_in_ms", "latency_out_ms", "jitter_delay_ms", "send_lateness_ms",
               "socket_wait_ms")
_COUNTERS = (
    "frames_to_engine", "frames_from_engine", "engine_frames_lost", "rtp_out", "rtp_out_silence",
    "rtp_out_skipped", "rtp_out_late_dropped", "rtp_out_expanded", "rtp_out_shrunk", "rtp_out_kept",
    "rtp_out_waited", "rtp_out_wait_expired", "rtp_out_resyncs", "margins_unobserved", "junk_floods",
    "rtp_in", "rtp_in_rephased", "rtp_in_won_back",
)


class _BridgeShare:
    """The bridge side of the benchmark for some of the calls: their CallMedia endpoints in this process."""

    def __init__(self, url: str, calls: int, first: int, settings: BridgeSettings) -> None:
        self.url, self.calls, self.first = url, calls, first
        self.settings = settings
        self.medias: list[CallMedia] = []
        self.engines: list[EngineSession] = []
        self.runs: list[asyncio.Task[str]] = []
        self._cpu0 = os.times()
        self.mux = EngineMux(url) if settings.engine_mux else None  # (as the bridge's EnginePool opens them)

    async def open(self) -> list[int]:
        for i in range(self.first, self.first + self.calls):
            if self.mux is not None:
                self.engines.append(await self.mux.open(None, f"bench-{i}"))
            else:
                self.engines.append(await EngineSession.open(self.url, None, f"bench-{i}"))
            self.medias.append(CallMedia(self.settings, self.engines[-1], f"bench-{i}"))
        return [(await m.bind())[1] for m in self.medias]

    def lock(self, leg_ports: list[int]) -> None:
        for media, port in zip(self.medias, leg_ports, strict=True):
            media.lock_remote("127.0.0.1", port)

    def media_pids(self) -> list[int]:
        return [os.getpid()]

    def start(self) -> None:
        freeze_startup_heap()
        self.runs = [asyncio.create_task(m.run()) for m in self.medias]
        self._cpu0 = os.times()

    async def stop(self) -> dict[str, Any]:
        """Hang every call up at once, as callers would; this share's numbers (JSON-able)."""
        now = os.times()
        user, system = now.user - self._cpu0.user, now.system - self._cpu0.system
        await asyncio.gather(*(m.stop() for m in self.medias))
        reasons = await asyncio.gather(*self.runs)
        stats = [m.stats for m in self.medias]
        mux = self.mux.mux if self.mux is not None else None
        return {
            "engine_frames_per_message": round(mux.frames_out / mux.messages_out, 2)
            if mux is not None and mux.messages_out else None,
            "engine_frames_per_message_in": round(mux.frames_in / mux.messages_in, 2)
            if mux is not None and mux.messages_in else None,
            "cpu_s": user + system,
            "cpu_system_s": system,
            "carried": sum(1 for m, r in zip(self.medias, reasons, strict=True)
                           if r == "stopped" and m.stats.frames_from_engine),
            "histograms": {name: merge_histograms(stats, name).to_sparse() for name in _HISTOGRAMS},
            "counters": {name: sum(getattr(st, name) for st in stats) for name in _COUNTERS},
            "round_trip_end_vs_start_ms": [m.ledger.round_trip_end_vs_start_ms() for m in self.medias],
            "junk_dropped": sum(n for st in stats for why, n in st.rtp_dropped.items() if why != "held"),
        }

    async def close(self) -> None:
        for m in self.medias:
            await m.stop()
        for e in self.engines:
            await e.close()
        if self.mux is not None:
            await self.mux.aclose()


class _PoolShare:
    """The calls on the bridge's own media workers (``bridge.media_workers``; bridge/media/workers.py),
    placed as the bridge places them: the benchmark measures what the appliance runs."""

    def __init__(self, url: str, calls: int, workers: int, settings: BridgeSettings) -> None:
        settings = settings.model_copy(update={"engine_url": url})
        self.pool = MediaWorkerPool(settings, workers, log_level="WARNING")  # no line per call in the report
        self.calls = calls
        self.engines: list[WorkerEngine] = []
        self.medias: list[WorkerMedia] = []
        self.runs: list[asyncio.Task[str]] = []
        self._stack = contextlib.AsyncExitStack()
        self._cpu0: dict[int, tuple[float, float]] = {}

    async def open(self) -> list[int]:
        await self._stack.enter_async_context(self.pool.running())
        ports = []
        for i in range(self.calls):
            engine = await self.pool.open_engine(PersonaParams(), f"bench-{i}")
            assert isinstance(engine, WorkerEngine)
            media = self.pool.make_media(engine, f"bench-{i}")
            assert isinstance(media, WorkerMedia)
            self.engines.append(engine)
            self.medias.append(media)
            ports.append((await media.bind())[1])
        return ports

    def lock(self, leg_ports: list[int]) -> None:
        for media, port in zip(self.medias, leg_ports, strict=True):
            media.lock_remote("127.0.0.1", port)

    def media_pids(self) -> list[int]:
        return [w.pid for w in self.pool.workers if w.pid is not None]

    def _cpu(self) -> dict[int, tuple[float, float]]:
        return {pid: proc_cpu_split_s(pid) or (0.0, 0.0) for pid in self.media_pids()}

    def start(self) -> None:
        self.runs = [asyncio.create_task(m.run()) for m in self.medias]
        self._cpu0 = self._cpu()

    async def stop(self) -> dict[str, Any]:
        now = self._cpu()
        user = sum(now[pid][0] - self._cpu0.get(pid, (0.0, 0.0))[0] for pid in now)
        system = sum(now[pid][1] - self._cpu0.get(pid, (0.0, 0.0))[1] for pid in now)
        await asyncio.gather(*(m.stop() for m in self.medias))
        reasons = await asyncio.gather(*self.runs)
        snaps = [m.snapshot() for m in self.medias]
        hists = {name: Histogram() for name in _HISTOGRAMS}
        for media in self.medias:
            for name in _HISTOGRAMS:
                if name in media.histograms:
                    hists[name].merge(Histogram.from_sparse(media.histograms[name]))
        return {
            "cpu_s": user + system,
            "cpu_system_s": system,
            "carried": sum(1 for snap, r in zip(snaps, reasons, strict=True)
                           if r == "stopped" and snap.get("frames_from_engine")),
            "histograms": {name: hist.to_sparse() for name, hist in hists.items()},
            "counters": {name: sum(int(snap.get(name, 0)) for snap in snaps) for name in _COUNTERS},
            "round_trip_end_vs_start_ms": [snap.get("round_trip_end_vs_start_ms") for snap in snaps],
            "junk_dropped": sum(n for snap in snaps for why, n in snap.get("rtp_dropped", {}).items()
                                if why != "held"),
        }

    async def close(self) -> None:
        for m in self.medias:
            await m.stop()
        for e in self.engines:
            await e.close()
        await self._stack.aclose()


async def _bench(
    calls: int, seconds: float, loss: float, jitter_ms: float, aligned: bool = False, workers: int = 1,
    junk_pps: float = 0.0, engine_link: str = "tcp", engine_window_ms: float = ECHO_BATCH_WINDOW_MS,
    settings: BridgeSettings | None = None, engine_realtime_priority: int = 0,
) -> dict[str, Any]:
    settings = settings or _bridge_settings()
    sock_dir = tempfile.TemporaryDirectory(prefix="aziza-bench-") if engine_link == "unix" else None
    engine_proc, url = await start_echo_engine_process(
        calls, unix_socket=f"{sock_dir.name}/engine.sock" if sock_dir is not None else None,
        batch_window_ms=engine_window_ms)
    # The echo engine stands for a GPU engine; on these shared cores the kernel otherwise ran its wake-ups
    # late beside the callers (the media preempts it at its own priority, one higher), and the bridge took
    # the late answers for its own added latency: 29-85 calls expanded together in 3 of 10 200-call runs.
    engine_scheduling = media_scheduling(engine_realtime_priority, engine_proc.pid)
    legs_proc: asyncio.subprocess.Process | None = None
    shares: list[_BridgeShare | _PoolShare] = [
        _BridgeShare(url, calls, 0, settings) if workers <= 1 else _PoolShare(url, calls, workers, settings)]
    try:
        share_ports = await asyncio.gather(*(share.open() for share in shares))
        bridge_ports = [port for ports in share_ports for port in ports]
        legs_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "admin_cli.media_cmds",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # the legs' report carries every inter-packet interval
        )
        assert legs_proc.stdin is not None and legs_proc.stdout is not None
        config = {"ports": bridge_ports, "seconds": seconds, "loss": loss, "jitter_ms": jitter_ms,
                  "aligned": aligned, "junk_pps": junk_pps}
        legs_proc.stdin.write((json.dumps(config) + "\n").encode())
        await legs_proc.stdin.drain()
        leg_ports = await _read_json_line(legs_proc.stdout)
        pos = 0
        for share, ports in zip(shares, share_ports, strict=True):
            share.lock(leg_ports[pos : pos + len(ports)])
            pos += len(ports)
        for share in shares:
            share.start()
        children = {"engine": engine_proc.pid, "legs": legs_proc.pid}
        scheduling = sorted({process_scheduling(pid) for share in shares for pid in share.media_pids()})
        child_cpu0 = {name: (proc_cpu_s(pid) or 0.0) for name, pid in children.items()}
        wall0, host0 = time.monotonic(), host_cpu_ticks()
        legs_proc.stdin.write(b"go\n")
        await legs_proc.stdin.drain()
        await _read_json_line(legs_proc.stdout)  # every leg has stopped sending: the callers hang up
        wall = time.monotonic() - wall0
        host = host_cpu_percent(host0, host_cpu_ticks(), wall)
        child_cpu = {name: (proc_cpu_s(pid) or 0.0) - child_cpu0[name] for name, pid in children.items()}
        # All at once, as a hang-up would: calls left running while the legs write their report would measure
        # the bridge beside a legs process busy with that, not beside callers.
        results = await asyncio.gather(*(share.stop() for share in shares))
        legs = await _read_json_line(legs_proc.stdout)
        child_cpu["legs"] = float(legs.get("cpu_s", child_cpu["legs"]))
    finally:
        for share in shares:
            await share.close()
        await end_process(legs_proc)
        await end_process(engine_proc)
        if sock_dir is not None:
            sock_dir.cleanup()
    report = _bench_report(calls, seconds, loss, jitter_ms, aligned, workers, results, legs, wall, child_cpu)
    # The whole machine over the run (100 = one core): steal is a virtual machine's CPU time taken by its
    # host; with it high, pacing measures the hypervisor, so compare runs only at like steal.
    report["host_steal_percent"] = host["steal"] if host else None
    report["host_idle_percent"] = host["idle"] if host else None
    report["junk_pps_per_call"] = junk_pps
    report["engine_window_ms"] = engine_window_ms
    report["media_tick_ms"] = settings.media_tick_ms
    report["media_scheduling"] = ",".join(scheduling)  # the media processes': "rr:5" (SCHED_RR), or "normal"
    report["engine_scheduling"] = engine_scheduling
    report["engine_mux"] = settings.engine_mux
    # "compiled" (mypyc: bridge/native.py), or "sources" (AZIZA_PURE_PYTHON=1, or installed AZIZA_NATIVE=0)
    report["media_modules"] = "compiled" if native.compiled_modules() else "sources"
    for key in ("engine_frames_per_message", "engine_frames_per_message_in"):  # (frames to / from the engine)
        report[key] = next((r[key] for r in results if r.get(key)), None)
    report["junk_dropped"] = sum(r["junk_dropped"] for r in results)
    report["junk_floods"] = sum(r["counters"]["junk_floods"] for r in results)
    report["rtp_in"] = sum(r["counters"]["rtp_in"] for r in results)
    return report


def _largest(values: list[float]) -> float | None:
    """The value furthest from zero (sign kept), rounded; None for none."""
    if not values:
        return None
    furthest = max(values, key=lambda v: abs(float(v)))
    return round(float(furthest), 2)


def _bench_report(
    calls: int, seconds: float, loss: float, jitter_ms: float, aligned: bool, workers: int,
    results: list[dict[str, Any]], legs: dict[str, Any], wall: float, child_cpu: dict[str, float],
) -> dict[str, Any]:
    hist: dict[str, Histogram] = {}
    for name in _HISTOGRAMS:
        hist[name] = Histogram()
        for r in results:
            hist[name].merge(Histogram.from_sparse(r["histograms"][name]))
    count = {name: sum(r["counters"][name] for r in results) for name in _COUNTERS}
    pacing = Histogram()
    for value in legs["pacing_jitter_ms"]:
        pacing.add(value)
    end_vs_start: list[float] = [v for r in results for v in r["round_trip_end_vs_start_ms"] if v is not None]
    cpu_percent = 100.0 * sum(r["cpu_s"] for r in results) / wall
    return {
        "calls": calls,
        "calls_carried": sum(r["carried"] for r in results),
        "workers": max(1, workers),
        "seconds": seconds,
        "loss": loss,
        "jitter_ms": jitter_ms,
        "call_phases": "aligned" if aligned else "staggered",
        "added_latency_p50_ms": round(hist["added_latency_ms"].percentile(50), 2),
        "added_latency_p99_ms": round(hist["added_latency_ms"].percentile(99), 2),
        "latency_in_p99_ms": round(hist["latency_in_ms"].percentile(99), 2),
        "latency_out_p99_ms": round(hist["latency_out_ms"].percentile(99), 2),
        "jitter_buffer_delay_p50_ms": round(hist["jitter_delay_ms"].percentile(50), 2),
        "jitter_buffer_delay_p99_ms": round(hist["jitter_delay_ms"].percentile(99), 2),
        # Of that: datagram arrival (the kernel's stamp) → read, with the socket read on the media tick.
        "socket_wait_p50_ms": round(hist["socket_wait_ms"].percentile(50), 2),
        "socket_wait_p99_ms": round(hist["socket_wait_ms"].percentile(99), 2),
        "pacing_jitter_p99_ms": round(pacing.percentile(99), 3),
        "pacing_jitter_max_ms": round(pacing.max_seen_ms, 3),
        # How late the bridge's own pacer woke for its deadlines (event-loop lag), p99 over all packets.
        "send_lateness_p99_ms": round(hist["send_lateness_ms"].percentile(99), 3),
        "lost_frames": count["engine_frames_lost"],
        "lost_packets": legs["sequence_gaps"],
        "rtp_timestamp_errors": legs["timestamp_errors"],
        "rtp_timestamp_drift_ms_max": round(legs["timestamp_drift_ms_max"], 3),
        "frames_to_engine": count["frames_to_engine"],
        "frames_from_engine": count["frames_from_engine"],
        "output_underruns": count["rtp_out_silence"],
        "output_resyncs": count["rtp_out_resyncs"],
        # Slots inserted into calls' output timelines (late frames played whole), won back, and kept.
        "output_expanded": count["rtp_out_expanded"],
        "output_shrunk": count["rtp_out_shrunk"],
        "output_kept": count["rtp_out_kept"],
        "output_late_dropped": count["rtp_out_late_dropped"],
        "output_waited": count["rtp_out_waited"],
        "output_wait_expired": count["rtp_out_wait_expired"],
        "margins_unobserved": count["margins_unobserved"],
        "output_packets": count["rtp_out"],
        # Times a call's input grid moved earlier because every packet waited (delay given back, inbound.py).
        "input_rephased": count["rtp_in_rephased"],
        # Input slots won back: a quiet packet cut after an underrun had put the stream a slot behind.
        "input_won_back": count["rtp_in_won_back"],
        "pacer_skipped": count["rtp_out_skipped"],
        # Each call's round trip inside the bridge (first packet of a frame in -> its answer's first packet
        # out), median of its last 2 s minus its first 2 s: delay gained and never given back.
        "round_trip_end_vs_start_ms_max": _largest(end_vs_start),
        "round_trip_end_vs_start_ms_mean": round(sum(end_vs_start) / len(end_vs_start), 2)
        if end_vs_start else None,
        "cpu_percent": round(cpu_percent, 1),
        "cpu_percent_per_call": round(cpu_percent / calls, 3),
        # (of which in the kernel: system calls, and on loopback the far end's receive path too)
        "cpu_system_percent": round(100.0 * sum(r["cpu_system_s"] for r in results) / wall, 1),
        "engine_cpu_percent": round(100.0 * child_cpu["engine"] / wall, 1),
        "legs_cpu_percent": round(100.0 * child_cpu["legs"] / wall, 1),
        "cpu_note": "cpu_percent: the bridge process(es) alone, all workers together (engine and legs run in "
        "their own processes); 100 = one core",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


@click.command("media")
@click.option("--calls", type=click.IntRange(1, 500), default=1, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 3600), default=10, show_default=True)
@click.option("--loss", type=click.FloatRange(0, 0.5), default=0.0, help="Packet loss the legs inject.")
@click.option("--jitter-ms", type=click.FloatRange(0, 500), default=0.0, help="Send jitter the legs inject.")
@click.option("--aligned", is_flag=True, help="Start every call's RTP at the same instant (worst case: all "
              "calls' packets and 80 ms frames in lockstep) instead of at phases spread over one frame.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Media worker processes (bridge.media_workers) carrying the calls; 1: they run in this "
              "process.")
@click.option("--junk-pps", type=click.FloatRange(0, 100000), default=0.0,
              help="Spoofed junk datagrams a second each leg sends from its own address (the call's source).")
@click.option("--engine-link", type=click.Choice(["tcp", "unix"]), default="tcp", show_default=True,
              help="The engine sessions' WebSockets over loopback TCP or a Unix socket.")
@click.option("--engine-window-ms", type=click.FloatRange(0, 200), default=ECHO_BATCH_WINDOW_MS,
              show_default=True,
              help="The echo engine's batching window (engine.batch_window_ms; the appliance's default is "
              "20): its rounds and their effect on each call's round trip, as a batched Moshi engine's.")
@click.option("--tick-ms", "media_tick_ms", type=float, default=None,
              help="The bridge's media clock tick (bridge.media_tick_ms; default: the setting's, 4): the "
              "calls due in a tick share one wake-up; 0: each at its own instant.")
@click.option("--engine-mux/--no-engine-mux", default=None,
              help="Engine sessions as channels of one WebSocket (bridge.engine_mux; default: the setting's, "
              "on) or a WebSocket each.")
@click.option("--realtime-priority", type=click.IntRange(0, 99), default=None,
              help="SCHED_RR priority of the media processes (bridge.media_realtime_priority; default: the "
              "setting's, 5); 0: normal scheduling. The engine and the callers run normally either way.")
@click.option("--engine-realtime-priority", type=click.IntRange(0, 99), default=4, show_default=True,
              help="SCHED_RR priority of the echo engine, which stands for a GPU engine with cores of its "
              "own; 0: normal scheduling, beside the simulated callers.")
@click.option("--json", "as_json", is_flag=True)
def bench_media(
    calls: int, seconds: float, loss: float, jitter_ms: float, aligned: bool, workers: int, junk_pps: float,
    engine_link: str, engine_window_ms: float, media_tick_ms: float | None, engine_mux: bool | None,
    realtime_priority: int | None, engine_realtime_priority: int, as_json: bool,
) -> None:
    """N simultaneous simulated calls through the bridge (one process, or --workers) and the echo engine."""
    try:
        settings = _bridge_settings(media_tick_ms, engine_mux, realtime_priority)
    except ValidationError as exc:
        raise click.BadParameter(str(exc.errors()[0]["msg"]), param_hint="--tick-ms") from exc
    if workers <= 1:  # the calls' media runs in this process, as in a bridge with no media workers (the
        media_scheduling(settings.media_realtime_priority)  # engine and legs, started later, run normally)
    result = asyncio.run(_bench(calls, seconds, loss, jitter_ms, aligned, workers, junk_pps, engine_link,
                                engine_window_ms, settings, engine_realtime_priority))
    result["engine_link"] = engine_link
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"calls carried {result['calls_carried']}/{calls} for {seconds:g} s (loss {loss:g}, jitter "
        f"{jitter_ms:g} ms, call phases {result['call_phases']})\n"
        f"added latency p50 {result['added_latency_p50_ms']} ms, p99 "
        f"{result['added_latency_p99_ms']} ms; jitter buffer p50 {result['jitter_buffer_delay_p50_ms']} ms, "
        f"p99 {result['jitter_buffer_delay_p99_ms']} ms\npacing |interval - 20 ms| p99 "
        f"{result['pacing_jitter_p99_ms']} ms (max {result['pacing_jitter_max_ms']} ms; bridge wake-up "
        f"lateness p99 {result['send_lateness_p99_ms']} ms); lost frames "
        f"{result['lost_frames']}, lost packets {result['lost_packets']}, timestamp errors "
        f"{result['rtp_timestamp_errors']}\noutput slots inserted {result['output_expanded']}, won back "
        f"{result['output_shrunk']}, kept {result['output_kept']}; round trip end - start: max "
        f"{result['round_trip_end_vs_start_ms_max']} ms, mean "
        f"{result['round_trip_end_vs_start_ms_mean']} ms\n"
        f"CPU (100 = one core): bridge {result['cpu_percent']} % ({result['workers']} process(es), "
        f"{result['cpu_percent_per_call']} % a call), engine "
        f"{result['engine_cpu_percent']} %, legs {result['legs_cpu_percent']} %; load average "
        f"{result['load_average_1m']}; host: steal {result['host_steal_percent']} %, idle "
        f"{result['host_idle_percent']} %; scheduling: media {result['media_scheduling']}, engine "
        f"{result['engine_scheduling']}"
    )


# -- the legs process of the benchmark ---------------------------------------------------------------------


async def _run_leg(leg: SimLeg, seconds: float, start_delay_s: float) -> None:
    if start_delay_s:
        await asyncio.sleep(start_delay_s)
    await leg.run(seconds)


async def _legs_main() -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    speech = load_speech_8k()
    audio = np.tile(speech, 1 + int(config["seconds"] * 8000) // len(speech))
    reorder = 0.02 if config["jitter_ms"] else 0.0
    legs = [
        SimLeg(("127.0.0.1", port), audio, loss=config["loss"], jitter_ms=config["jitter_ms"],
               reorder=reorder, junk_pps=config.get("junk_pps", 0.0), seed=i)
        for i, port in enumerate(config["ports"])
    ]
    try:
        ports = [(await leg.bind())[1] for leg in legs]
        freeze_startup_heap()  # the legs' sending cadence must not pause for collections either
        # ...nor for the ones that walk what the legs keep of every packet received (a ReceivedPacket each, a
        # tracked object: 100,000 in 10 s at 200 calls). Such a full collection stopped this process for 15 ms
        # 8.85 s into every 200-call run: the callers' packets came late together, and the bridge's answers
        # with them, which it measured as its own added latency. Asterisk, the caller this stands for, has
        # no such pause; the legs make no garbage that needs the cycle collector within a run.
        gc.disable()
        print(json.dumps(ports), flush=True)
        await reader.readline()  # "go"
        cpu0 = time.process_time()
        # Real calls start at unrelated instants, so their packets and 80 ms frame boundaries fall at
        # phases spread over a frame; --aligned starts them all at once (every call's work in one burst).
        spread_s = 0.0 if config.get("aligned") else 0.080
        # Every leg stops sending at the same instant (the later a leg starts, the less it sends), so that
        # the bridge can hang every call up at once with no leg left silent beforehand.
        await asyncio.gather(*(
            _run_leg(leg, config["seconds"] + spread_s - start, start)
            for leg, start in zip(legs, (i * spread_s / len(legs) for i in range(len(legs))), strict=True)
        ))
        cpu_sending = time.process_time() - cpu0
        print(json.dumps({"sent": True}), flush=True)
        await asyncio.sleep(0.2)  # still receiving: what was in flight when the calls were hung up
        jitter = np.concatenate([leg.pacing_jitter_ms for leg in legs])
        print(json.dumps({
            "pacing_jitter_ms": [round(float(v), 4) for v in jitter],
            "sequence_gaps": sum(leg.sequence_gaps for leg in legs),
            "timestamp_errors": sum(leg.timestamp_errors for leg in legs),
            "timestamp_drift_ms_max": max(abs(leg.timestamp_drift_ms) for leg in legs),
            "packets_received": sum(leg.packets_received for leg in legs),
            "cpu_s": cpu_sending,  # its own count: it may exit before /proc is read
        }), flush=True)
    finally:
        for leg in legs:
            leg.close()


if __name__ == "__main__":
    asyncio.run(_legs_main())
