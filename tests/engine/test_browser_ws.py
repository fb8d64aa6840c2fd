"""Browser WebSocket relay end to end: browser (aiohttp client) -> bridge route -> real engine server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from bridge.browser_ws import PcmFramer, PersonaUnknown, TalkDeps, browser_routes
from bridge.config import BridgeSettings, Settings
from bridge.control_api import guard_middleware
from bridge.http_guard import BROWSER_PATHS, TokenSource, allowed_hosts
from bridge.talk_token import sign, talk_key
from engine.backend import PersonaParams, StepOutput
from engine.config import EngineSettings
from engine.echo import EchoBackend
from engine.protocol import FRAME_SAMPLES, Ready, encode_control
from engine.server import run_engine
from tests.ari.standins import MemorySink, SlotCapacity
from tests.http_server import serve_on_loopback
from tests.media.fixtures import fake_engine

TOKEN = "test-control-token-" + "x" * 32
KEY = talk_key(TOKEN)


def talk_deps(
    personas: dict[str, PersonaParams] | Callable[[str], Awaitable[PersonaParams]] | None = None,
    slots: int = 4,
) -> TalkDeps:
    """In-memory admission: the personas given (default: "default"), SlotCapacity, MemorySink."""
    known = personas if isinstance(personas, dict) else {"default": PersonaParams(name="default")}

    async def lookup(name: str) -> PersonaParams:
        if name not in known:
            raise PersonaUnknown(name)
        return known[name]

    return TalkDeps(personas=personas if callable(personas) else lookup, capacity=SlotCapacity(slots),
                    sink=MemorySink(), talk_key=lambda: KEY)


@asynccontextmanager
async def bridge_http(engine_url: str, deps: TalkDeps | None = None, **bridge: Any) -> AsyncIterator[str]:
    """The browser routes behind the bridge's own guard (Host check), on a loopback port; ``bridge``: more
    bridge settings."""
    settings = Settings(bridge=BridgeSettings(engine_url=engine_url, **bridge))
    app = web.Application(middlewares=[guard_middleware(
        allowed_hosts("127.0.0.1", None, []), TokenSource(Path("/nonexistent")), BROWSER_PATHS)])
    app.add_routes(browser_routes(settings, deps or talk_deps()))
    async with serve_on_loopback(app, shutdown_timeout=1.0) as port:
        yield f"http://127.0.0.1:{port}"


@asynccontextmanager
async def stack(
    backend: EchoBackend | None = None, deps: TalkDeps | None = None, slots: int = 2
) -> AsyncIterator[tuple[str, str]]:
    async with run_engine(EngineSettings(port=0, num_slots=slots), backend=backend) as engine_url, \
            bridge_http(engine_url, deps) as base:
        yield engine_url, base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def engine_busy(http: aiohttp.ClientSession, engine_url: str) -> int:
    base = engine_url.replace("ws://", "http://").removesuffix("/session")
    async with http.get(base + "/health") as r:
        busy: int = (await r.json())["slots"]["busy"]
        return busy


async def until_busy(http: aiohttp.ClientSession, engine_url: str, n: int) -> None:
    for _ in range(500):  # polls the engine's /health (another server's state): up to 5 s
        if await engine_busy(http, engine_url) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine never reached {n} busy slots")


async def recv_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


def link(persona: str = "default", ttl_s: float = 60.0, key: bytes = KEY) -> str:
    return sign(key, persona, ttl_s)


async def talk(
    http: aiohttp.ClientSession, base: str, persona: str = "default", *, token: str | None = None,
    origin: str | None = "",
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """Open /ws/talk as the bridge's own page would (Origin = the bridge), with a fresh link for persona."""
    headers = {"Origin": base if origin == "" else origin} if origin is not None else {}
    token = link(persona) if token is None else token
    ws = await http.ws_connect(base.replace("http://", "ws://") + f"/ws/talk?token={token}", headers=headers)
    return ws, await recv_json(ws)


async def expect_close(ws: aiohttp.ClientWebSocketResponse) -> None:
    assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


# -- framer (sans-IO) ----------------------------------------------------------------------------------------


