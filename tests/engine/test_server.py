"""aziza-engine over real WebSockets on loopback (TCP and a Unix socket), with the real EchoBackend."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from bridge.engine_client import EngineFull, EngineSession
from engine.backend import PersonaParams, StepOutput
from engine.config import EngineSettings
from engine.echo import EchoBackend
from engine.protocol import (
    FRAME_SAMPLES,
    Close,
    Event,
    Open,
    Pause,
    Resume,
    decode_audio,
    encode_audio,
    encode_control,
)
from engine.server import run_engine
from tests.state.fixtures import empty_config

ROOT = Path(__file__).resolve().parents[2]


def settings(**kw: Any) -> EngineSettings:
    return EngineSettings(port=0, **kw)


def pcm(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, FRAME_SAMPLES).astype(np.int16)


def http_base(url: str) -> str:
    return url.replace("ws://", "http://").removesuffix("/session")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(http_base(url) + "/health") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def until(pred: Callable[[], Any]) -> None:
    for _ in range(500):  # up to 5 s; polls the server's own /health over HTTP
        if await pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def open_ws(http: aiohttp.ClientSession, url: str, persona: str = "default") -> tuple[
        aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(url)
    await ws.send_str(encode_control(Open(PersonaParams(name=persona), call_id="t")))
    ready = json.loads(await ws.receive_str(timeout=5))
    return ws, ready


async def recv_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def recv_audio(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, np.ndarray]:
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    frame = decode_audio(msg.data)
    return frame.seq, frame.pcm


async def test_frames_echo_back_bit_exact_with_delay(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(echo_delay_frames=2, num_slots=3)) as url:
        ws, ready = await open_ws(http, url)
        assert ready["type"] == "ready" and ready["sample_rate"] == 24000 and ready["frame_samples"] == 1920
        assert ready["slot"] == 0 and ready["generation"] == 1
        sent = [pcm(i) for i in range(6)]
        got = []
        for i, frame in enumerate(sent):
            await ws.send_bytes(encode_audio(i, frame))
            got.append(await recv_audio(ws))
        assert [seq for seq, _ in got] == list(range(6))
        assert not got[0][1].any() and not got[1][1].any()  # two frames of silence first
        for k in range(2, 6):
            np.testing.assert_array_equal(got[k][1], sent[k - 2])
        await ws.send_str(encode_control(Close()))
        assert await recv_json(ws) == {"type": "closed", "reason": "client_close"}
        await ws.close()
        await until(lambda: _busy_is(http, url, 0))
        h = await health(http, url)
        assert h["backend"] == "echo" and h["ticks"] >= 6 and h["slots"]["total"] == 3


async def _busy_is(http: aiohttp.ClientSession, url: str, n: int) -> bool:
    return (await health(http, url))["slots"]["busy"] == n


async def test_eleventh_session_with_ten_slots_is_full(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(num_slots=10)) as url:
        sessions = [await EngineSession.open(url, call_id=f"c{i}") for i in range(10)]
        assert sorted(s.ready.slot for s in sessions) == list(range(10))
        with pytest.raises(EngineFull):
            await EngineSession.open(url, call_id="c10")
        h = await health(http, url)
        assert h["slots"] == {"total": 10, "busy": 10, "free": 0} and h["sessions"] == 10
        await sessions[3].close()
        await until(lambda: _busy_is(http, url, 9))
        again = await EngineSession.open(url, call_id="again")
        assert again.ready.slot == 3 and again.ready.generation == 2
        for s in [*sessions, again]:
            await s.close()
        async with http.get(http_base(url) + "/metrics") as r:
            text = await r.text()
        assert 'aziza_engine_sessions_refused_total{code="full"} 1.0' in text


async def test_bad_frame_is_reported_and_the_session_continues(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings()) as url:
        ws, _ = await open_ws(http, url)
        await ws.send_bytes(b"\x01\x00\x00\x00\x00" + b"\x00" * 100)
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == "bad_frame"
        frame = pcm(7)
        await ws.send_bytes(encode_audio(0, frame))
        seq, out = await recv_audio(ws)
        assert seq == 0
        np.testing.assert_array_equal(out, frame)
        await ws.close()


async def test_garbage_text_is_bad_message_and_the_session_continues(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings()) as url:
        ws, _ = await open_ws(http, url)
        for garbage in ("{not json", '{"type":"dance"}', "[]", encode_control(Open())):
            await ws.send_str(garbage)
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] in ("bad_message", "protocol"), err
        await ws.send_bytes(encode_audio(0, pcm(1)))
        assert (await recv_audio(ws))[0] == 0
        await ws.close()


@pytest.mark.parametrize(
    ("first", "code"),
    [(encode_audio(0, np.zeros(FRAME_SAMPLES, np.int16)), "protocol"), ('{"type":"pause"}', "protocol"),
     ("garbage", "bad_message")],
)
async def test_first_message_must_be_open(http: aiohttp.ClientSession, first: str | bytes, code: str) -> None:
    async with run_engine(settings()) as url:
        ws = await http.ws_connect(url)
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            await ws.send_str(first)
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == code
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert (await health(http, url))["slots"]["busy"] == 0


def _masked_frame(opcode: int, payload: bytes, declared_len: int | None = None) -> bytes:
    """A client->server WebSocket frame (RFC 6455, masked). ``declared_len`` may lie, to cut a frame short."""
    n = len(payload) if declared_len is None else declared_len
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    mask = b"\x11\x22\x33\x44"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_disconnect_mid_frame_frees_the_slot(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(num_slots=1)) as url:
        host, port = url.removeprefix("ws://").removesuffix("/session").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /session HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        writer.write(_masked_frame(0x1, encode_control(Open()).encode()))
        await writer.drain()
        async with asyncio.timeout(5):
            assert b"101" in await reader.readline()
            await reader.readuntil(b"\r\n\r\n")
            assert b'"ready"' in await reader.read(200)
        assert (await health(http, url))["slots"]["busy"] == 1
        # A binary frame that announces 3845 bytes, of which only 1000 arrive before the socket dies.
        full = encode_audio(0, pcm(3))
        writer.write(_masked_frame(0x2, full[:1000], declared_len=len(full)))
        await writer.drain()
        writer.close()
        await until(lambda: _busy_is(http, url, 0))
        ws, ready = await open_ws(http, url)  # the one slot is usable again
        assert ready["type"] == "ready" and ready["generation"] == 2
        await ws.close()


async def test_idle_session_is_closed(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(idle_timeout_s=0.3)) as url:
        ws, _ = await open_ws(http, url)
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == "idle_timeout"
        assert await recv_json(ws) == {"type": "closed", "reason": "idle_timeout"}
        await until(lambda: _busy_is(http, url, 0))  # freed before the close handshake completes
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE


async def test_paused_session_is_not_idle_and_consumes_nothing(http: aiohttp.ClientSession) -> None:
    backend = EchoBackend(2)
    async with run_engine(settings(idle_timeout_s=0.3), backend=backend) as url:
        ws, ready = await open_ws(http, url)
        slot = ready["slot"]
        await ws.send_bytes(encode_audio(0, pcm(1)))
        assert (await recv_audio(ws))[0] == 0
        await ws.send_str(encode_control(Pause()))
        for i in range(3):
            await ws.send_bytes(encode_audio(1 + i, pcm(2)))
        await asyncio.sleep(0.5)  # longer than the idle timeout: a held call is not idle
        assert backend.steps_per_slot[slot] == 1
        await ws.send_str(encode_control(Resume()))
        frame = pcm(5)
        await ws.send_bytes(encode_audio(4, frame))
        seq, out = await recv_audio(ws)  # output n answers input n; nothing was produced while paused
        assert seq == 4
        np.testing.assert_array_equal(out, frame)
        assert backend.steps_per_slot[slot] == 2
        await ws.close()


class BoomBackend(EchoBackend):
    """Returns nothing for slots opened with persona "boom" (a per-slot failure), texts for "talker"."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self.personas: dict[int, str] = {}
        self.events: list[tuple[int, str, str]] = []

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]:
        self.personas[slot] = persona.name
        return super().start_slot(slot, persona)

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        out = super().step(frames)
        res = {}
        for slot, o in out.items():
            if self.personas[slot] == "boom":
                continue
            res[slot] = StepOutput(o.pcm, "hi" if self.personas[slot] == "talker" else "")
        return res

    def on_event(self, slot: int, name: str, value: str) -> None:
        self.events.append((slot, name, value))


