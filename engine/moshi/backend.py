"""MoshiBackend: one Moshi LM + Mimi stepping a fixed set of call slots together, 80 ms per tick.

Streaming state is allocated once for ``num_slots`` rows (static shapes; CUDA graphs on GPU). Per tick:
Mimi encodes the given slots' PCM, the LM steps (``SlotLMGen``: moshi's ``LMGen`` with per-slot sampling),
Mimi decodes. Slots not given are frozen with ``set_exec_mask`` (their state does not move), a new call
resets only its row (``reset_streaming(mask)``), takes its own sampler seed and LoRA adapter page, and gets
its persona's prompted state copied in from the prefix cache. ``support_out_of_sync`` lets rows be at
different positions; a freshly reset row yields ``-2`` (ungenerated) codes for ``max_delay`` ticks, which
are never decoded (the row's decoder stays put, exactly as moshi's own server skips those ticks).

On CUDA the LM step runs as CUDA graphs; with adapters there are two sets (low-rank path on and off), so
batches without adapters pay nothing for them and switching costs no re-capture.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
from moshi.utils.compile import CUDAGraphed, no_cuda_graph

from engine.assets import AssetError, AssetStore
from engine.backend import FRAME_SAMPLES, SAMPLE_RATE, BackendError, PersonaParams, StepOutput
from engine.moshi import persona as prompts
from engine.moshi.generator import SlotLMGen
from engine.moshi.lora import Adapter, AdapterBank, AdapterError
from engine.moshi.sampling import SamplingParams, SlotSampler
from engine.moshi.state_copy import StateShapeError, load_row, snapshot_row

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

    from engine.config import EngineSettings

log = logging.getLogger(__name__)
_SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.float32)
GREEDY = SamplingParams(temp=0.0, top_k=1, temp_text=0.0, top_k_text=1)
MOSHI_DEFAULTS = SamplingParams(temp=0.8, top_k=250, temp_text=0.7, top_k_text=25)


class ExtendedTokenizer:
    """An adapter's extended SentencePiece model seen in model text ids: its ids below ``base`` are the base
    tokenizer's, its new ids ``base + i`` are model ids ``text_card + 1 + i`` (``base == text_card``)."""

    def __init__(self, path: Path, base: int) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.base = base

    def encode(self, text: str) -> list[int]:
        return [i if i < self.base else i + 1 for i in self.sp.encode(text)]

    def piece(self, token: int) -> str:
        index = token if token < self.base else token - 1
        if index >= self.sp.vocab_size():
            return ""
        return str(self.sp.id_to_piece(index)).replace("\u2581", " ")


class BadFrameError(BackendError):
    """One or more slots sent an unusable frame; ``slots`` names them. No state was changed."""

    def __init__(self, message: str, slots: list[int]) -> None:
        super().__init__(message)
        self.slots = slots


@dataclass(frozen=True)
class AdapterOptions:
    pages: int = 4  # adapters resident at once
    max_rank: int = 32
    targets: tuple[str, ...] = ("transformer.*",)
    cache_bytes: int = 2 << 30
    base: dict[str, Any] | None = None  # base_identity() of the loaded model; None: not checked
    max_added: int = 0  # new text tokens an adapter may bring (0: vocabulary extensions refused)