def test_framer_reassembles_any_chunking() -> None:
    audio = np.random.default_rng(0).integers(-32768, 32768, 3 * FRAME_SAMPLES + 100).astype(np.int16)
    raw = audio.astype("<i2").tobytes()
    framer, frames, pos = PcmFramer(), [], 0
    for size in (2, 998, 4000, 6, 3840, 1234 * 2):
        frames += framer.feed(raw[pos:pos + size])
        pos += size
    frames += framer.feed(raw[pos:])
    assert len(frames) == 3
    np.testing.assert_array_equal(np.concatenate(frames), audio[: 3 * FRAME_SAMPLES])


def test_framer_rejects_odd_bytes_and_bad_rates() -> None:
    framer = PcmFramer()
    with pytest.raises(ValueError):
        framer.feed(b"\x00\x01\x02")
    assert framer.feed(b"\x00\x00") == []  # nothing lost or shifted by the rejected chunk
    for rate in (0, 1000, 500_000):
        with pytest.raises(ValueError):
            framer.set_rate(rate)


def test_framer_resamples_48k_to_24k() -> None:
    framer = PcmFramer(48_000)
    t = np.arange(48_000) / 48_000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    frames = framer.feed(tone.tobytes())
    assert 11 <= len(frames) <= 12.5  # ~1 s of 24 kHz audio, less the resampler's delay
    spectrum = np.abs(np.fft.rfft(np.concatenate(frames[2:10]).astype(np.float64)))
    peak_hz = np.argmax(spectrum) * 24_000 / (8 * FRAME_SAMPLES)
    assert abs(peak_hz - 440) < 5


# -- end to end ----------------------------------------------------------------------------------------------


async def test_browser_audio_round_trips_through_the_engine(http: aiohttp.ClientSession) -> None:
    async with stack() as (engine_url, base):
        ws, ready = await talk(http, base)
        assert ready["type"] == "ready" and ready["sample_rate"] == 24000
        audio = np.random.default_rng(1).integers(-32768, 32768, 3 * FRAME_SAMPLES).astype(np.int16)
        raw = audio.tobytes()
        for start in range(0, len(raw), 1000):  # chunks that do not line up with frames
            await ws.send_bytes(raw[start:start + 1000])
        got = []
        for _ in range(3):
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) == 2 * FRAME_SAMPLES
            got.append(np.frombuffer(msg.data, "<i2"))
        np.testing.assert_array_equal(np.concatenate(got), audio)
        assert await engine_busy(http, engine_url) == 1
        await ws.close()
        await until_busy(http, engine_url, 0)  # browser gone -> engine session closed


async def test_an_engine_that_stops_answering_ends_the_talk_as_stalled(http: aiohttp.ClientSession) -> None:
    """The engine's socket lives but it answers no more frames: after engine_answer_timeout_s of the
    browser's audio (counted in frames sent) the browser is told and the talk ends as engine_stalled."""

    async def answers_three_then_listens(ws: web.WebSocketResponse) -> None:
        await ws.receive()  # open
        await ws.send_str(encode_control(Ready("s", 0, 1)))
        answered = 0
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and answered < 3:
                answered += 1
                await ws.send_bytes(msg.data)

    deps = talk_deps()
    async with fake_engine(answers_three_then_listens) as engine_url, \
            bridge_http(engine_url, deps, engine_answer_timeout_s=0.4) as base:  # 5 frames
        ws, ready = await talk(http, base)
        assert ready["type"] == "ready"
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16).tobytes()
        for _ in range(3):  # each answered before the next goes
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY
        for _ in range(5):
            await ws.send_bytes(frame)
        assert await recv_json(ws) == {"type": "error", "code": "engine_stalled",
                                       "message": "the engine stopped answering"}
        await expect_close(ws)
    ((cause, summary, _),) = deps.sink.ended_calls.values()  # type: ignore[attr-defined]
    assert cause == "engine_stalled" and summary["frames_in"] == 8 and summary["frames_out"] == 3


class TalkerBackend(EchoBackend):
    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        return {s: StepOutput(o.pcm, "salom") for s, o in super().step(frames).items()}


