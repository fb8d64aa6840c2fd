"""The Moshi backend behind the real engine server: built from settings, real WebSockets on loopback."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

from bridge.engine_client import EngineFull, EngineRefused, EngineSession
from engine.backend import PersonaParams
from engine.config import EngineSettings
from engine.moshi.loader import ModelError
from engine.moshi.tiny import write_tiny_model
from engine.protocol import FRAME_SAMPLES, AudioFrame
from engine.server import run_engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=21)


async def collect_audio(session: EngineSession, count: int) -> list[AudioFrame]:
    frames: list[AudioFrame] = []
    async with asyncio.timeout(30):
        while len(frames) < count:
            msg = await session.receive()
            if isinstance(msg, AudioFrame):
                frames.append(msg)
    return frames


async def test_two_calls_and_a_full_house_through_the_engine(tiny_dir: Path) -> None:
    settings = EngineSettings(port=0, backend="moshi", model=str(tiny_dir), device="cpu", num_slots=2)
    rng = np.random.default_rng(0)
    async with run_engine(settings) as url:
        plain = await EngineSession.open(url, call_id="plain", timeout=30)
        prompted = await EngineSession.open(
            url, PersonaParams(name="p", text_prompt="Speak slowly and clearly."), call_id="p", timeout=30)
        assert {plain.ready.slot, prompted.ready.slot} == {0, 1}
        with pytest.raises(EngineFull):
            await EngineSession.open(url, call_id="third", timeout=30)
        for _ in range(4):
            for session in (plain, prompted):
                await session.send_frame((rng.normal(0, 3000, FRAME_SAMPLES)).astype(np.int16))
        got_plain, got_prompted = await collect_audio(plain, 4), await collect_audio(prompted, 4)
        assert [f.seq for f in got_plain] == [0, 1, 2, 3]
        assert not got_plain[0].pcm.any()  # the model's delay tick: silence, never a -2 code decoded
        assert any(f.pcm.any() for f in got_plain[1:])
        assert all(f.pcm.any() for f in got_prompted)  # the prompt covered the delay already
        await plain.close()
        await prompted.close()


async def test_bad_voice_prompt_refuses_that_call_only(tiny_dir: Path, tmp_path: Path) -> None:
    settings = EngineSettings(port=0, backend="moshi", model=str(tiny_dir), device="cpu", num_slots=2)
    async with run_engine(settings, data_dir=tmp_path) as url:
        good = await EngineSession.open(url, call_id="good", timeout=30)
        bad_persona = PersonaParams(voice_prompt_id="missing.wav")
        with pytest.raises(EngineRefused) as refused:
            await EngineSession.open(url, bad_persona, call_id="bad", timeout=30)
        assert refused.value.code == "unknown_persona" and "voice prompt" in str(refused.value)
        await good.send_frame(np.zeros(FRAME_SAMPLES, np.int16))
        assert len(await collect_audio(good, 1)) == 1
        await good.close()


def test_engine_without_a_model_is_a_clear_error() -> None:
    from engine.moshi.backend import build_backend

    with pytest.raises(ModelError, match=r"needs engine\.model"):
        build_backend(EngineSettings(backend="moshi"))
