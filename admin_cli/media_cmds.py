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
import json
import os
import socket
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from bridge.config import BridgeSettings
from bridge.engine_client import EngineSession
from bridge.media.assets import load_speech_8k
from bridge.media.call_media import CallMedia
from bridge.media.metrics import Histogram, MediaStats, merge_histograms
from bridge.media.simleg import SimLeg
from bridge.startup import freeze_startup_heap
from engine.config import EngineSettings

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


def _bridge_settings() -> BridgeSettings:
    return BridgeSettings(rtp_port_min=40000, rtp_port_max=49999)


def _write_wav(path: Path, pcm_8k: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(pcm_8k.astype("<i2").tobytes())


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
    _write_wav(out, leg.received_audio_8k())
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


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a child process has used so far; 0.0 where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_engine_process(slots: int) -> tuple[asyncio.subprocess.Process, str]:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.server", "--host", "127.0.0.1", "--port", str(port),
        "--backend", "echo", "--slots", str(slots), "--batch-window-ms", str(ECHO_BATCH_WINDOW_MS),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"ws://127.0.0.1:{port}/session"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
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


async def _bench(
    calls: int, seconds: float, loss: float, jitter_ms: float, aligned: bool = False
) -> dict[str, Any]:
    engine_proc, url = await _start_engine_process(calls)
    legs_proc: asyncio.subprocess.Process | None = None
    medias: list[CallMedia] = []
    engines: list[EngineSession] = []
    try:
        for i in range(calls):
            engines.append(await EngineSession.open(url, None, f"bench-{i}"))
            medias.append(CallMedia(_bridge_settings(), engines[-1], f"bench-{i}"))
        bridge_ports = [(await m.bind())[1] for m in medias]
        legs_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "admin_cli.media_cmds",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # the legs' report carries every inter-packet interval
        )
        assert legs_proc.stdin is not None and legs_proc.stdout is not None
        config = {"ports": bridge_ports, "seconds": seconds, "loss": loss, "jitter_ms": jitter_ms,
                  "aligned": aligned}
        legs_proc.stdin.write((json.dumps(config) + "\n").encode())
        await legs_proc.stdin.drain()
        leg_ports = await _read_json_line(legs_proc.stdout)
        for media, port in zip(medias, leg_ports, strict=True):
            media.lock_remote("127.0.0.1", port)
        freeze_startup_heap()
        runs = [asyncio.create_task(m.run()) for m in medias]
        children = {"engine": engine_proc.pid, "legs": legs_proc.pid}
        child_cpu0 = {name: _proc_cpu_s(pid) for name, pid in children.items()}
        cpu0, wall0 = time.process_time(), time.monotonic()
        legs_proc.stdin.write(b"go\n")
        await legs_proc.stdin.drain()
        await _read_json_line(legs_proc.stdout)  # every leg has stopped sending: the callers hang up
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        child_cpu = {name: _proc_cpu_s(pid) - child_cpu0[name] for name, pid in children.items()}
        # All at once, as a hang-up would: calls left running while the legs write their report would measure
        # the bridge beside a legs process busy with that, not beside callers.
        await asyncio.gather(*(m.stop() for m in medias))
        reasons = await asyncio.gather(*runs)
        legs = await _read_json_line(legs_proc.stdout)
        child_cpu["legs"] = float(legs.get("cpu_s", child_cpu["legs"]))
    finally:
        for m in medias:
            await m.stop()
        for e in engines:
            await e.close()
        for proc in (legs_proc, engine_proc):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    stats: list[MediaStats] = [m.stats for m in medias]
    added = merge_histograms(stats, "added_latency_ms")
    jitter_delay = merge_histograms(stats, "jitter_delay_ms")
    pacing = Histogram()
    for value in legs["pacing_jitter_ms"]:
        pacing.add(value)
    carried = sum(
        1 for m, r in zip(medias, reasons, strict=True) if r == "stopped" and m.stats.frames_from_engine
    )
    return {
        "calls": calls,
        "calls_carried": carried,
        "seconds": seconds,
        "loss": loss,
        "jitter_ms": jitter_ms,
        "call_phases": "aligned" if aligned else "staggered",
        "added_latency_p50_ms": round(added.percentile(50), 2),
        "added_latency_p99_ms": round(added.percentile(99), 2),
        "latency_in_p99_ms": round(merge_histograms(stats, "latency_in_ms").percentile(99), 2),
        "latency_out_p99_ms": round(merge_histograms(stats, "latency_out_ms").percentile(99), 2),
        "jitter_buffer_delay_p50_ms": round(jitter_delay.percentile(50), 2),
        "jitter_buffer_delay_p99_ms": round(jitter_delay.percentile(99), 2),
        "pacing_jitter_p99_ms": round(pacing.percentile(99), 3),
        "pacing_jitter_max_ms": round(pacing.max_seen_ms, 3),
        # How late the bridge's own pacer woke for its deadlines (event-loop lag), p99 over all packets.
        "send_lateness_p99_ms": round(merge_histograms(stats, "send_lateness_ms").percentile(99), 3),
        "lost_frames": sum(s.engine_frames_lost for s in stats),
        "lost_packets": legs["sequence_gaps"],
        "rtp_timestamp_errors": legs["timestamp_errors"],
        "rtp_timestamp_drift_ms_max": round(legs["timestamp_drift_ms_max"], 3),
        "frames_to_engine": sum(s.frames_to_engine for s in stats),
        "frames_from_engine": sum(s.frames_from_engine for s in stats),
        "output_underruns": sum(s.rtp_out_silence for s in stats),
        "output_resyncs": sum(s.rtp_out_resyncs for s in stats),
        "output_expanded": sum(s.rtp_out_expanded for s in stats),
        "output_shrunk": sum(s.rtp_out_shrunk for s in stats),
        "output_late_dropped": sum(s.rtp_out_late_dropped for s in stats),
        "output_waited": sum(s.rtp_out_waited for s in stats),
        "output_wait_expired": sum(s.rtp_out_wait_expired for s in stats),
        "margins_unobserved": sum(s.margins_unobserved for s in stats),
        "output_packets": sum(s.rtp_out for s in stats),
        "pacer_skipped": sum(s.rtp_out_skipped for s in stats),
        "cpu_percent": round(100.0 * cpu / wall, 1),
        "engine_cpu_percent": round(100.0 * child_cpu["engine"] / wall, 1),
        "legs_cpu_percent": round(100.0 * child_cpu["legs"] / wall, 1),
        "cpu_note": "cpu_percent: the bridge process alone (engine and legs run in their own processes); "
        "100 = one core",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


@click.command("media")
@click.option("--calls", type=click.IntRange(1, 500), default=1, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 3600), default=10, show_default=True)
@click.option("--loss", type=click.FloatRange(0, 0.5), default=0.0, help="Packet loss the legs inject.")
@click.option("--jitter-ms", type=click.FloatRange(0, 500), default=0.0, help="Send jitter the legs inject.")
@click.option("--aligned", is_flag=True, help="Start every call's RTP at the same instant (worst case: all "
              "calls' packets and 80 ms frames in lockstep) instead of at phases spread over one frame.")
@click.option("--json", "as_json", is_flag=True)
def bench_media(
    calls: int, seconds: float, loss: float, jitter_ms: float, aligned: bool, as_json: bool
) -> None:
    """N simultaneous simulated calls through one bridge process and the echo engine."""
    result = asyncio.run(_bench(calls, seconds, loss, jitter_ms, aligned))
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
        f"{result['rtp_timestamp_errors']}\nCPU (100 = one core): bridge {result['cpu_percent']} %, engine "
        f"{result['engine_cpu_percent']} %, legs {result['legs_cpu_percent']} %; load average "
        f"{result['load_average_1m']}"
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
               reorder=reorder, seed=i)
        for i, port in enumerate(config["ports"])
    ]
    try:
        ports = [(await leg.bind())[1] for leg in legs]
        freeze_startup_heap()  # the legs' sending cadence must not pause for collections either
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
