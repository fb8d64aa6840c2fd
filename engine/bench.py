"""Scheduler benchmarks (prints numbers; no asserts). Reusable with any BatchBackend.

    python -m engine.bench                     # scheduler overhead per tick, echo backend, 10 and 64 slots
    python -m engine.bench --slots 10 --e2e    # also real-time paced sessions over WebSockets on loopback

``bench_scheduler(backend, ticks)``: every round pushes one frame per slot into a FrameScheduler and waits
until every output is delivered; overhead = round wall time - time inside ``backend.step`` (what the
scheduler, the worker-thread hop and the sinks add per tick).
``bench_sessions(settings, backend, seconds)``: one EngineSession per slot sending real-time 80 ms frames;
reports send->echo latency (the engine's added latency with a zero-delay echo) and lag/drops.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import numpy as np

from engine.backend import BatchBackend, PersonaParams, StepOutput
from engine.echo import EchoBackend
from engine.protocol import FRAME_MS, FRAME_SAMPLES
from engine.scheduler import Delivery, FrameScheduler

FRAME_S_FLOAT = FRAME_MS / 1000.0


@dataclass
class TickStats:
    slots: int
    ticks: int
    round_ms: np.ndarray
    step_ms: np.ndarray

    def summary(self) -> str:
        over = self.round_ms - self.step_ms
        p50 = np.percentile
        return (f"slots={self.slots:3d} ticks={self.ticks} round p50={p50(self.round_ms, 50):.3f} ms "
                f"step p50={p50(self.step_ms, 50):.3f} ms | scheduler overhead/tick "
                f"mean={over.mean():.3f} p50={p50(over, 50):.3f} p99={p50(over, 99):.3f} ms "
                f"({over.mean() * 1000 / self.slots:.1f} us/slot)")


class _TimedBackend:
    """Wraps a backend to time its step (in the worker thread)."""

    def __init__(self, inner: BatchBackend) -> None:
        self.inner = inner
        self.name, self.num_slots = inner.name, inner.num_slots
        self.sample_rate, self.frame_samples = inner.sample_rate, inner.frame_samples
        self.step_s: list[float] = []

    def prepare_persona(self, persona: PersonaParams) -> None:
        self.inner.prepare_persona(persona)

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]:
        return self.inner.start_slot(slot, persona, seed)

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        t0 = time.perf_counter()
        out = self.inner.step(frames)
        self.step_s.append(time.perf_counter() - t0)
        return out

    def end_slot(self, slot: int) -> None:
        self.inner.end_slot(slot)

    def close(self) -> None:
        self.inner.close()


class _CountingSink:
    def __init__(self, done: asyncio.Event, counter: list[int], target: list[int]) -> None:
        self.done, self.counter, self.target = done, counter, target

    def on_output(self, delivery: Delivery) -> None:
        self.counter[0] += 1
        if self.counter[0] >= self.target[0]:
            self.done.set()

    def on_failed(self, message: str) -> None:
        raise RuntimeError(message)


async def bench_scheduler(backend: BatchBackend, ticks: int = 300, warmup: int = 20) -> TickStats:
    timed = _TimedBackend(backend)
    sched = FrameScheduler(timed, batch_window_s=0.020)
    await sched.start()
    try:
        done, counter, target = asyncio.Event(), [0], [0]
        leases = [await sched.open_session(PersonaParams(), _CountingSink(done, counter, target))
                  for _ in range(backend.num_slots)]
        frame = np.zeros(FRAME_SAMPLES, np.float32)
        rounds: list[float] = []
        for i in range(warmup + ticks):
            done.clear()
            target[0] = counter[0] + len(leases)
            t0 = time.perf_counter()
            for lease in leases:
                sched.push(lease, frame)
            await done.wait()
            if i >= warmup:
                rounds.append(time.perf_counter() - t0)
        steps = timed.step_s[-ticks:]
        assert len(timed.step_s) == warmup + ticks, "every round must be exactly one batched step"
        return TickStats(backend.num_slots, ticks, np.array(rounds) * 1e3, np.array(steps) * 1e3)
    finally:
        await sched.stop()


async def bench_sessions(num_slots: int, seconds: float) -> str:
    """Paced sessions over real WebSockets, spoken in the engine's own protocol (engine.protocol): the
    engine is measured without the bridge's client (the engine never imports the bridge)."""
    import aiohttp

    from engine.config import EngineSettings
    from engine.protocol import Open, decode_audio, decode_engine_control, encode_audio, encode_control
    from engine.server import run_engine

    settings = EngineSettings(port=0, num_slots=num_slots)
    latencies: list[float] = []
    lags = [0]
    n_frames = int(seconds / FRAME_S_FLOAT)
    async with run_engine(settings) as url, aiohttp.ClientSession() as http:
        sockets = []
        for i in range(num_slots):
            ws = await http.ws_connect(url, max_msg_size=1 << 20)
            await ws.send_str(encode_control(Open(call_id=f"bench-{i}")))
            ready = await ws.receive()
            if ready.type != aiohttp.WSMsgType.TEXT or decode_engine_control(ready.data).type != "ready":
                raise RuntimeError(f"session {i} not ready: {ready.data!r}")
            sockets.append(ws)

        async def one(ws: aiohttp.ClientWebSocketResponse, offset: float) -> None:
            sent: dict[int, float] = {}
            done: set[int] = set()

            async def rx() -> None:
                while len(done) < n_frames:
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        frame = decode_audio(msg.data)
                        done.add(frame.seq)
                        latencies.append(time.perf_counter() - sent[frame.seq])
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        lags[0] += decode_engine_control(msg.data).type == "lag"
                    else:
                        return

            async with asyncio.TaskGroup() as tg:
                tg.create_task(rx())
                start = time.perf_counter() + offset
                pcm = np.zeros(FRAME_SAMPLES, np.int16)
                for k in range(n_frames):
                    await asyncio.sleep(max(0.0, start + k * FRAME_S_FLOAT - time.perf_counter()))
                    sent[k] = time.perf_counter()
                    await ws.send_bytes(encode_audio(k, pcm))

        async with asyncio.TaskGroup() as tg:
            for i, ws in enumerate(sockets):  # calls do not start in lockstep: spread over one frame
                tg.create_task(one(ws, FRAME_S_FLOAT * i / num_slots))
        for ws in sockets:
            await ws.close()
    lat = np.array(latencies) * 1e3
    return (f"e2e slots={num_slots:3d} frames={len(lat)} send->echo latency p50={np.percentile(lat, 50):.2f} "
            f"p99={np.percentile(lat, 99):.2f} max={lat.max():.2f} ms, lag reports={lags[0]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.bench")
    p.add_argument("--slots", type=int, nargs="+", default=[10, 64])
    p.add_argument("--ticks", type=int, default=300)
    p.add_argument("--e2e", action="store_true", help="also run paced sessions over real WebSockets")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    for n in args.slots:
        print(asyncio.run(bench_scheduler(EchoBackend(n), args.ticks)).summary(), flush=True)
    if args.e2e:
        for n in args.slots:
            print(asyncio.run(bench_sessions(n, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