class MoshiBackend:
    name = "moshi"
    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES

    def __init__(self, lm: LMModel, mimi: MimiModel, tokenizer: sentencepiece.SentencePieceProcessor | None,
                 num_slots: int, *, sampling: SamplingParams = GREEDY, max_top_k: int = 250,
                 use_prefix_cache: bool = True, max_prefixes: int = 8, assets: AssetStore | None = None,
                 adapters: AdapterOptions | None = None, kv_fp8: bool = False) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.num_slots = num_slots
        self.device = lm.device
        self.assets = assets
        self.use_prefix_cache = use_prefix_cache
        self.sampling = sampling
        self.kv_dtype = "fp8" if kv_fp8 else str(lm.dtype).removeprefix("torch.")
        if kv_fp8:
            from engine.moshi.kv_fp8 import use_fp8_kv

            use_fp8_kv(lm)
        opts = adapters or AdapterOptions(pages=0)
        self.bank: AdapterBank | None = None
        if opts.pages > 0:
            self.bank = AdapterBank(lm, num_slots, opts.pages, opts.max_rank, list(opts.targets),
                                    opts.base or {}, opts.cache_bytes, opts.max_added)
        self.sampler = SlotSampler(num_slots, lm.dep_q, max_top_k, self.device)
        self.lm_gen = SlotLMGen(lm, self.sampler)
        self.dep_q = lm.dep_q
        self.audio_delays = list(lm.delays[1: lm.dep_q + 1])
        self.pad_id = lm.text_padding_token_id
        self._vocab = tokenizer.vocab_size() if tokenizer is not None else 0
        self._vocab_text = int(lm.text_linear.out_features)
        self._vocab_audio = int(lm.linears[0].out_features)  # type: ignore[arg-type]
        self._prefixes: OrderedDict[tuple[str, str, str], prompts.PersonaPrefix] = OrderedDict()
        self._text_card = int(lm.text_card)
        self._tokenizers: dict[str, ExtendedTokenizer] = {}  # extended tokenizers by file
        self._slot_tokenizer: dict[int, Any] = {}  # the tokenizer each call's text is decoded with
        self.max_prefixes = max(1, max_prefixes)
        # slot -> (1 + dep_q,) int64 tokens of its last step (text, audio); -2 = not generated yet
        self.last_tokens: dict[int, np.ndarray] = {}
        self.last_start_ms = 0.0
        self.last_adapter_ms = 0.0
        self.phase_ms: dict[str, list[float]] | None = None  # the benchmark sets it to time encode/lm/decode
        self._stack = ExitStack()  # the streaming contexts, closed by close(); grad is off per call
        self._stack.enter_context(mimi.streaming(num_slots))
        self._stack.enter_context(self.lm_gen.streaming(num_slots))
        self._rows = torch.arange(num_slots, device=self.device)
        state = self.lm_gen._streaming_state
        assert state is not None
        graphs_off = self.device.type != "cuda"
        # Graph sets by "any adapter in use": each captured on first use, both kept.
        self._graphs = {False: (state.graphed_main, state.graphed_depth)}
        if self.bank is not None:
            self._graphs[True] = (CUDAGraphed(lm.forward_text, disable=graphs_off),
                                  CUDAGraphed(self.lm_gen.depformer_step, disable=graphs_off))

    # --- personas: sampling, adapter, prefix -------------------------------------------------------------

    def sampling_for(self, persona: PersonaParams, warnings: list[str] | None = None) -> SamplingParams:
        base = self.sampling
        params = SamplingParams(
            temp=persona.temp if persona.temp is not None else base.temp,
            top_k=persona.top_k if persona.top_k is not None else base.top_k,
            temp_text=persona.temp_text if persona.temp_text is not None else base.temp_text,
            top_k_text=persona.top_k_text if persona.top_k_text is not None else base.top_k_text)
        limit = self.sampler.max_top_k
        if params.top_k > limit or params.top_k_text > limit:
            if warnings is not None:
                warnings.append(f"top_k above engine.max_top_k={limit}: clamped")
            params = replace(params, top_k=min(params.top_k, limit), top_k_text=min(params.top_k_text, limit))
        return params

    def _adapter_for(self, persona: PersonaParams, warnings: list[str]) -> Adapter | None:
        """The persona's adapter, loaded and checked; on any failure None (base weights) and a warning."""
        adapter_id = persona.adapter_id
        if not adapter_id:
            return None
        try:
            if self.bank is None:
                raise AdapterError("this engine serves no adapters (engine.max_adapters = 0)")
            if self.assets is None:
                raise AdapterError("no asset store configured")
            t0 = time.perf_counter()
            adapter = self.bank.load(adapter_id, self.assets.adapter(adapter_id))
            self.last_adapter_ms = (time.perf_counter() - t0) * 1e3
            self.bank.failed.pop(adapter_id, None)
            return adapter
        except (AssetError, AdapterError, OSError, MemoryError, torch.OutOfMemoryError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.bank is not None:
                self.bank.failed[adapter_id] = reason
            warnings.append(f"adapter {adapter_id!r} unavailable ({reason}): answering on the base weights")
            log.warning("persona %r: adapter %r unavailable: %s", persona.name, adapter_id, reason)
            return None

    def _voice_path(self, persona: PersonaParams) -> str | None:
        if not persona.voice_prompt_id:
            return None
        if self.assets is None:
            raise BackendError(f"persona {persona.name!r}: voice prompts need the engine's data dir")
        try:
            return str(self.assets.voice(persona.voice_prompt_id))
        except AssetError as exc:
            raise BackendError(f"persona {persona.name!r}: {exc}") from None

    def _tokenizer_for(self, adapter: Adapter | None) -> Any:
        """The base tokenizer, or an adapter's extended one mapped to model text ids (new ids shift by one:
        ``text_card`` is moshi's initial token)."""
        ext = adapter.extension if adapter is not None else None
        if ext is None:
            return self.tokenizer
        cached = self._tokenizers.get(str(ext.tokenizer))
        if cached is None:
            cached = ExtendedTokenizer(ext.tokenizer, ext.base)
            self._tokenizers[str(ext.tokenizer)] = cached
        return cached

    def _plan(self, persona: PersonaParams, adapter: Adapter | None = None) -> prompts.PromptPlan:
        try:
            return prompts.build_plan(persona, self._tokenizer_for(adapter), self.pad_id,
                                      self._voice_path(persona))
        except prompts.PersonaError as exc:
            raise BackendError(str(exc)) from None

    def prepare_persona(self, persona: PersonaParams) -> None:
        warnings: list[str] = []
        adapter = self._adapter_for(persona, warnings)
        if prompts.has_prompt(persona) and self.use_prefix_cache:
            self._prefix(persona, adapter)

    def _prefix(self, persona: PersonaParams, adapter: Adapter | None) -> prompts.PersonaPrefix:
        key = prompts.persona_key(persona, adapter.adapter_id if adapter else None)
        prefix = self._prefixes.get(key)
        if prefix is not None:
            self._prefixes.move_to_end(key)
            return prefix
        try:
            prefix = self._build_prefix(persona, adapter, key)
        except torch.OutOfMemoryError:
            self._prefixes.clear()  # the cached prefixes are what can be given back
            _empty_cache(self.device)
            raise BackendError(f"persona {persona.name!r}: out of device memory building its prompt "
                               "prefix (the prefix cache was emptied; the next call retries)") from None
        self._prefixes[key] = prefix
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.popitem(last=False)
        return prefix

    def _build_prefix(self, persona: PersonaParams, adapter: Adapter | None,
                      key: tuple[str, str, str]) -> prompts.PersonaPrefix:
        """The prompt stepped in a B=1 side stream, eagerly (no graphs to keep), then kept as tensors."""
        t0 = time.perf_counter()
        plan = self._plan(persona, adapter)
        if self.bank is not None:
            self.bank.use_for_side_stream(adapter)
        try:
            with torch.no_grad(), no_cuda_graph():
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
                    mimi = snapshot_row(self.mimi.get_streaming_state())
                    gen = snapshot_row(self.lm_gen.get_streaming_state())
                    lm = snapshot_row(self.lm.get_streaming_state())
        finally:
            if self.bank is not None:
                self.bank.end_side_stream()
        return prompts.PersonaPrefix(key=key, frames=plan.frames, mimi=mimi, gen=gen, lm=lm,
                                     build_ms=(time.perf_counter() - t0) * 1e3)

    # --- slots ----------------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise BackendError(f"slot {slot!r} out of range 0..{self.num_slots - 1}")

    def start_slot(self, slot: int, persona: PersonaParams, seed: int = 0) -> list[str]:
        """A new call in ``slot``: reset its row, seed its sampler, select its adapter, load its prompt."""
        self._check_slot(slot)
        t0 = time.perf_counter()
        warnings: list[str] = []
        adapter = self._adapter_for(persona, warnings)
        params = self.sampling_for(persona, warnings)
        mask = self._rows == slot
        with torch.no_grad():
            self.mimi.reset_streaming(mask)
            self.lm_gen.reset_streaming(mask)
            self.last_tokens.pop(slot, None)
            if self.bank is not None:
                try:
                    self.bank.assign(slot, adapter)
                except AdapterError as exc:
                    assert adapter is not None
                    self.bank.assign(slot, None)
                    self.bank.failed[adapter.adapter_id] = str(exc)
                    warnings.append(f"adapter {adapter.adapter_id!r} unavailable ({exc}): answering on the "
                                    "base weights")
                    adapter = None
            self.sampler.start(slot, seed, params)
            self._slot_tokenizer[slot] = self._tokenizer_for(adapter)
            if prompts.has_prompt(persona):
                if self.use_prefix_cache:
                    self._load_prefix(slot, self._prefix(persona, adapter))
                else:
                    self._run_prompt_live(slot, persona, adapter)
        self.last_start_ms = (time.perf_counter() - t0) * 1e3
        return warnings

    def _load_prefix(self, slot: int, prefix: prompts.PersonaPrefix) -> None:
        try:
            load_row(prefix.mimi, self.mimi.get_streaming_state(), slot)
            load_row(prefix.gen, self.lm_gen.get_streaming_state(), slot)
            load_row(prefix.lm, self.lm.get_streaming_state(), slot)
        except StateShapeError as exc:
            raise BackendError(f"persona prefix does not fit slot {slot}: {exc}") from None

    def _run_prompt_live(self, slot: int, persona: PersonaParams, adapter: Adapter | None) -> None:
        """The uncached path: the prompt stepped in the batch with only this slot executing."""
        plan = self._plan(persona, adapter)
        agent = prompts.encode_agent_codes(self.mimi, plan, self.device).expand(self.num_slots, -1, -1)
        mask = self._rows == slot
        self.mimi.set_exec_mask(mask)
        self.lm_gen.set_exec_mask(mask)
        self._select_graphs()
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
        if self.bank is not None:
            self.bank.release(slot)

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

    def _select_graphs(self) -> None:
        state = self.lm_gen._streaming_state
        assert state is not None
        state.graphed_main, state.graphed_depth = self._graphs[self.bank is not None and self.bank.enabled]

    def step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
        try:
            return self._step(frames)
        except torch.OutOfMemoryError as exc:
            _empty_cache(self.device)
            raise BackendError(f"out of device memory in the batched step of slots {sorted(frames)}: "
                               f"{str(exc).splitlines()[0][:200]}") from None

    def _step(self, frames: dict[int, np.ndarray]) -> dict[int, StepOutput]:
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
            self.sampler.draw(slots, self._vocab_text, self._vocab_audio)
            self._select_graphs()
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
            result[slot] = StepOutput(pcm=pcm_out, text=self._text(int(tok[slot, 0]), slot))
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

    def _text(self, token: int, slot: int | None = None) -> str:
        tokenizer = self._slot_tokenizer.get(slot, self.tokenizer) if slot is not None else self.tokenizer
        if tokenizer is None or token < 0 or token in (0, self.pad_id, self._text_card):
            return ""
        if isinstance(tokenizer, ExtendedTokenizer):
            return tokenizer.piece(token)
        if token >= self._vocab:
            return ""
        return str(tokenizer.id_to_piece(token)).replace("\u2581", " ")

    def prefix_info(self) -> list[tuple[tuple[str, str, str], int, float]]:
        return [(p.key, p.frames, p.build_ms) for p in self._prefixes.values()]

    def health(self) -> dict[str, Any]:
        """What /health shows of the model: KV dtype, adapters (resident, failed: named), prefixes."""
        return {"kv_dtype": self.kv_dtype,
                "adapters": self.bank.status() if self.bank is not None else None,
                "prefixes": len(self._prefixes),
                "prefix_bytes": sum(p.nbytes for p in self._prefixes.values())}

    def close(self) -> None:
        self._prefixes.clear()
        self._graphs.clear()
        self._stack.close()
        if self.bank is not None:
            self.bank.close()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp8": torch.bfloat16 if device.type == "cuda" else torch.float32}[name]


def sampling_from(settings: EngineSettings) -> SamplingParams:
    return SamplingParams(temp=settings.temp, top_k=settings.top_k, temp_text=settings.temp_text,
                          top_k_text=settings.top_k_text)


def build_backend(settings: EngineSettings, assets: AssetStore | None = None) -> MoshiBackend:
    """The engine server's factory: check the slots fit, load ``settings.model`` (verified), build."""
    from engine.moshi.loader import ModelError, load_model, model_files
    from engine.moshi.lora import base_identity
    from engine.moshi.plan import check_fits

    if not settings.model:
        raise ModelError("engine.backend = 'moshi' needs engine.model (a weights dir or a cached HF repo id)")
    device = resolve_device(settings.device)
    if not settings.cuda_graphs:
        os.environ["NO_CUDA_GRAPH"] = "1"  # read by moshi's CUDAGraphed on every call
    files = model_files(settings.model)
    check_fits(files.config, files.mimi_config, settings, device)  # before any weight is loaded
    loaded = load_model(settings.model, device=device, dtype=resolve_dtype(settings.dtype, device))
    if settings.dtype == "fp8":
        from engine.moshi.fp8 import quantize_lm_fp8

        quantize_lm_fp8(loaded.lm)
    kv_fp8 = settings.kv_dtype == "fp8"
    adapters = AdapterOptions(pages=settings.max_adapters, max_rank=settings.lora_max_rank,
                              targets=tuple(settings.lora_targets),
                              cache_bytes=settings.adapter_cache_mb << 20,
                              base=base_identity(files.config, loaded.lm_sha256),
                              max_added=settings.lora_max_added_tokens)
    return MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, settings.num_slots,
                        sampling=sampling_from(settings), max_top_k=settings.max_top_k,
                        max_prefixes=settings.max_prefixes, assets=assets, adapters=adapters, kv_fp8=kv_fp8)
