"""EngineSession.send_frame_nowait, the media clock's way to hand frames to the engine: frames arrive in
order with their sequence numbers, a backed-up engine costs refused frames (never an exception or a growing
buffer), a dead one raises EngineUnavailable."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from bridge.engine_client import EngineSession, EngineUnavailable
from engine.protocol import AudioFrame, Ready, decode_audio, encode_control
from tests.media.fixtures import fake_engine


async def test_frames_are_sent_in_order_and_echoed(engine_url: str) -> None:
    session = await EngineSession.open(engine_url, None, "nowait")
    try:
        ramp = (np.arange(1920) % 200 - 100).astype(np.int16) * 100
        seqs = [session.send_frame_nowait(ramp) for _ in range(3)]
        assert seqs == [0, 1, 2]
        got: list[AudioFrame] = []
        async with asyncio.timeout(5):
            while len(got) < 3:
                msg = await session.receive()
                if isinstance(msg, AudioFrame):
                    got.append(msg)
        assert [f.seq for f in got] == [0, 1, 2]
        assert await session.send_frame(ramp) == 3  # the awaiting API shares the numbering
    finally:
        await session.close()


async def test_backed_up_engine_refuses_frames_then_recovers() -> None:
    reading = asyncio.Event()
    received: list[int] = []
    all_in = asyncio.Event()
    expected = [0]  # how many frames the test has had accepted (set once known)

    async def slow_reader(ws: web.WebSocketResponse) -> None:
        await ws.receive()  # open
        await ws.send_str(encode_control(Ready(session_id="s", slot=0, generation=1)))
        await reading.wait()  # stop reading: the client's socket buffers fill up
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                received.append(decode_audio(msg.data).seq)
                if expected[0] and len(received) >= expected[0]:
                    all_in.set()

    async with fake_engine(slow_reader) as url:
        session = await EngineSession.open(url, None, "stuck")
        try:
            frame = np.zeros(1920, dtype=np.int16)
            results = [session.send_frame_nowait(frame) for _ in range(20000)]
            refused = results.count(None)
            assert refused > 0  # flow control showed through as refused frames, not an exception
            sent = [seq for seq in results if seq is not None]
            assert sent == list(range(len(sent)))  # refused frames take no sequence number
            reading.set()
            async with asyncio.timeout(10):
                for _ in range(1000):  # the engine drains the backlog: frames are taken again
                    if session.send_frame_nowait(frame) is not None:
                        break
                    await asyncio.sleep(0.01)
                expected[0] = len(sent) + 1
                if len(received) < expected[0]:
                    await all_in.wait()
            assert received == list(range(len(sent) + 1))  # everything accepted arrived, in order
        finally:
            await session.close()


async def test_closed_session_raises_unavailable(engine_url: str) -> None:
    session = await EngineSession.open(engine_url, None, "closed")
    await session.close()
    with pytest.raises(EngineUnavailable):
        session.send_frame_nowait(np.zeros(1920, dtype=np.int16))


async def test_unanswered_frames_count_from_the_last_answer_and_a_resume(engine_url: str) -> None:
    """What engine_stalled is judged on: frames sent since the engine last answered one. An answer starts
    the count again, and so does a resume (the frames sent before a hold were consumed by the pause)."""
    session = await EngineSession.open(engine_url, None, "unanswered")
    try:
        frame = np.zeros(1920, dtype=np.int16)
        for _ in range(3):
            session.send_frame_nowait(frame)
        assert session.unanswered == 3
        async with asyncio.timeout(5):
            for _ in range(3):
                while not isinstance(await session.receive(), AudioFrame):
                    pass
        assert session.unanswered == 0
        await session.pause()
        await session.send_frame(frame)
        session.send_frame_nowait(frame)
        assert session.unanswered == 2
        await session.resume()
        assert session.unanswered == 0
    finally:
        await session.close()
