"""Media workers (bridge/media/workers.py, bridge/media/worker.py): calls placed on worker processes carry
real RTP through a real echo engine, end cleanly, survive a worker's death (only its calls end), and their
metrics reach the bridge's /metrics summed. Real processes, sockets and engine; verdicts on counts and
states, never on timing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from bridge.call_deps import EngineCannotTakeCall
from bridge.engine_client import EngineError
from bridge.media.metrics_fanin import MediaMetricsFanIn, parse_text, render, retire, sum_families
from bridge.media.simleg import SimLeg
from bridge.media.worker_wire import WireError, decode, encode
from bridge.media.workers import GONE, MediaWorkerPool, WorkerEngine, WorkerMedia
from engine.config import EngineSettings
from engine.protocol import PersonaParams
from engine.server import run_engine
from tests.media.fixtures import bridge_settings


@contextlib.asynccontextmanager
async def echo_engine(slots: int) -> AsyncIterator[str]:
    async with run_engine(EngineSettings(port=0, num_slots=slots, batch_window_ms=5)) as url:
        yield url


@contextlib.asynccontextmanager
async def pool_of(url: str, workers: int, fanin: MediaMetricsFanIn | None = None) -> AsyncIterator[
        MediaWorkerPool]:
    pool = MediaWorkerPool(bridge_settings(engine_url=url), workers, metrics=fanin)
    async with pool.running():
        yield pool


async def placed_call(pool: MediaWorkerPool, call_id: str, audio: np.ndarray) -> tuple[
        WorkerEngine, WorkerMedia, SimLeg]:
    engine = await pool.open_engine(PersonaParams(), call_id)
    assert isinstance(engine, WorkerEngine)
    media = pool.make_media(engine, call_id)
    assert isinstance(media, WorkerMedia)
    leg = SimLeg(None, audio)
    leg.set_remote(await media.bind())
    media.lock_remote(*(await leg.bind()))
    return engine, media, leg


async def wait_for(predicate: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll a condition another process makes true (worker reports come once a second)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - nothing here to wait on: the state is another process's
            await asyncio.sleep(0.05)


def test_wire_round_trip_and_garbage() -> None:
    msg = decode(encode("open", "c1", 7, persona={"name": "x"}))
    assert (msg.op, msg.call, msg.id, msg.fields) == ("open", "c1", 7, {"persona": {"name": "x"}})
    for bad in (b"not json\n", b"[1,2]\n", b'{"op": 3}\n', b'{"op": "x", "id": true}\n', b"\xff\xfe\n"):
        with pytest.raises(WireError):
            decode(bad)


def test_families_are_summed_sample_by_sample() -> None:
    def source(n: float) -> list[object]:
        counter = CounterMetricFamily("aziza_x", "x", labels=["reason"])
        counter.add_metric(["a"], n)
        hist = HistogramMetricFamily("aziza_h_seconds", "h", buckets=[("0.1", n), ("+Inf", 2 * n)],
                                     sum_value=n)
        return [counter, hist, GaugeMetricFamily("aziza_g", "g", value=n)]

    text = render(source(5))  # as a worker sends it
    merged = {f.name: f for f in sum_families([source(1), list(text_string_to_metric_families(text))])}
    assert [(s.name, s.value) for s in merged["aziza_x"].samples] == [("aziza_x_total", 6.0)]
    assert [s.value for s in merged["aziza_h_seconds"].samples] == [6.0, 12.0, 12.0, 6.0]
    assert [s.value for s in merged["aziza_g"].samples] == [6.0]


    # A dead worker's last text: its counts stay, its gauges (what it held live) go; retired texts add up.
    retired = retire(retire("", render(source(5))), render(source(2)))
    kept = {f.name: f for f in parse_text(retired)}
    assert set(kept) == {"aziza_x", "aziza_h_seconds"}
    assert [s.value for s in kept["aziza_x"].samples] == [7.0]


def scraped(fanin: MediaMetricsFanIn) -> str:
    return render(list(fanin.collect()))


async def test_calls_on_workers_carry_audio_and_spread_over_them(speech_8k: np.ndarray) -> None:
    fanin = MediaMetricsFanIn(CollectorRegistry())  # (no media of its own in this process)
    async with echo_engine(4) as url, pool_of(url, 2, fanin) as pool:
        placed = [await placed_call(pool, f"w-{i}", speech_8k) for i in range(3)]
        assert sorted(len(w.calls) for w in pool.workers) == [1, 2]  # fewest calls first
        runs = [asyncio.create_task(media.run()) for _, media, _ in placed]
        legs = [asyncio.create_task(leg.run(1.2, tail_s=0.4)) for _, _, leg in placed]
        await asyncio.gather(*legs)
        placed[0][1].pause()
        placed[0][1].resume()
        await placed[1][0].send_event("dtmf", "5")
        await wait_for(lambda: all(p[1].live_gauges().get("turns") is not None for p in placed))
        for _, media, _ in placed:
            await media.stop()
        assert [await r for r in runs] == ["stopped"] * 3
        for engine, media, leg in placed:
            snapshot = media.snapshot()
            assert snapshot["frames_from_engine"] > 5 and snapshot["rtp_out"] > 20
            assert leg.packets_received > 20
            await engine.close()
            leg.close()
        assert all(not w.calls for w in pool.workers)
        await wait_for(lambda: "aziza_media_calls_total 3.0" in scraped(fanin))


async def test_a_dead_worker_ends_only_its_calls_and_is_replaced(speech_8k: np.ndarray) -> None:
    fanin = MediaMetricsFanIn(CollectorRegistry())
    async with echo_engine(4) as url, pool_of(url, 2, fanin) as pool:
        (e1, m1, l1), (e2, m2, l2) = [await placed_call(pool, f"d-{i}", speech_8k) for i in range(2)]
        assert m1.worker is not m2.worker
        r1, r2 = asyncio.create_task(m1.run()), asyncio.create_task(m2.run())
        sending = asyncio.create_task(l2.run(0.6))
        await wait_for(lambda: "aziza_media_calls_active 2.0" in scraped(fanin))  # each worker reported its
        pid = m1.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert await r1 == GONE
        await e1.close()  # nothing to close: no error
        await sending
        await m2.stop()
        assert await r2 == "stopped"
        await e2.close()
        await wait_for(lambda: pool.restarts == 1 and all(w.alive for w in pool.workers))
        e3, m3, l3 = await placed_call(pool, "d-3", speech_8k)  # the new worker takes calls
        r3 = asyncio.create_task(m3.run())
        await l3.run(0.5)
        await m3.stop()
        assert await r3 == "stopped" and m3.snapshot()["frames_to_engine"] > 0
        await e3.close()
        # The dead worker's call is not counted live for ever (its last report said 1).
        await wait_for(lambda: "aziza_media_calls_active 0.0" in scraped(fanin))
        for leg in (l1, l2, l3):
            leg.close()


async def test_a_stuck_worker_is_killed_and_replaced(
    speech_8k: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bridge.media.workers as workers_module

    patient = workers_module.REQUEST_TIMEOUT_S
    async with echo_engine(2) as url, pool_of(url, 1) as pool:
        engine, media, leg = await placed_call(pool, "s-1", speech_8k)
        run = asyncio.create_task(media.run())
        pid = media.worker.pid
        assert pid is not None
        # Impatient only for the stopped worker: a worker just started, on a loaded machine, may take over a
        # second to answer its first open (a stress run killed one as stuck there).
        monkeypatch.setattr(workers_module, "REQUEST_TIMEOUT_S", 1.0)
        os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
        try:
            with pytest.raises(EngineError):
                await engine.send_event("dtmf", "1")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert await run == GONE
        await engine.close()
        leg.close()
        await wait_for(lambda: pool.restarts == 1 and pool.workers[0].alive)
        monkeypatch.setattr(workers_module, "REQUEST_TIMEOUT_S", patient)
        fresh = await pool.open_engine(PersonaParams(), "s-2")
        await fresh.close()


async def test_a_full_engine_refuses_and_an_abandoned_open_leaks_no_slot(speech_8k: np.ndarray) -> None:
    async with echo_engine(1) as url, pool_of(url, 1) as pool:
        first = await pool.open_engine(PersonaParams(), "f-1")
        with pytest.raises(EngineCannotTakeCall) as refused:
            await pool.open_engine(PersonaParams(), "f-2")
        assert refused.value.reason == "engine_full"
        await first.close()
        opening = asyncio.create_task(pool.open_engine(PersonaParams(), "f-3"))
        await asyncio.sleep(0)  # sent, not answered
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError, EngineCannotTakeCall):
            await opening
        # The dropped session is closed in the worker, so the one slot comes free again.
        async with asyncio.timeout(20):
            while True:
                try:
                    last = await pool.open_engine(PersonaParams(), "f-4")
                    break
                except EngineCannotTakeCall:
                    await asyncio.sleep(0.1)
        await last.close()
        assert not pool.workers[0].calls


async def test_requests_about_unknown_calls_are_refused_not_fatal() -> None:
    async with echo_engine(1) as url, pool_of(url, 1) as pool:
        worker = pool.workers[0]
        from bridge.media.workers import MediaWorkerError

        with pytest.raises(MediaWorkerError) as refused:
            await worker.request("bind", "nobody")
        assert refused.value.error == "unknown_call"
        with pytest.raises(MediaWorkerError) as unknown:
            await worker.request("explode", "nobody")
        assert unknown.value.error == "unknown_op"
        assert worker.pid is not None
        for sig in (signal.SIGTERM, signal.SIGINT):  # systemd's stop of the group, a terminal's Ctrl-C
            os.kill(worker.pid, sig)
        with pytest.raises(MediaWorkerError):  # still serving: the bridge ends it, by closing its stdin
            await worker.request("bind", "nobody")
        assert worker.alive


class _Lines:
    """A stand-in for the worker's stdout writer: the lines it was given."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.lines.append(data)


