"""Persona prompts and the prefix cache: a slot started from the cached prefix equals one run live."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

from engine.assets import AssetStore
from engine.backend import BackendError
from engine.moshi.backend import MoshiBackend
from engine.moshi.loader import load_model
from engine.moshi.persona import SILENCE_FRAMES, build_plan
from engine.moshi.tiny import write_tiny_model
from engine.protocol import FRAME_SAMPLES, PersonaParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def voice_wav(data_dir: Path) -> str:
    """A voice prompt stored as the admin CLI stores them; returns its asset id."""
    (data_dir / "voices").mkdir(exist_ok=True)
    path = data_dir / "voices" / "voice.wav"
    rng = np.random.default_rng(3)
    t = np.arange(16_000) / 16_000  # 1 s at 16 kHz: exercises the resampler too
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 0.02, t.size)) * 32767
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return path.name


def frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.1, FRAME_SAMPLES).astype(np.float32) for _ in range(n)]


def drive(backend: MoshiBackend, persona: PersonaParams) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Slot 0 talks from tick 0; slot 1 starts with ``persona`` at tick 2. Returns both slots' tokens."""
    a, b = frames(1, 8), frames(2, 6)
    backend.start_slot(0, PersonaParams())
    toks0, toks1, start_ms = [], [], 0.0
    for tick in range(8):
        if tick == 2:
            backend.start_slot(1, persona)
            start_ms = backend.last_start_ms
        batch = {0: a[tick]}
        if tick >= 2:
            batch[1] = b[tick - 2]
        backend.step(batch)
        toks0.append(backend.last_tokens[0].copy())
        if tick >= 2:
            toks1.append(backend.last_tokens[1].copy())
    return toks0, toks1, start_ms


def test_cached_prefix_equals_live_prompt(tiny_dir: Path, voice_wav: str, data_dir: Path) -> None:
    persona = PersonaParams(name="clinic", text_prompt="You are a helpful assistant.",
                            voice_prompt_id=voice_wav)
    cached_model, live_model = load_model(tiny_dir), load_model(tiny_dir)
    assets = AssetStore(data_dir)
    cached = MoshiBackend(cached_model.lm, cached_model.mimi, cached_model.tokenizer, 3, assets=assets)
    live = MoshiBackend(live_model.lm, live_model.mimi, live_model.tokenizer, 3, use_prefix_cache=False,
                        assets=assets)
    try:
        cached.prepare_persona(persona)
        c0, c1, cached_ms = drive(cached, persona)
        l0, l1, live_ms = drive(live, persona)
        print(f"\nstart_slot with persona: cached prefix {cached_ms:.2f} ms, live prompt {live_ms:.1f} ms "
              f"(prefix build {cached.prefix_info()[0][2]:.1f} ms, {cached.prefix_info()[0][1]} frames)")
        np.testing.assert_array_equal(np.stack(c1), np.stack(l1))
        np.testing.assert_array_equal(np.stack(c0), np.stack(l0))  # the other slot is undisturbed
        assert (np.stack(c1) >= 0).all()  # the prompt already covered the delay: no -2 ticks after it
    finally:
        cached.close()
        live.close()


def test_prompt_changes_the_call_and_is_built_once(tiny_dir: Path) -> None:
    model = load_model(tiny_dir)
    backend = MoshiBackend(model.lm, model.mimi, model.tokenizer, 2)
    try:
        plain = drive(backend, PersonaParams())[1]
        persona = PersonaParams(text_prompt="Speak slowly and clearly.")
        prompted = drive(backend, persona)[1]
        same_prompt = PersonaParams(name="other name", text_prompt="Speak slowly and clearly.")
        again = drive(backend, same_prompt)[1]
        assert not np.array_equal(np.stack(plain[1:]), np.stack(prompted[1:]))
        np.testing.assert_array_equal(np.stack(prompted), np.stack(again))  # slot reuse leaks nothing
        assert len(backend.prefix_info()) == 1
        backend.max_prefixes = 2
        for text in ("one", "two", "three"):
            backend.prepare_persona(PersonaParams(text_prompt=text))
        assert [key[0] for key, _, _ in backend.prefix_info()] == ["two", "three"]  # LRU bound
    finally:
        backend.close()