async def test_text_and_persona_reach_the_browser(http: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def lookup(name: str) -> PersonaParams:
        seen.append(name)
        return PersonaParams(name=name, language="uz")

    async with stack(TalkerBackend(1), talk_deps(lookup)) as (_, base):
        ws, ready = await talk(http, base, "uz-bank")
        assert ready["persona"] == "uz-bank" and seen == ["uz-bank"]
        await ws.send_bytes(bytes(2 * FRAME_SAMPLES))
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.BINARY
        assert await recv_json(ws) == {"type": "text", "seq": 0, "text": "salom"}
        await ws.close()


async def test_garbage_from_the_browser_is_reported_and_the_talk_goes_on(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base):
        ws, _ = await talk(http, base)
        cases: list[tuple[str | bytes, str]] = [
            ("{nope", "bad_message"), ('{"type":"dance"}', "bad_message"),
            ('{"type":"hello","sample_rate":3}', "bad_message"),
            ('{"type":"hello","sample_rate":"fast"}', "bad_message"), (b"\x01\x02\x03", "bad_frame"),
        ]
        for garbage, code in cases:
            if isinstance(garbage, bytes):
                await ws.send_bytes(garbage)
            else:
                await ws.send_str(garbage)
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == code, (garbage, err)
        frame = np.arange(FRAME_SAMPLES, dtype=np.int16)
        await ws.send_bytes(frame.tobytes())
        msg = await ws.receive(timeout=5)
        np.testing.assert_array_equal(np.frombuffer(msg.data, "<i2"), frame)
        await ws.close()


async def test_hello_with_another_rate_is_resampled(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base):
        ws, _ = await talk(http, base)
        await ws.send_str(json.dumps({"type": "hello", "sample_rate": 48000}))
        await ws.send_bytes(np.zeros(48_000 // 2, np.int16).tobytes())  # 0.5 s at 48 kHz
        frames = 0
        while frames < 3:  # 0.5 s at 24 kHz is 6.25 frames; a burst this size may also report lag
            msg = await ws.receive(timeout=5)
            if msg.type == aiohttp.WSMsgType.TEXT:
                assert json.loads(msg.data)["type"] == "lag"
                continue
            assert msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) == 2 * FRAME_SAMPLES
            frames += 1
        await ws.close()


async def test_huge_message_is_refused_and_the_engine_session_freed(http: aiohttp.ClientSession) -> None:
    async with stack() as (engine_url, base):
        ws, _ = await talk(http, base)
        await ws.send_bytes(bytes((1 << 20) + 2))
        msgs = []
        async with asyncio.timeout(5):
            while True:
                msg = await ws.receive()
                msgs.append(msg)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    break
        texts = [json.loads(m.data) for m in msgs if m.type == aiohttp.WSMsgType.TEXT]
        assert any(t.get("code") == "too_big" for t in texts) or ws.close_code == 1009
        await until_busy(http, engine_url, 0)


async def test_full_engine_is_reported_to_the_browser(http: aiohttp.ClientSession) -> None:
    async with stack(slots=1) as (_, base):
        first, _ = await talk(http, base)
        second, err = await talk(http, base)
        assert err["type"] == "error" and err["code"] == "full"
        await expect_close(second)
        await first.close()


async def test_unknown_persona_is_refused(http: aiohttp.ClientSession) -> None:
    deps = talk_deps()
    async with stack(deps=deps) as (engine_url, base):
        ws, err = await talk(http, base, "ghost")  # a valid link, for a persona that does not exist
        assert err["type"] == "error" and err["code"] == "unknown_persona"
        await expect_close(ws)
        assert await engine_busy(http, engine_url) == 0
        assert isinstance(deps.capacity, SlotCapacity) and deps.capacity.held == set()


async def test_engine_down_is_reported(http: aiohttp.ClientSession) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with bridge_http(f"ws://127.0.0.1:{dead_port}/session") as base:
        ws, err = await talk(http, base)
        assert err["type"] == "error" and err["code"] == "engine_unavailable"
        await expect_close(ws)


async def test_engine_ending_the_session_reaches_the_browser(http: aiohttp.ClientSession) -> None:
    async with run_engine(EngineSettings(port=0, idle_timeout_s=0.3)) as engine_url, \
            bridge_http(engine_url) as base:
        ws, _ = await talk(http, base)
        err = await recv_json(ws)
        assert err["code"] == "idle_timeout"
        assert await recv_json(ws) == {"type": "closed", "reason": "idle_timeout"}
        await expect_close(ws)


async def test_static_page_is_served(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base), http.get(base + "/talk") as r:
        assert r.status == 200
        body = await r.text()
    assert "getUserMedia" in body and "/ws/talk" in body


# -- admission: token, origin, one talk per link, the capacity gate --------------------------------------


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", "bad_token"),
        ("garbage", "bad_token"),
        (link(key=talk_key("another-control-token-" + "y" * 32)), "bad_token"),  # signed with another key
        (link(ttl_s=60)[:-2] + "AA", "bad_token"),  # signature tampered
        (sign(KEY, "default", 1, now=lambda: 0.0), "expired"),
    ],
)
async def test_a_talk_needs_a_valid_unexpired_link(
    http: aiohttp.ClientSession, token: str, code: str
) -> None:
    deps = talk_deps()
    async with stack(deps=deps) as (engine_url, base):
        ws, err = await talk(http, base, token=token)
        assert err["type"] == "error" and err["code"] == code, err
        await expect_close(ws)
        assert await engine_busy(http, engine_url) == 0
        assert isinstance(deps.sink, MemorySink) and deps.sink.started_calls == []


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", None])
async def test_a_page_of_another_origin_cannot_open_a_talk(
    http: aiohttp.ClientSession, origin: str | None
) -> None:
    async with stack() as (engine_url, base):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await talk(http, base, origin=origin)
        assert refused.value.status == 403
        assert await engine_busy(http, engine_url) == 0