async def test_backend_failure_for_one_slot_leaves_the_others_running(http: aiohttp.ClientSession) -> None:
    backend = BoomBackend(3)
    async with run_engine(settings(), backend=backend) as url:
        good, _ = await open_ws(http, url, "talker")
        bad, _ = await open_ws(http, url, "boom")
        await bad.send_bytes(encode_audio(0, pcm(1)))
        err = await recv_json(bad)
        assert err["type"] == "error" and err["code"] == "internal"
        assert await recv_json(bad) == {"type": "closed", "reason": "internal"}
        for i in range(3):
            await good.send_bytes(encode_audio(i, pcm(i)))
            assert (await recv_audio(good))[0] == i
            assert await recv_json(good) == {"type": "text", "seq": i, "text": "hi"}
        await good.send_str(encode_control(Event("dtmf", "5")))
        await until(lambda: _true_if(bool(backend.events)))
        assert backend.events[0][1:] == ("dtmf", "5")
        await until(lambda: _busy_is(http, url, 1))
        await good.close()


async def _true_if(value: bool) -> bool:
    return value


async def test_unix_socket_and_engine_client(tmp_path: Path) -> None:
    sock = str(tmp_path / "engine.sock")
    async with run_engine(EngineSettings(unix_socket=sock)) as url:
        assert url == f"unix://{sock}"
        async with await EngineSession.open(url, call_id="u") as s:
            frame = pcm(9)
            await s.send_frame(frame)
            out = await s.receive()
            np.testing.assert_array_equal(out.pcm, frame)  # type: ignore[union-attr]


