"""EngineSession against the real engine server (TCP and Unix socket) and against misbehaving fakes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from bridge.engine_client import (
    EngineFull,
    EngineProtocolError,
    EngineRefused,
    EngineSession,
    EngineUnavailable,
)
from engine.config import EngineSettings
from engine.protocol import AudioFrame, Closed, Error, PersonaParams, Ready, encode_control
from engine.server import run_engine
from tests.media.fixtures import fake_engine


async def test_open_echo_and_close(engine_url: str) -> None:
    async with await EngineSession.open(engine_url, PersonaParams(name="default"), "call-1") as session:
        assert isinstance(session.ready, Ready) and session.ready.frame_samples == 1920
        ramp = (np.arange(1920) % 200 - 100).astype(np.int16)
        seqs = [await session.send_frame(ramp) for _ in range(3)]
        assert seqs == [0, 1, 2]
        frames = []
        while len(frames) < 3:
            msg = await asyncio.wait_for(session.receive(), 5)
            if isinstance(msg, AudioFrame):
                frames.append(msg)
        assert [f.seq for f in frames] == [0, 1, 2]
        assert np.array_equal(frames[0].pcm, ramp)  # the echo engine returns the frame as sent
        float_frame = np.full(1920, 0.25, dtype=np.float32)
        assert await session.send_frame(float_frame) == 3
    assert session.closed
    await session.close()  # idempotent


async def test_unix_socket_url(tmp_path: Path) -> None:
    path = tmp_path / "engine.sock"
    async with run_engine(EngineSettings(unix_socket=str(path), num_slots=1)) as url:
        assert url == f"unix://{path}"
        async with await EngineSession.open(url) as session:
            await session.send_frame(np.zeros(1920, dtype=np.int16))
            msg = await asyncio.wait_for(session.receive(), 5)
            assert isinstance(msg, AudioFrame) and msg.seq == 0


async def test_full_house_is_refused() -> None:
    async with run_engine(EngineSettings(port=0, num_slots=1)) as url:
        async with await EngineSession.open(url):
            with pytest.raises(EngineFull) as info:
                await EngineSession.open(url)
            assert info.value.code == "full"
            assert isinstance(info.value, EngineRefused)


async def test_unreachable_engine() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineUnavailable):
        await EngineSession.open(f"ws://127.0.0.1:{port}/session", timeout=2)
    with pytest.raises(EngineUnavailable):
        await EngineSession.open("unix:///nonexistent/aziza.sock", timeout=2)
    with pytest.raises(ValueError):
        await EngineSession.open("http2://x")


async def test_engine_that_never_answers_times_out() -> None:
    async def silent(ws: web.WebSocketResponse) -> None:
        await asyncio.sleep(5)

    async with fake_engine(silent) as url:
        with pytest.raises(EngineUnavailable, match="did not answer"):
            await EngineSession.open(url, timeout=0.3)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("not json", EngineProtocolError),
        (encode_control(Closed("x")), EngineProtocolError),
        (encode_control(Error("unknown_persona", "no such persona")), EngineRefused),
    ],
)
async def test_bad_replies_to_open(reply: str, error: type[Exception]) -> None:
    async def answer(ws: web.WebSocketResponse) -> None:
        await ws.receive()
        await ws.send_str(reply)
        await ws.receive()

    async with fake_engine(answer) as url:
        with pytest.raises(error):
            await EngineSession.open(url, timeout=2)


async def test_garbage_mid_session_and_engine_death() -> None:
    async def garbage_then_die(ws: web.WebSocketResponse) -> None:
        await ws.receive()
        await ws.send_str(encode_control(Ready("s", 0, 1)))
        await ws.send_bytes(b"\x01\x00")  # a truncated audio frame
        await ws.receive()  # wait for the client's next message, then vanish
        await ws.close()

    async with fake_engine(garbage_then_die) as url:
        session = await EngineSession.open(url)
        with pytest.raises(EngineProtocolError):
            await session.receive()
        await session.send_event("dtmf", "5")
        msg = await asyncio.wait_for(session.receive(), 5)
        assert msg == Closed("engine_gone")
        assert session.closed
        with pytest.raises(EngineUnavailable):
            await session.send_frame(np.zeros(1920, dtype=np.int16))
        assert await session.receive() == Closed("engine_gone")  # stays ended
        await session.close()


async def test_close_while_another_task_receives(engine_url: str) -> None:
    session = await EngineSession.open(engine_url)
    receiving = asyncio.create_task(session.receive())
    await asyncio.sleep(0.05)
    await session.close()
    assert await asyncio.wait_for(receiving, 5) == Closed("client_close")
