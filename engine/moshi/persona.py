"""Persona prompts, PersonaPlex style, and the prefix cache that makes a prompted call start in milliseconds.

The prompt is fed one 80 ms frame per LM step before live audio (PersonaPlex ``step_system_prompts``):
  1. the voice prompt: its Mimi codes forced as the *agent's* audio, text PAD, a 440 Hz tone as the user;
  2. 0.5 s of silence (both streams), text PAD;
  3. ``<system> text <system>``: one text token forced per frame, silence on both audio streams;
  4. 0.5 s of silence.
Agent tokens are forced through ``LMGen.step(depformer_replace_tokens=…)`` (audio, codebook delays
respected) and by overwriting the sampled text token in LMGen's token cache (text), so the LM's KV cache
holds exactly what a live prompt would leave there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.moshi.state_copy import RowSnapshot
from engine.protocol import FRAME_SAMPLES, SAMPLE_RATE, PersonaParams

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMGen

SILENCE_FRAMES = 6  # 0.5 s at 12.5 Hz (rounded up, PersonaPlex uses 0.5 s)
MAX_VOICE_PROMPT_S = 30.0
TONE_HZ = 440.0


class PersonaError(ValueError):
    pass


@dataclass(frozen=True)
class PromptPlan:
    """The prompt as per-frame inputs: user PCM, agent PCM and forced text token (PAD when not text)."""

    user_pcm: np.ndarray  # float32 (frames, FRAME_SAMPLES)
    agent_pcm: np.ndarray  # float32 (frames, FRAME_SAMPLES)
    text_tokens: np.ndarray  # int64 (frames,)

    @property
    def frames(self) -> int:
        return int(self.text_tokens.shape[0])


def persona_key(persona: PersonaParams, adapter_id: str | None) -> tuple[str, str, str]:
    """What the prefix depends on: the prompt, the voice and the adapter actually in use (not the display
    name: two personas with one prompt share a prefix)."""
    return (persona.text_prompt, persona.voice_prompt_id or "", adapter_id or "")


def has_prompt(persona: PersonaParams) -> bool:
    return bool(persona.text_prompt.strip() or persona.voice_prompt_id)


def read_voice_prompt(path: str) -> np.ndarray:
    """Any file libsndfile reads (the bridge stores 16-bit mono WAV at 24 kHz; WAV of any depth,
    WAVE_FORMAT_EXTENSIBLE, FLAC, OGG work too), mixed to mono, resampled to 24 kHz with soxr, float32."""
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise PersonaError(f"voice prompt {path!r}: {str(exc).splitlines()[0]}") from None
    pcm = data.mean(axis=1).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        import soxr

        pcm = soxr.resample(pcm, rate, SAMPLE_RATE).astype(np.float32)
    if pcm.size > MAX_VOICE_PROMPT_S * SAMPLE_RATE:
        raise PersonaError(f"voice prompt {path!r} is longer than {MAX_VOICE_PROMPT_S:.0f} s")
    return pcm


def _frames(pcm: np.ndarray) -> np.ndarray:
    n = max(1, -(-pcm.size // FRAME_SAMPLES))
    out = np.zeros(n * FRAME_SAMPLES, dtype=np.float32)
    out[: pcm.size] = pcm
    return out.reshape(n, FRAME_SAMPLES)


def build_plan(persona: PersonaParams, tokenizer: sentencepiece.SentencePieceProcessor | None,
               pad_id: int, voice_path: str | None) -> PromptPlan:
    """The prompt's frames; ``voice_path`` is the persona's voice prompt resolved by the engine."""
    voice = _frames(read_voice_prompt(voice_path)) if voice_path else np.zeros((0, FRAME_SAMPLES), np.float32)
    if persona.text_prompt.strip() and tokenizer is None:
        raise PersonaError("a text prompt needs the model's tokenizer")
    text_ids: list[int] = []
    if persona.text_prompt.strip():
        assert tokenizer is not None
        text_ids = list(tokenizer.encode(f"<system> {persona.text_prompt.strip()} <system>"))
    n_voice, n_text = voice.shape[0], len(text_ids)
    total = n_voice + SILENCE_FRAMES + n_text + SILENCE_FRAMES
    t = np.arange(n_voice * FRAME_SAMPLES, dtype=np.float32) / SAMPLE_RATE
    user = np.zeros((total, FRAME_SAMPLES), np.float32)
    user[:n_voice] = (0.1 * np.sin(2 * np.pi * TONE_HZ * t)).reshape(n_voice, FRAME_SAMPLES)
    agent = np.zeros((total, FRAME_SAMPLES), np.float32)
    agent[:n_voice] = voice
    text = np.full(total, pad_id, dtype=np.int64)
    text[n_voice + SILENCE_FRAMES: n_voice + SILENCE_FRAMES + n_text] = text_ids
    return PromptPlan(user_pcm=user, agent_pcm=agent, text_tokens=text)


@contextlib.contextmanager
def side_stream(*modules: Any, batch_size: int = 1) -> Iterator[None]:
    """Run ``modules`` in a fresh streaming state of ``batch_size`` and put their batch state back after.

    The first module is entered; the others are only stashed (e.g. the LM, which LMGen enters itself).
    """
    saved = [m.get_streaming_state() for m in modules]
    for m, states in zip(modules, saved, strict=True):
        m.set_streaming_state(dict.fromkeys(states))
    try:
        with modules[0].streaming(batch_size):
            yield
    finally:
        for m, states in zip(modules, saved, strict=True):
            m.set_streaming_state(states)


def encode_frames(mimi: MimiModel, pcm: np.ndarray, device: torch.device) -> torch.Tensor:
    """Stream (frames, FRAME_SAMPLES) through Mimi's current B=1 state: codes (1, n_q, frames)."""
    codes = [mimi.encode(torch.from_numpy(frame).to(device).view(1, 1, -1)) for frame in pcm]
    return torch.cat(codes, dim=-1)


def agent_replace_tokens(agent_codes: torch.Tensor, step: int, delays: list[int]) -> torch.Tensor:
    """Codes to force at LM step ``step``: codebook k carries frame ``step - delay_k`` (clamped at 0)."""
    cols = [agent_codes[:, k, max(0, step - d)] for k, d in enumerate(delays)]
    return torch.stack(cols, dim=1)[:, :, None]


def forced_step(lm_gen: LMGen, user_codes: torch.Tensor, replace: torch.Tensor | None, text: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor | None:
    """One LM step with the agent's audio and text forced for ``rows`` (bool mask, the exec mask)."""
    out = lm_gen.step(user_codes, depformer_replace_tokens=replace)
    state = lm_gen._streaming_state
    assert state is not None
    pos = state.offsets % state.cache.shape[2]
    forced = torch.where(rows, text, state.cache[torch.arange(state.batch_size), 0, pos])
    state.cache[torch.arange(state.batch_size), 0, pos] = forced
    return out


@dataclass
class PersonaPrefix:
    """The streaming state of one stream after the prompt, as tensors only (``RowSnapshot``: no State
    objects, no CUDA graphs, only the KV positions the prompt wrote): what ``start_slot`` copies into a
    slot."""

    key: tuple[str, str, str]
    frames: int
    mimi: RowSnapshot
    gen: RowSnapshot
    lm: RowSnapshot
    build_ms: float

    @property
    def nbytes(self) -> int:
        return self.mimi.nbytes + self.gen.nbytes + self.lm.nbytes


def encode_agent_codes(mimi: MimiModel, plan: PromptPlan, device: torch.device) -> torch.Tensor:
    with side_stream(mimi):
        return encode_frames(mimi, plan.agent_pcm, device)
