"""MoshiBackend: one Moshi LM + Mimi stepping a fixed set of call slots together, 80 ms per tick.

Streaming state is allocated once for ``num_slots`` rows (static shapes; CUDA graphs on GPU). Per tick:
Mimi encodes the given slots' PCM, ``LMGen.step`` produces text + agent audio codes, Mimi decodes them.
Slots not given are frozen with ``set_exec_mask`` (their state does not move), a new call resets only its
row (``reset_streaming(mask)``), and a persona's prompted state is copied into the row from the prefix
cache. ``LMGen(support_out_of_sync=True)`` lets rows be at different positions; a freshly reset row yields
``-2`` (ungenerated) codes for ``max_delay`` ticks, which are never decoded (the row's decoder stays put,
exactly as moshi's own server skips those ticks).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from contextlib import ExitStack
from typing import TYPE_CHECKING

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
from moshi.models.lm import LMGen

from engine.backend import FRAME_SAMPLES, SAMPLE_RATE, BackendError, PersonaParams, StepOutput
from engine.moshi import persona as prompts
from engine.moshi.state_copy import StateShapeError, copy_state_row

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from bridge.config import EngineSettings

log = logging.getLogger(__name__)
_SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.float32)


class BadFrameError(BackendError):
    """One or more slots sent an unusable frame; ``slots`` names them. No state was changed."""

    def __init__(self, message: str, slots: list[int]) -> None:
        super().__init__(message)
        self.slots = slots


class MoshiBackend:
    name = "moshi"
    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, lm: LMModel, mimi: MimiModel, tokenizer: sentencepiece.SentencePieceProcessor | None,
                 num_slots: int, *, temp: float = 0.0, temp_text: float = 0.0,
                 use_prefix_cache: bool = True, max_prefixes: int = 8) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.num_slots = num_slots
        self.device = lm.device
        self.use_prefix_cache = use_prefix_cache
        self.lm_gen = LMGen(lm, use_sampling=temp > 0 or temp_text > 0, temp=temp, temp_text=temp_text,
                            support_out_of_sync=True)
        self.dep_q = lm.dep_q
        self.audio_delays = list(lm.delays[1: lm.dep_q + 1])
        self.pad_id = lm.text_padding_token_id
        self._vocab = tokenizer.vocab_size() if tokenizer is not None else 0
        # LRU: a prefix holds a whole B=1 streaming state (for Moshi 7B ~1.5 GB of KV cache in bf16).
        self._prefixes: OrderedDict[tuple[str, str, str], prompts.PersonaPrefix] = OrderedDict()
        self.max_prefixes = max(1, max_prefixes)
        # slot -> (1 + dep_q,) int64 tokens of its last step (text, audio); -2 = not generated yet
        self.last_tokens: dict[int, np.ndarray] = {}
        self.last_start_ms = 0.0
        self.phase_ms: dict[str, list[float]] | None = None  # the benchmark sets it to time encode/lm/decode
        self._stack = ExitStack()  # the streaming contexts, closed by close(); grad is off per call
        self._stack.enter_context(mimi.streaming(num_slots))
        self._stack.enter_context(self.lm_gen.streaming(num_slots))
        self._rows = torch.arange(num_slots, device=self.device)

    # --- persona prefix -------------------------------------------------------------------------------

    @staticmethod
    def _check_persona(persona: PersonaParams) -> None:
        if persona.lora_path:  # refuse rather than silently serve the base model
            raise BackendError(f"persona {persona.name!r}: LoRA adapters are not supported by this engine")

    def prepare_persona(self, persona: PersonaParams) -> None:
        self._check_persona(persona)
        if not prompts.has_prompt(persona) or not self.use_prefix_cache:
            return
        key = prompts.persona_key(persona)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return
        self._prefixes[key] = self._build_prefix(persona)
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.popitem(last=False)

    def _plan(self, persona: PersonaParams) -> prompts.PromptPlan:
        if persona.text_prompt.strip() and self.tokenizer is None:
            raise BackendError("a text prompt needs the model's tokenizer")
        try:
            return prompts.build_plan(persona, self.tokenizer, self.pad_id)  # type: ignore[arg-type]
        except prompts.PersonaError as exc:
            raise BackendError(str(exc)) from None

    def _build_prefix(self, persona: PersonaParams) -> prompts.PersonaPrefix:
        t0 = time.perf_counter()
        plan = self._plan(persona)
        with torch.no_grad():
            agent = prompts.encode_agent_codes(self.mimi, plan, self.device)
            with prompts.side_stream(self.mimi), prompts.side_stream(self.lm_gen, self.lm):
                self.lm_gen.reset_streaming()
                user = prompts.encode_frames(self.mimi, plan.user_pcm, self.device)
                one = torch.ones(1, dtype=torch.bool, device=self.device)
                for i in range(plan.frames):
                    prompts.forced_step(self.lm_gen, user[:, :, i: i + 1],
                                        prompts.agent_replace_tokens(agent, i, self.audio_delays),
                                        torch.tensor([plan.text_tokens[i]], device=self.device), one)
                # Encoder history = the prompt's user stream; the decoder never ran, so it is fresh.
                mimi_state = self.mimi.get_streaming_state()
                gen_state = self.lm_gen.get_streaming_state()
                lm_state = self.lm.get_streaming_state()
        return prompts.PersonaPrefix(key=prompts.persona_key(persona), frames=plan.frames,
                                     mimi_state=mimi_state, gen_state=gen_state, lm_state=lm_state,
                                     build_ms=(time.perf_counter() - t0) * 1e3)

    # --- slots ----------------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise BackendError(f"slot {slot!r} out of range 0..{self.num_slots - 1}")

    def start_slot(self, slot: int, persona: PersonaParams) -> None:
        self._check_slot(slot)
        self._check_persona(persona)
        t0 = time.perf_counter()
        mask = self._rows == slot
        with torch.no_grad():
            self.mimi.reset_streaming(mask)
            self.lm_gen.reset_streaming(mask)
            self.last_tokens.pop(slot, None)
            if prompts.has_prompt(persona):
                if self.use_prefix_cache:
                    self.prepare_persona(persona)
                    self._load_prefix(slot, self._prefixes[prompts.persona_key(persona)])
                else:
                    self._run_prompt_live(slot, persona)
        self.last_start_ms = (time.perf_counter() - t0) * 1e3

    def _load_prefix(self, slot: int, prefix: prompts.PersonaPrefix) -> None:
        try:
            copy_state_row(prefix.mimi_state, self.mimi.get_streaming_state(), slot)
            copy_state_row(prefix.gen_state, self.lm_gen.get_streaming_state(), slot)
            copy_state_row(prefix.lm_state, self.lm.get_streaming_state(), slot)
        except StateShapeError as exc:
            raise BackendError(f"persona prefix does not fit slot {slot}: {exc}") from None

    def _run_prompt_live(self, slot: int, persona: PersonaParams) -> None:
        """The uncached path: the prompt stepped in the batch with only this slot executing."""
        plan = self._plan(persona)
        agent = prompts.encode_agent_codes(self.mimi, plan, self.device).expand(self.num_slots, -1, -1)
        mask = self._rows == slot
        self.mimi.set_exec_mask(mask)
        self.lm_gen.set_exec_mask(mask)
        for i in range(plan.frames):
            pcm = torch.zeros(self.num_slots, 1, FRAME_SAMPLES, device=self.device)
            pcm[slot, 0] = torch.from_numpy(plan.user_pcm[i]).to(self.device)
            user = self.mimi.encode(pcm)
            text = torch.full((self.num_slots,), int(plan.text_tokens[i]), device=self.device)
            prompts.forced_step(self.lm_gen, user, prompts.agent_replace_tokens(agent, i, self.audio_delays),
                                text, mask)

    def end_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.last_tokens.pop(slot, None)  # state stays until the next start_slot resets it

    # --- the tick -------------------------------------------------------------------------------------

    def _validate(self, frames: dict[int, np.ndarray]) -> None:
        bad: list[int] = []
        reasons: list[str] = []
        for slot, pcm in frames.items():
            if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
                bad.append(slot)
                reasons.append(f"slot {slot!r} out of range")
            elif not isinstance(pcm, np.ndarray) or pcm.shape != (FRAME_SAMPLES,):
                bad.append(slot)
                reasons.append(f"slot {slot}: frame must have shape ({FRAME_SAMPLES},), got "
                               f"{getattr(pcm, 'shape', type(pcm).__name__)}")
            elif not np.isfinite(pcm).all():
                bad.append(slot)
                reasons.append(f"slot {slot}: frame has NaN/inf samples")
        if bad:
            raise BadFrameError("; ".join(reasons), bad)

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        self._validate(frames)
        if not frames:
            return {}
        slots = sorted(frames)
        index = torch.tensor(slots, device=self.device)
        active = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)
        active[index] = True
        pcm = np.zeros((self.num_slots, 1, FRAME_SAMPLES), dtype=np.float32)
        for slot in slots:
            pcm[slot, 0] = np.clip(frames[slot], -1.0, 1.0)
        phases = self.phase_ms
        t0 = self._mark(phases, None, "")
        with torch.no_grad():
            self.mimi.set_exec_mask(active)
            codes = self.mimi.encode(torch.from_numpy(pcm).to(self.device))
            t0 = self._mark(phases, t0, "encode")
            self.lm_gen.set_exec_mask(active)
            tokens = self.lm_gen.step(codes)
            assert tokens is not None  # support_out_of_sync: never None
            t0 = self._mark(phases, t0, "lm")
            audio = tokens[:, 1:, :]
            ready = active & (audio >= 0).all(dim=2).all(dim=1)
            out_pcm: np.ndarray | None = None
            if bool(ready.any()):
                self.mimi.set_exec_mask(ready)
                decoded = self.mimi.decode(torch.where(audio >= 0, audio, torch.zeros_like(audio)))
                out_pcm = decoded[:, 0, :].float().cpu().numpy()
            self._mark(phases, t0, "decode")
        tok = tokens[:, :, 0].cpu().numpy()
        ready_np = ready.cpu().numpy()
        result: dict[int, StepOutput] = {}
        for slot in slots:
            self.last_tokens[slot] = tok[slot].copy()
            pcm_out = out_pcm[slot].astype(np.float32) if out_pcm is not None and ready_np[slot] else _SILENCE
            result[slot] = StepOutput(pcm=pcm_out, text=self._text(int(tok[slot, 0])))
        return result

    def _mark(self, phases: dict[str, list[float]] | None, t0: float | None, name: str) -> float | None:
        """Phase timing for the benchmark only (``phase_ms`` set): synchronizes the device, so it costs."""
        if phases is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if t0 is not None:
            phases.setdefault(name, []).append((now - t0) * 1e3)
        return now

    def _text(self, token: int) -> str:
        if self.tokenizer is None or token < 0 or token in (0, self.pad_id) or token >= self._vocab:
            return ""
        return str(self.tokenizer.id_to_piece(token)).replace("\u2581", " ")

    def prefix_info(self) -> list[tuple[tuple[str, str, str], int, float]]:
        return [(p.key, p.frames, p.build_ms) for p in self._prefixes.values()]

    def close(self) -> None:
        self._prefixes.clear()
        self._stack.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp8": torch.bfloat16 if device.type == "cuda" else torch.float32}[name]


def build_backend(settings: EngineSettings) -> MoshiBackend:
    """The engine server's factory: load ``settings.model`` and build the batched backend."""
    from engine.moshi.loader import ModelError, load_model

    if not settings.model:
        raise ModelError("engine.backend = 'moshi' needs engine.model (a weights dir or a cached HF repo id)")
    device = resolve_device(settings.device)
    if not settings.cuda_graphs:
        os.environ["NO_CUDA_GRAPH"] = "1"  # read by moshi's CUDAGraphed on every call
    loaded = load_model(settings.model, device=device, dtype=resolve_dtype(settings.dtype, device))
    if settings.dtype == "fp8":
        from engine.moshi.fp8 import quantize_lm_fp8

        quantize_lm_fp8(loaded.lm)
    return MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, settings.num_slots)