async def test_one_talk_per_link(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base):
        token = link()
        first, ready = await talk(http, base, token=token)
        assert ready["type"] == "ready"
        second, err = await talk(http, base, token=token)
        assert err["code"] == "link_in_use"
        await expect_close(second)
        await first.close()
        for _ in range(100):  # the first talk's teardown frees the link
            third, msg = await talk(http, base, token=token)
            await third.close()
            if msg["type"] == "ready":
                break
            await asyncio.sleep(0.02)
        assert msg["type"] == "ready"


async def test_a_talk_takes_a_capacity_lease_like_a_call(http: aiohttp.ClientSession) -> None:
    deps = talk_deps(slots=1)
    capacity = deps.capacity
    assert isinstance(capacity, SlotCapacity) and isinstance(deps.sink, MemorySink)
    async with stack(deps=deps, slots=4) as (engine_url, base):
        ws, ready = await talk(http, base)
        assert ready["type"] == "ready" and capacity.held == {ready["call_id"]}
        # The house is full: a phone call would be refused, and so is a second talk (before the engine).
        assert await capacity.acquire("phone-call") is None
        second, err = await talk(http, base)
        assert err["code"] == "full"
        await expect_close(second)
        assert await engine_busy(http, engine_url) == 1
        await ws.close()
        await until_busy(http, engine_url, 0)
        for _ in range(100):
            if not capacity.held:
                break
            await asyncio.sleep(0.01)
        assert capacity.held == set() and capacity.released[0] == ready["call_id"]
    sink = deps.sink
    assert [i.call_id for i in sink.started_calls] == [ready["call_id"]]
    assert sink.started_calls[0].caller == "browser" and sink.started_calls[0].did == ""
    assert [reason for _, reason in sink.refused_calls] == ["capacity_full"]
    cause, summary, _ = sink.ended_calls[ready["call_id"]]
    assert cause == "browser_gone" and summary["channel"] == "browser"


async def test_deeply_nested_json_is_an_error_and_the_talk_goes_on(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base):
        ws, _ = await talk(http, base)
        for garbage in ("[" * 100_000 + "]" * 100_000, "[" * 2000 + "]" * 2000, '{"type":' * 5000,
                        '{"type": NaN}', "x" * 10_000):
            await ws.send_str(garbage)
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == "bad_message"
        frame = np.arange(FRAME_SAMPLES, dtype=np.int16)
        await ws.send_bytes(frame.tobytes())
        msg = await ws.receive(timeout=5)
        np.testing.assert_array_equal(np.frombuffer(msg.data, "<i2"), frame)
        await ws.close()


async def test_persona_lookup_failing_is_unavailable_not_a_crash(http: aiohttp.ClientSession) -> None:
    async def broken(name: str) -> PersonaParams:
        raise OSError("database down")

    async with stack(deps=talk_deps(broken)) as (engine_url, base):
        ws, err = await talk(http, base)
        assert err["code"] == "unavailable"
        await expect_close(ws)
        assert await engine_busy(http, engine_url) == 0


async def test_a_foreign_host_gets_421(http: aiohttp.ClientSession) -> None:
    async with stack() as (_, base), http.get(base + "/talk", headers={"Host": "evil.example"}) as r:
        assert r.status == 421
