"""The engine's WebSocket, as an attacker on the box or a buggy client would use it: every refusal is an
``error`` message (never a traceback or a dead session), client strings are clipped in the log, a hold
cannot keep a slot forever, and the seed and the start's warnings reach the client."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from engine.backend import PersonaParams
from engine.config import EngineSettings
from engine.echo import EchoBackend
from engine.protocol import FRAME_SAMPLES, Open, Pause, encode_audio, encode_control
from engine.server import run_engine


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def recv_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    body: dict[str, Any] = json.loads(msg.data)
    return body


NESTED = '{"type": "open", "persona": ' + "[" * 50_000 + "]" * 50_000 + "}"


async def test_nested_json_before_open_is_an_error_not_a_crash(http: aiohttp.ClientSession) -> None:
    async with run_engine(EngineSettings(port=0, num_slots=1)) as url:
        async with http.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(NESTED[:8000])
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == "bad_message"
        async with http.ws_connect(url) as ws:  # the engine is fine: a normal session opens
            await ws.send_str(encode_control(Open()))
            assert (await recv_json(ws))["type"] == "ready"


async def test_garbage_after_open_is_an_error_and_the_session_goes_on(http: aiohttp.ClientSession) -> None:
    async with run_engine(EngineSettings(port=0, num_slots=1, batch_window_ms=0)) as url, \
            http.ws_connect(url) as ws:
        await ws.send_str(encode_control(Open()))
        assert (await recv_json(ws))["type"] == "ready"
        for raw in (NESTED[:8000], '{"type": "event", "name": {"a": [1]}}', "x" * 10_000, "[]" * 100):
            await ws.send_str(raw)
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == "bad_message", raw[:40]
        frame = np.arange(FRAME_SAMPLES, dtype=np.int16)
        await ws.send_bytes(encode_audio(0, frame))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.BINARY


async def test_a_client_cannot_name_a_file(http: aiohttp.ClientSession) -> None:
    async with run_engine(EngineSettings(port=0, num_slots=1)) as url, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "open", "persona": {"voice_prompt_path": "/etc/shadow"}}))
        err = await recv_json(ws)
        assert err["code"] == "bad_message" and "unknown field" in err["message"]


async def test_a_hold_has_a_maximum_duration(http: aiohttp.ClientSession) -> None:
    async with run_engine(EngineSettings(port=0, num_slots=1, pause_max_s=0.3, idle_timeout_s=30)) as url, \
            http.ws_connect(url) as ws:
        await ws.send_str(encode_control(Open()))
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send_str(encode_control(Pause()))
        err = await recv_json(ws)
        assert err == {"type": "error", "code": "pause_timeout", "message": "paused for 0.3 s"}
        assert await recv_json(ws) == {"type": "closed", "reason": "pause_timeout"}
        async with http.get(url.replace("ws://", "http://").replace("/session", "/health")) as r:
            assert (await r.json())["slots"]["free"] == 1


class WarningBackend(EchoBackend):
    def __init__(self) -> None:
        super().__init__(1)
        self.seeds: list[int] = []

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]:
        self.seeds.append(seed)
        super().start_slot(slot, persona, seed)
        return [f"adapter {persona.adapter_id!r} unavailable (test): answering on the base weights"]


async def test_ready_carries_the_seed_and_the_starts_warnings(http: aiohttp.ClientSession) -> None:
    backend = WarningBackend()
    async with run_engine(EngineSettings(port=0, num_slots=1), backend=backend) as url:
        async with http.ws_connect(url) as ws:
            await ws.send_str(encode_control(Open(PersonaParams(adapter_id="gone"), seed=1234)))
            ready = await recv_json(ws)
        assert ready["seed"] == 1234 and backend.seeds == [1234]
        assert ready["warnings"] == ["adapter 'gone' unavailable (test): answering on the base weights"]
        async with http.ws_connect(url) as ws:
            await ws.send_str(encode_control(Open()))
            ready = await recv_json(ws)
        assert 0 <= ready["seed"] < 2**63 and backend.seeds[-1] == ready["seed"]  # picked by the engine


async def test_client_strings_are_clipped_in_the_log(http: aiohttp.ClientSession,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engine.server")
    async with run_engine(EngineSettings(port=0, num_slots=1)) as url, http.ws_connect(url) as ws:
        await ws.send_str(encode_control(Open(PersonaParams(name="n" * 128), call_id="c" * 128)))
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send_str(json.dumps({"type": "event", "name": "dtmf", "value": "v" * 256}))
        await ws.close()
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 400
