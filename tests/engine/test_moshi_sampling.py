"""Sampling per call: with the same seed, every batched call samples exactly the tokens of moshi's own
single-stream ``LMGen`` (unmodified, ``use_sampling=True``) seeded the same way, whatever its neighbours do.

The reference seeds the process-wide generator (``torch.manual_seed(seed)``), as a single moshi process
serving one call would; the batched engine gives each slot its own generator with that seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

import torch
from moshi.models.lm import LMGen

from engine.moshi.backend import MOSHI_DEFAULTS, MoshiBackend
from engine.moshi.loader import LoadedModel, load_model
from engine.moshi.sampling import SamplingParams
from engine.moshi.selftest import SCHEDULE, Call, call_audio, run_schedule
from engine.moshi.tiny import write_tiny_model
from engine.protocol import PersonaParams

SEEDS = {c.name: 1000 + 7 * i for i, c in enumerate(SCHEDULE)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def reference_model(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir)


def reference_tokens(loaded: LoadedModel, audio: np.ndarray, seed: int, params: SamplingParams) -> np.ndarray:
    torch.manual_seed(seed)
    gen = LMGen(loaded.lm, use_sampling=True, temp=params.temp, top_k=params.top_k,
                temp_text=params.temp_text, top_k_text=params.top_k_text)
    out_tokens = []
    with torch.no_grad(), loaded.mimi.streaming(1), gen.streaming(1):
        for frame in audio:
            out = gen.step(loaded.mimi.encode(torch.from_numpy(frame).view(1, 1, -1)))
            if out is not None:
                out_tokens.append(out[0, :, 0].numpy().copy())
    return np.stack(out_tokens)


def run_batched(model_dir: Path, calls: tuple[Call, ...], seeds: dict[str, int],
                persona: PersonaParams | None = None) -> dict[str, np.ndarray]:
    loaded = load_model(model_dir)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, 3, sampling=MOSHI_DEFAULTS)
    try:
        personas = {c.name: persona for c in calls} if persona is not None else None
        tokens, _ = run_schedule(backend, calls, personas, seeds)
        return tokens
    finally:
        backend.close()


def test_batched_sampling_equals_single_stream_lmgen_with_the_same_seed(
        tiny_dir: Path, reference_model: LoadedModel) -> None:
    got = run_batched(tiny_dir, SCHEDULE, SEEDS)
    for call in SCHEDULE:
        want = reference_tokens(reference_model, call_audio(call.name, call.frames), SEEDS[call.name],
                                MOSHI_DEFAULTS)
        assert got[call.name].shape == want.shape, call.name
        mismatch = np.argwhere(got[call.name] != want)
        assert mismatch.size == 0, f"call {call.name}: first mismatch at (frame, stream) {mismatch[0]}"


def test_sampling_is_really_random_and_replayable(tiny_dir: Path, reference_model: LoadedModel) -> None:
    """Guards against a vacuous pass: other seeds sample other tokens, greedy differs from sampled, and a
    stored seed replays its call exactly."""
    call = SCHEDULE[0]
    audio = call_audio(call.name, call.frames)
    a = reference_tokens(reference_model, audio, 1, MOSHI_DEFAULTS)
    b = reference_tokens(reference_model, audio, 2, MOSHI_DEFAULTS)
    assert not np.array_equal(a, b)
    again = run_batched(tiny_dir, (call,), {call.name: 1})[call.name]
    np.testing.assert_array_equal(again, a)


def test_a_persona_can_ask_for_greedy(tiny_dir: Path, reference_model: LoadedModel) -> None:
    call = SCHEDULE[1]
    greedy = PersonaParams(temp=0.0, temp_text=0.0)
    got = run_batched(tiny_dir, (call,), {call.name: 99}, greedy)[call.name]
    gen = LMGen(reference_model.lm, temp=0.0, temp_text=0.0)
    want = []
    with torch.no_grad(), reference_model.mimi.streaming(1), gen.streaming(1):
        for frame in call_audio(call.name, call.frames):
            out = gen.step(reference_model.mimi.encode(torch.from_numpy(frame).view(1, 1, -1)))
            if out is not None:
                want.append(out[0, :, 0].numpy().copy())
    np.testing.assert_array_equal(got, np.stack(want))
