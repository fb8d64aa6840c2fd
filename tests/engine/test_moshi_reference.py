"""The engine's anchor: B batched calls give exactly the tokens of moshi's own single-stream LMGen per call.

Tiny random weights (fixed seed), greedy decoding, calls starting at different ticks, a slot reused after
its call ends, and slots frozen (no frame ready) for some ticks: every call's text + audio tokens must equal
those of a fresh B=1 ``LMGen`` fed the same audio, frame for frame.
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

from engine.moshi.backend import MoshiBackend
from engine.moshi.loader import LoadedModel, load_model
from engine.moshi.selftest import SCHEDULE, call_audio
from engine.moshi.tiny import write_tiny_model
from engine.protocol import PersonaParams

# The schedule the engine's own selftest runs (calls at different ticks, a slot reused, frozen ticks).
CALLS = SCHEDULE


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=7)


@pytest.fixture(scope="module")
def reference_model(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir)  # a second copy of the weights, independent of the batched backend's


def reference_tokens(loaded: LoadedModel, audio: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """moshi's own single-stream path: fresh Mimi + LMGen at B=1, greedy; None ticks dropped."""
    gen = LMGen(loaded.lm, temp=0.0, temp_text=0.0)
    tokens, pcm = [], []
    with torch.no_grad(), loaded.mimi.streaming(1), gen.streaming(1):
        for frame in audio:
            codes = loaded.mimi.encode(torch.from_numpy(frame).view(1, 1, -1))
            out = gen.step(codes)
            if out is None:
                continue
            tokens.append(out[0, :, 0].numpy().copy())
            pcm.append(loaded.mimi.decode(out[:, 1:])[0, 0].numpy().copy())
    return tokens, pcm


Tokens = dict[str, list[np.ndarray]]


def run_batched(model_dir: Path, num_slots: int) -> tuple[Tokens, Tokens]:
    loaded = load_model(model_dir)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, num_slots)
    audio = {c.name: call_audio(c.name, c.frames) for c in CALLS}
    tokens: dict[str, list[np.ndarray]] = {c.name: [] for c in CALLS}
    pcm: dict[str, list[np.ndarray]] = {c.name: [] for c in CALLS}
    last_tick = max(max(c.ticks()) for c in CALLS)
    try:
        for tick in range(last_tick + 1):
            frames, owner = {}, {}
            for call in CALLS:
                ticks = call.ticks()
                if tick == call.start:
                    backend.start_slot(call.slot, PersonaParams())
                if tick in ticks:
                    frames[call.slot] = audio[call.name][ticks.index(tick)]
                    owner[call.slot] = call.name
            outputs = backend.step(frames)
            for slot, name in owner.items():
                tok = backend.last_tokens[slot]
                if (tok[1:] >= 0).all():
                    tokens[name].append(tok.copy())
                    pcm[name].append(outputs[slot].pcm)
                else:  # the delay tick of a fresh call: nothing generated, silence out
                    assert not outputs[slot].pcm.any()
            for call in CALLS:
                if tick == call.ticks()[-1]:
                    backend.end_slot(call.slot)
    finally:
        backend.close()
    return tokens, pcm


def test_batched_calls_match_single_stream_reference(tiny_dir: Path, reference_model: LoadedModel) -> None:
    tokens, pcm = run_batched(tiny_dir, num_slots=3)
    for call in CALLS:
        ref_tokens, ref_pcm = reference_tokens(reference_model, call_audio(call.name, call.frames))
        assert len(ref_tokens) == call.frames - 1  # max_delay = 1 tick without output
        got = np.stack(tokens[call.name])
        want = np.stack(ref_tokens)
        assert got.shape == want.shape, call.name
        mismatch = np.argwhere(got != want)
        assert mismatch.size == 0, f"call {call.name}: first token mismatch at (frame, stream) {mismatch[0]}"
        np.testing.assert_allclose(np.stack(pcm[call.name]), np.stack(ref_pcm), atol=1e-4)


def test_reference_is_sensitive_to_input(reference_model: LoadedModel) -> None:
    """Guards the anchor against passing vacuously: other audio gives other tokens."""
    a, _ = reference_tokens(reference_model, call_audio("a", 6))
    b, _ = reference_tokens(reference_model, call_audio("zz", 6))
    assert not np.array_equal(np.stack(a), np.stack(b))