def test_plan_layout(tiny_dir: Path) -> None:
    model = load_model(tiny_dir)
    plan = build_plan(PersonaParams(text_prompt="Hello there"), model.tokenizer, pad_id=3, voice_path=None)
    ids = model.tokenizer.encode("<system> Hello there <system>")
    assert plan.frames == 2 * SILENCE_FRAMES + len(ids)
    assert list(plan.text_tokens[SILENCE_FRAMES: SILENCE_FRAMES + len(ids)]) == ids
    assert (plan.text_tokens[:SILENCE_FRAMES] == 3).all() and (plan.text_tokens[-SILENCE_FRAMES:] == 3).all()
    assert not plan.user_pcm.any() and not plan.agent_pcm.any()


def test_bad_voice_prompt_is_a_backend_error_and_others_continue(tiny_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_dir)
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "garbage.wav").write_bytes(b"RIFF not really a wav")
    (tmp_path / "elsewhere.wav").write_bytes(b"RIFF")
    (tmp_path / "voices" / "link.wav").symlink_to(tmp_path / "elsewhere.wav")
    backend = MoshiBackend(model.lm, model.mimi, model.tokenizer, 2, assets=AssetStore(tmp_path))
    try:
        backend.start_slot(0, PersonaParams())
        backend.step({0: frames(5, 1)[0]})
        for voice_id in ("garbage.wav", "missing.wav", "link.wav"):
            with pytest.raises(BackendError, match=r"voice prompt|outside"):
                backend.prepare_persona(PersonaParams(voice_prompt_id=voice_id))
            with pytest.raises(BackendError, match=r"voice prompt|outside"):
                backend.start_slot(1, PersonaParams(voice_prompt_id=voice_id))
        out = backend.step({0: frames(5, 2)[1]})
        assert out[0].pcm.shape == (FRAME_SAMPLES,) and np.isfinite(out[0].pcm).all()
    finally:
        backend.close()


def test_out_of_device_memory_fails_that_call_only(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU out of memory while a persona's prefix is built (the one eager, allocating path of a start):
    a clear error for that call, the cache emptied, the other calls go on; the next start retries."""
    import torch

    from engine.moshi import persona as prompts

    model = load_model(tiny_dir)
    backend = MoshiBackend(model.lm, model.mimi, model.tokenizer, 2)
    real = prompts.forced_step

    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        backend.start_slot(0, PersonaParams())
        backend.step({0: frames(5, 1)[0]})
        monkeypatch.setattr(prompts, "forced_step", out_of_memory)
        with pytest.raises(BackendError, match="out of device memory building its prompt prefix"):
            backend.start_slot(1, PersonaParams(text_prompt="Be brief."))
        out = backend.step({0: frames(5, 2)[1]})
        assert np.isfinite(out[0].pcm).all()
        monkeypatch.setattr(prompts, "forced_step", real)
        assert backend.start_slot(1, PersonaParams(text_prompt="Be brief.")) == []
        assert len(backend.prefix_info()) == 1
    finally:
        backend.close()


def test_out_of_device_memory_in_a_step_is_a_backend_error(tiny_dir: Path) -> None:
    """The scheduler fails that batch's calls with this message (tests/engine/test_scheduler.py covers the
    engine going on); the backend itself stays usable."""
    import torch

    model = load_model(tiny_dir)
    backend = MoshiBackend(model.lm, model.mimi, model.tokenizer, 1)
    try:
        backend.start_slot(0, PersonaParams())
        real = backend.lm_gen.step

        def out_of_memory(*args: object, **kwargs: object) -> object:
            raise torch.OutOfMemoryError("CUDA out of memory")

        backend.lm_gen.step = out_of_memory  # type: ignore[method-assign]
        with pytest.raises(BackendError, match=r"out of device memory in the batched step of slots \[0\]"):
            backend.step({0: frames(6, 1)[0]})
        backend.lm_gen.step = real  # type: ignore[method-assign]
        backend.start_slot(0, PersonaParams())
        assert np.isfinite(backend.step({0: frames(6, 1)[0]})[0].pcm).all()
    finally:
        backend.close()