async def test_reports_leave_between_ticks_and_ends_share_one_live_report() -> None:
    from bridge.media.worker import Worker

    writer = _Lines()
    worker = Worker(bridge_settings(media_tick_ms=4.0), writer)  # type: ignore[arg-type]
    assert worker.between_ticks(10.0) == pytest.approx(10.001)  # a quarter into the 4 ms tick
    assert worker.between_ticks(10.0015) == pytest.approx(10.005)  # (past it: the next tick's)
    assert worker.between_ticks(10.001) == pytest.approx(10.001)
    untimed = Worker(bridge_settings(media_tick_ms=0.0), _Lines())  # type: ignore[arg-type]
    assert untimed.between_ticks(10.0013) == 10.0013

    worker._report_end("c1", {"reason": "stopped"})
    worker._report_end("c2", {"reason": "media_timeout"})
    assert writer.lines == []  # not at once: between two ticks
    flush = worker._ends_flush
    assert flush is not None and flush.when() % 0.004 == pytest.approx(0.001, abs=1e-9)
    await wait_for(lambda: bool(writer.lines))
    assert [decode(line).op for line in writer.lines] == ["live", "ended", "ended"]  # one live, before both
    assert [decode(line).call for line in writer.lines[1:]] == ["c1", "c2"]
    worker.flush_ends()  # nothing pending: nothing more said
    assert len(writer.lines) == 3


async def test_a_failing_live_report_still_ends_every_pending_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.media.worker import Worker

    writer = _Lines()
    worker = Worker(bridge_settings(media_tick_ms=4.0), writer)  # type: ignore[arg-type]

    def broken_live() -> None:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(worker, "live", broken_live)
    worker._report_end("c1", {"reason": "stopped"})
    worker._report_end("c2", {"reason": "stopped"})
    worker.flush_ends()  # (at once, as close_all does: the timer is cancelled)
    assert worker._ends_flush is None
    said = [decode(line) for line in writer.lines]
    assert [(msg.op, msg.call) for msg in said] == [("ended", "c1"), ("ended", "c2")]
