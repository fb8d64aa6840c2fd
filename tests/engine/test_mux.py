"""Many engine sessions over one WebSocket (``GET /mux``, engine/mux.py, bridge EngineMux): the wire format
(sans-IO), and the real engine and client over loopback with the echo backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from bridge.engine_client import EngineFull, EngineMux, EngineSession, EngineUnavailable, _connect_target
from engine.config import EngineSettings
from engine.metrics import EngineMetrics
from engine.mux import Mux, step_send
from engine.protocol import (
    AUDIO_FRAME_BYTES,
    FRAME_SAMPLES,
    MUX_MAX_FRAMES,
    AudioFrame,
    Closed,
    Error,
    Open,
    ProtocolError,
    Ready,
    decode_audio,
    decode_engine_control,
    decode_mux_audio,
    decode_mux_text,
    encode_audio,
    encode_control,
    encode_mux_audio,
    encode_mux_text,
)
from engine.server import _Session, run_engine


def settings(**kw: Any) -> EngineSettings:
    return EngineSettings(port=0, **kw)


def pcm(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, FRAME_SAMPLES).astype(np.int16)


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):  # up to 5 s
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def busy(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url.replace("ws://", "http://").removesuffix("/session") + "/health") as r:
        return int((await r.json())["slots"]["busy"])


# -- wire format ---------------------------------------------------------------------------------------------


def test_mux_audio_round_trips_and_checks_its_sizes() -> None:
    records = [(7, encode_audio(1, pcm(1))), (0, encode_audio(2, pcm(2))),
               (2**31 - 1, encode_audio(3, pcm(3)))]
    data = encode_mux_audio(records)
    assert len(data) == 3 + 3 * (4 + AUDIO_FRAME_BYTES)
    assert decode_mux_audio(data) == records
    for bad in (b"", b"\x02", data[:-1], data + b"\x00", b"\x01" + data[1:], b"\x02\x00\x00"):
        with pytest.raises(ProtocolError) as err:
            decode_mux_audio(bad)
        assert err.value.code == "bad_frame"
    with pytest.raises(ValueError):
        encode_mux_audio([])
    with pytest.raises(ValueError):
        encode_mux_audio([(1, encode_audio(0, pcm(0)))] * (MUX_MAX_FRAMES + 1))
    with pytest.raises(ValueError):
        encode_mux_audio([(1, b"short")])


def test_mux_text_names_its_channel() -> None:
    text = encode_control(Open(call_id="c1"))
    assert decode_mux_text(encode_mux_text(12, text)) == (12, text)
    for bad in ("", "{}", " 1 {}", "x {}", "-1 {}", "12{}", "2147483648 {}", "١٢ {}"):
        with pytest.raises(ProtocolError) as err:
            decode_mux_text(bad)
        assert err.value.code == "bad_message"


async def test_the_mux_url_sits_beside_the_session_url() -> None:
    assert _connect_target("ws://127.0.0.1:8998/session", mux=True)[0] == "ws://127.0.0.1:8998/mux"
    assert _connect_target("wss://e.example:443/x/session", mux=True)[0] == "wss://e.example:443/x/mux"
    assert _connect_target("ws://127.0.0.1:8998", mux=True)[0] == "ws://127.0.0.1:8998/mux"
    url, connector = _connect_target("unix:///run/aziza/engine.sock", mux=True)
    assert url == "ws://localhost/mux" and connector is not None
    await connector.close()


# -- engine and client ---------------------------------------------------------------------------------------


async def _echo_round(sessions: list[EngineSession], seq: int) -> list[AudioFrame]:
    sent = [pcm(100 * i + seq) for i in range(len(sessions))]
    for session, frame in zip(sessions, sent, strict=True):
        assert session.send_frame_nowait(frame) == seq
    got = []
    for session in sessions:
        async with asyncio.timeout(5):
            msg = await session.receive()
        assert isinstance(msg, AudioFrame), msg
        got.append(msg)
    for frame, msg in zip(sent, got, strict=True):
        assert msg.seq == seq
        np.testing.assert_array_equal(msg.pcm, frame)  # each session hears its own audio, no one else's
    return got


async def test_sessions_share_one_socket_and_each_hears_its_own_echo(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(num_slots=4)) as url:
        engine = EngineMux(url)
        sessions = [await engine.open(call_id=f"c{i}") for i in range(3)]
        assert sorted(s.ready.slot for s in sessions) == [0, 1, 2]
        assert await busy(http, url) == 3
        mux = engine.mux
        assert mux is not None and len(mux.channels) == 3
        for seq in range(5):
            await _echo_round(sessions, seq)
        # the frames sent in one round of the event loop went out in one message
        assert mux.frames_out == 15 and mux.messages_out == 5
        await sessions[1].close()
        await until(lambda: len(mux.channels) == 2)
        assert sessions[1].closed_reason == "client_close"
        await _echo_round([sessions[0], sessions[2]], 5)  # the others go on
        assert await busy(http, url) == 2
        await sessions[0].close()
        await sessions[2].close()
        assert engine.mux is None and mux.ws.closed  # the last session closed the socket
        await until_async(lambda: busy(http, url), 0)
        again = await engine.open(call_id="again")  # and the next open connects again
        await _echo_round([again], 0)
        await again.close()


async def until_async(read: Callable[[], Any], want: Any) -> None:
    for _ in range(500):  # up to 5 s; polls the engine's own /health over HTTP
        if await read() == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {want!r}")


async def test_a_round_of_more_frames_than_one_message_holds() -> None:
    """MUX_MAX_FRAMES + 6 calls' frames in one round: two full messages' worth each way, every call served
    (a message of exactly the largest size once closed the socket under every call)."""
    n = MUX_MAX_FRAMES + 6
    async with run_engine(settings(num_slots=n)) as url:
        engine = EngineMux(url)
        sessions = [await engine.open(call_id=f"c{i}") for i in range(n)]
        mux = engine.mux
        assert mux is not None
        for seq in range(2):
            await _echo_round(sessions, seq)
        assert mux.messages_out == 4 and mux.frames_out == 2 * n  # 64 + 6 frames, twice
        assert mux.frames_in == 2 * n and mux.messages_in < 2 * n  # (the engine's came batched too)
        for s in sessions:
            await s.close()


async def test_a_full_house_refuses_one_channel_and_keeps_the_others() -> None:
    async with run_engine(settings(num_slots=2)) as url:
        engine = EngineMux(url)
        sessions = [await engine.open(call_id=f"c{i}") for i in range(2)]
        with pytest.raises(EngineFull):
            await engine.open(call_id="third")
        await _echo_round(sessions, 0)
        for s in sessions:
            await s.close()
        assert engine.mux is None


async def test_a_dead_engine_ends_every_session_on_the_mux() -> None:
    async with run_engine(settings(num_slots=3)) as url:
        engine = EngineMux(url)
        sessions = [await engine.open(call_id=f"c{i}") for i in range(2)]
        await _echo_round(sessions, 0)
    # (run_engine's exit shut the engine down: each session is told, then the socket goes)
    for s in sessions:
        async with asyncio.timeout(5):
            while not isinstance(msg := await s.receive(), Closed):
                pass
        assert msg.reason in ("shutdown", "engine_gone")
        with pytest.raises(EngineUnavailable):
            s.send_frame_nowait(pcm(0))
        await s.close()
    with pytest.raises(EngineUnavailable):
        await engine.open(call_id="late", timeout=2.0)
    await engine.aclose()


async def test_garbage_on_the_mux_costs_only_itself(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(num_slots=3)) as url:
        engine = EngineMux(url)
        good = await engine.open(call_id="good")
        ws = await http.ws_connect(url.removesuffix("/session") + "/mux")
        await ws.send_str("no channel here")
        await ws.send_bytes(b"\x02\x00\x05garbage")
        await ws.send_str(encode_mux_text(4, "{not json"))  # a channel whose first message is no open
        msg = await ws.receive(timeout=5)
        channel, text = decode_mux_text(msg.data)
        refusal = decode_engine_control(text)
        assert channel == 4 and isinstance(refusal, Error) and refusal.code == "bad_message"
        await ws.send_bytes(encode_mux_audio([(9, encode_audio(0, pcm(1)))]))  # audio for no channel: dropped
        await ws.send_str(encode_mux_text(5, encode_control(Open(call_id="raw"))))
        msg = await ws.receive(timeout=5)
        assert decode_mux_text(msg.data)[0] == 5 and '"ready"' in msg.data
        await ws.send_bytes(encode_mux_audio([(5, encode_audio(0, pcm(2)))]))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.BINARY
        [(channel, frame)] = decode_mux_audio(msg.data)
        assert channel == 5 and frame == encode_audio(0, pcm(2))
        await _echo_round([good], 0)  # the other client's session never noticed
        await ws.close()
        await until_async(lambda: busy(http, url), 1)  # the raw socket's session is freed with it
        await good.close()
        async with http.get(url.replace("ws://", "http://").removesuffix("/session") + "/metrics") as r:
            metrics = await r.text()
        # the two messages that were not the mux's format (the bad JSON on channel 4 was that session's)
        assert "aziza_engine_bad_frames_total 1.0" in metrics
        assert "aziza_engine_bad_messages_total 1.0" in metrics


async def test_the_mux_on_the_engines_unix_socket(tmp_path: Any) -> None:
    async with run_engine(settings(num_slots=2, unix_socket=str(tmp_path / "engine.sock"))) as url:
        assert url.startswith("unix://")
        engine = EngineMux(url)
        sessions = [await engine.open(call_id=f"c{i}") for i in range(2)]
        await _echo_round(sessions, 0)
        for s in sessions:
            await s.close()
        assert engine.mux is None


async def test_an_engine_error_on_one_channel_reaches_that_session_only() -> None:
    async with run_engine(settings(num_slots=3, idle_timeout_s=1.0)) as url:
        engine = EngineMux(url)
        idle, busy_one = await engine.open(call_id="idle"), await engine.open(call_id="busy")
        # Frames on one of them every ~50 ms (gaps far below the idle timeout, however loaded the machine)
        # until the other, silent one is closed as idle.
        first, seq = None, 0
        async with asyncio.timeout(15):
            while first is None:
                await _echo_round([busy_one], seq)
                seq += 1
                with contextlib.suppress(TimeoutError):
                    first = await asyncio.wait_for(idle.receive(), 0.05)
            assert isinstance(first, Error) and first.code == "idle_timeout"
            assert await idle.receive() == Closed(reason="idle_timeout")
        await _echo_round([busy_one], seq)
        await idle.close()
        await busy_one.close()


# -- a socket that backs up ----------------------------------------------------------------------------------


class _BackedUpSocket:
    """aiohttp's WebSocket as a mux end sees it while the peer does not read: a send writes, then, while the
    socket is paused, awaits the one drain waiter the protocol keeps (the same future on every send, as
    aiohttp's ``_drain_helper`` does) until ``drained()``."""

    def __init__(self) -> None:
        self.sent: list[bytes | str] = []
        self.closed = False
        self.drain: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
        if self.drain is not None:
            await self.drain

    async def send_str(self, data: str) -> None:
        self.sent.append(data)
        if self.drain is not None:
            await self.drain

    def drained(self) -> None:
        drain, self.drain = self.drain, None
        assert drain is not None
        drain.set_result(None)

    def frames(self) -> list[tuple[int, int]]:
        """(channel, frame number) of every audio frame written, in order."""
        return [(channel, decode_audio(frame).seq) for data in self.sent if isinstance(data, bytes)
                for channel, frame in decode_mux_audio(data)]


async def test_a_drain_wait_taken_by_step_send_can_be_awaited_again() -> None:
    """aiohttp awaits its stored drain waiter again on the next send while the socket is paused: the future
    step_send hands back must still be awaitable (it raised "await wasn't used with future")."""
    drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send() -> None:
        await drained

    assert step_send(send()) is drained
    again = asyncio.create_task(send())
    await asyncio.sleep(0)
    assert not again.done()
    drained.set_result(None)
    await again


async def test_the_engines_sessions_wait_out_a_backed_up_mux_and_go_on() -> None:
    """The engine's end: a session's writer sends on its channel while the socket drains (the bridge was
    busy). It waits, and every frame goes out in order once the socket drains (every session on the mux
    ended as "disconnect" instead, at 200 calls on a loaded bridge)."""
    ws = _BackedUpSocket()
    mux = Mux(ws)
    channels = [mux.open_channel(n) for n in (1, 2)]
    for ch in channels:
        await ch.send_bytes(encode_audio(0, pcm(0)))
    await asyncio.sleep(0)  # this round's message is written, and the socket backs up
    assert ws.frames() == [(1, 0), (2, 0)]
    sends = [asyncio.create_task(ch.send_bytes(encode_audio(1, pcm(1)))) for ch in channels]
    for _ in range(3):
        await asyncio.sleep(0)
    assert not any(task.done() for task in sends)  # waiting for the drain, not failed
    assert not any(ch.closed for ch in channels)
    ws.drained()
    await asyncio.gather(*sends)
    await channels[0].send_bytes(encode_audio(2, pcm(2)))
    await asyncio.sleep(0)
    assert ws.frames() == [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]


async def test_a_call_on_a_backed_up_mux_loses_frames_not_its_session() -> None:
    """The bridge's end: while the mux's socket drains, a call's frames are refused (counted as dropped by
    the call) and its session stays; afterwards frames flow again, numbered without a hole."""
    ws = _BackedUpSocket()
    mux = Mux(ws)
    session = EngineSession(None, mux.open_channel(1), Ready(session_id="s", slot=0, generation=1))
    assert session.send_frame_nowait(pcm(0)) == 0
    await asyncio.sleep(0)  # written; the socket backs up
    assert session.send_frame_nowait(pcm(1)) == 1  # queued behind the drain; the session now waits on it
    await asyncio.sleep(0)
    assert session.send_frame_nowait(pcm(2)) is None  # refused while the socket drains
    assert not session.closed
    ws.drained()
    await asyncio.sleep(0)
    assert session.send_frame_nowait(pcm(3)) == 2
    await asyncio.sleep(0)
    assert ws.frames() == [(1, 0), (1, 1), (1, 2)]


async def test_a_session_whose_send_fails_says_closed_on_a_mux_that_lives() -> None:
    """A channel closes without a word on the wire: a session whose send fails for a reason of its own, on a
    mux that lives on, tells its client ``closed`` (else the call would go on talking to nobody)."""
    ws = _BackedUpSocket()
    ws.drained()
    mux = Mux(ws)
    channel = mux.open_channel(7)

    async def broken_send(data: bytes, compress: int | None = None) -> None:
        raise RuntimeError("a send that failed")

    channel.send_bytes = broken_send  # type: ignore[method-assign]
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    session = _Session(channel, EngineMetrics(1), release)
    session.outbox.put_nowait(encode_audio(0, pcm(0)))
    await session.writer()
    assert released and channel.closed
    assert session.end_reason == "send_failed"
    assert [decode_mux_text(t) for t in ws.sent if isinstance(t, str)] == [
        (7, encode_control(Closed(reason="send_failed")))]