async def test_shutdown_tells_every_session(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings()) as url:
        ws, _ = await open_ws(http, url)
    assert await recv_json(ws) == {"type": "closed", "reason": "shutdown"}


async def test_console_script_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "e.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.server", "--unix-socket", str(sock), "--slots", "2",
        "--echo-delay-frames", "1", cwd=ROOT, env={**os.environ, "AZIZA_CONFIG": empty_config(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        for _ in range(400):  # the child process imports and binds: up to 20 s
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        session = await EngineSession.open(f"unix://{sock}", call_id="sig")
        await session.send_frame(pcm(1))
        first = await session.receive()
        assert not first.pcm.any()  # type: ignore[union-attr]  # one frame of delay, from the CLI flag
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            msg = await session.receive()
            while getattr(msg, "type", None) != "closed":
                msg = await session.receive()
            assert msg.reason == "shutdown"  # type: ignore[union-attr]
            assert await proc.wait() == 0
        await session.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class SlowBackend(EchoBackend):
    """Each step takes 200 ms (> one 80 ms frame): the session falls behind real time."""

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        import time

        time.sleep(0.2)
        return super().step(frames)


async def test_falling_behind_is_reported_on_the_wire(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings(), backend=SlowBackend(2)) as url:
        ws, _ = await open_ws(http, url)
        for i in range(7):  # 560 ms of audio at once, while every step takes 200 ms
            await ws.send_bytes(encode_audio(i, pcm(i)))
        lag = None
        gaps: list[dict[str, Any]] = []
        seqs: list[int] = []
        async with asyncio.timeout(10):
            while len(seqs) < 3 or lag is None:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    body = json.loads(msg.data)
                    if body["type"] == "gap":
                        gaps.append(body)
                    else:
                        lag = body
                else:
                    seqs.append(decode_audio(msg.data).seq)
        assert lag["type"] == "lag" and lag["behind_frames"] >= 3
        # The frames dropped for being behind are named, and output n still answers input n.
        lost = [g["first_seq"] + k for g in gaps for k in range(g["count"])]
        assert gaps and all(g["reason"] == "overflow" for g in gaps)
        assert not set(lost) & set(seqs) and seqs == sorted(seqs)
        assert (await health(http, url))["ticks"] >= 1
        async with http.get(http_base(url) + "/metrics") as r:
            text = await r.text()
        dropped = next(float(line.split()[1]) for line in text.splitlines()
                       if line.startswith("aziza_engine_input_frames_dropped_total "))
        assert dropped in (2.0, 3.0)  # 7 frames: at most 4 queued, plus 1 if the first step already took one
        assert len(lost) == dropped
        assert "aziza_engine_step_overruns_total" in text
        assert "aziza_engine_queue_depth " in text  # read at scrape time
        assert "aziza_engine_gpu_memory_bytes" not in text  # absent without a GPU, not zeros
        await ws.close()


@pytest.mark.parametrize("argv", [["--slots", "0"], ["--batch-window-ms", "-1"], ["--backend", "gpt"]])
def test_console_script_rejects_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from engine.server import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "aziza-engine: error:" in capsys.readouterr().err


async def test_oversized_message_ends_only_that_session(http: aiohttp.ClientSession) -> None:
    async with run_engine(settings()) as url:
        other, _ = await open_ws(http, url)
        ws, _ = await open_ws(http, url)
        await ws.send_bytes(bytes(200_000))
        async with asyncio.timeout(5):
            while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                pass
        assert ws.close_code == 1009  # message too big
        await until(lambda: _busy_is(http, url, 1))
        await other.send_bytes(encode_audio(0, pcm(1)))
        assert (await recv_audio(other))[0] == 0
        await other.close()


async def test_random_garbage_in_one_session_never_disturbs_another(http: aiohttp.ClientSession) -> None:
    rng = np.random.default_rng(1234)
    async with run_engine(settings(echo_delay_frames=1)) as url:
        victim, _ = await open_ws(http, url)
        noisy, _ = await open_ws(http, url)
        sent = []
        for i in range(40):
            kind = i % 4
            if kind == 0:
                await noisy.send_bytes(rng.bytes(int(rng.integers(0, 5000))))
            elif kind == 1:
                await noisy.send_str(rng.bytes(int(rng.integers(1, 200))).decode("latin-1"))
            elif kind == 2:
                await noisy.send_str(json.dumps({"type": str(rng.choice(["open", "event", "x", "pause"])),
                                                 "name": int(rng.integers(9)), "persona": [1]}))
            else:
                frame = pcm(100 + i)
                sent.append(frame)
                await victim.send_bytes(encode_audio(len(sent) - 1, frame))
                seq, out = await recv_audio(victim)
                assert seq == len(sent) - 1
                if len(sent) > 1:
                    np.testing.assert_array_equal(out, sent[-2])  # bit-exact, one frame of delay
        assert (await health(http, url))["slots"]["busy"] == 2  # garbage does not end a session
        await noisy.close()
        await victim.close()


def test_engine_config_warns_on_unknown_engine_keys(tmp_path: Path) -> None:
    from engine.config import config_warnings

    path = tmp_path / "aziza.toml"
    path.write_text("[engine]\nnum_slot = 4\n[bridge]\nhttp_port = 1\n")
    warnings = config_warnings({"AZIZA_CONFIG": str(path), "AZIZA_ENGINE__BACKNED": "echo",
                                "AZIZA_ENGINE__PORT": "1"})
    assert any("AZIZA_ENGINE__BACKNED" in w and "did you mean backend" in w for w in warnings)
    assert any("[engine] num_slot" in w and "did you mean num_slots" in w for w in warnings)
    assert len(warnings) == 2  # the [bridge] table and known variables are not the engine's business
