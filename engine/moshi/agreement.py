"""Token agreement of a model variant (FP8 weights, FP8 KV cache) with its full-precision self.

Free-running comparison says little: once one token flips, two runs diverge for good (on random weights
the logits are near-flat, so that happens early). So the variant is *teacher-forced* on the reference's
own free run: at each tick both see the same history, and what is compared is the token each picks next
(text and every depformer codebook) and the text logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch

from engine.moshi.loader import LoadedModel
from engine.protocol import FRAME_SAMPLES

Variant = Callable[[LoadedModel], None]  # changes a freshly loaded model in place (quantize, FP8 KV...)


@dataclass(frozen=True)
class Agreement:
    tokens: float  # fraction of equal picks (text + audio codebooks)
    text: float
    text_logit_rel_error: float
    ticks: int


def picks(loaded: LoadedModel, ticks: int, ref: np.ndarray | None, seed: int = 9
          ) -> tuple[np.ndarray, np.ndarray]:
    """Raw tokens (text + depformer audio, undelayed) the model picks at each tick, and its text logits.
    With ``ref`` the history is forced to ``ref`` (the depformer still runs, so its picks are measured)."""
    from moshi.models.lm import LMGen

    from engine.moshi.persona import forced_step

    logits: list[torch.Tensor] = []
    texts: list[int] = []
    audios: list[np.ndarray] = []
    device = loaded.lm.device
    gen = LMGen(loaded.lm, temp=0.0, temp_text=0.0, support_out_of_sync=True,
                on_text_logits_hook=lambda x: logits.append(x[0, 0, 0].float().cpu()),
                on_text_hook=lambda t: texts.append(int(t[0])),
                on_audio_hook=lambda a: audios.append(a[0].cpu().numpy().copy()))
    rng = np.random.default_rng(seed)
    one = torch.ones(1, dtype=torch.bool, device=device)
    with torch.no_grad(), loaded.mimi.streaming(1), gen.streaming(1):
        for tick in range(ticks):
            pcm = torch.from_numpy(rng.normal(0, 0.1, FRAME_SAMPLES).astype(np.float32)).view(1, 1, -1)
            codes = loaded.mimi.encode(pcm.to(device))
            if ref is None:
                gen.step(codes)
                continue
            state = gen._streaming_state
            assert state is not None and gen.lm_model.depformer is not None
            forced_step(gen, codes, None, torch.tensor([int(ref[tick, 0])], device=device), one)
            pos = int(state.offsets[0] % state.cache.shape[2])
            state.cache[0, 1: gen.lm_model.dep_q + 1, pos] = torch.from_numpy(ref[tick, 1:]).to(device)
    picked = np.concatenate([np.array(texts)[:, None], np.stack(audios)], axis=1)
    return picked, torch.stack(logits).numpy()


def teacher_forced_agreement(load: Callable[[], LoadedModel], variant: Variant, ticks: int = 12) -> Agreement:
    """Reference = ``load()`` as is; the variant = ``load()`` then ``variant``; both forced on the
    reference's free run."""
    reference = load()
    ref_tokens, _ = picks(reference, ticks, None)
    ref_picks, ref_logits = picks(reference, ticks, ref_tokens)
    del reference
    model = load()
    variant(model)
    got, got_logits = picks(model, ticks, ref_tokens)
    return Agreement(tokens=float((got == ref_picks).mean()),
                     text=float((got[:, 0] == ref_picks[:, 0]).mean()),
                     text_logit_rel_error=float(np.linalg.norm(got_logits - ref_logits)
                                                / np.linalg.norm(ref_logits)), ticks=ticks)


def fp8_kv(loaded: LoadedModel) -> None:
    from engine.moshi.kv_fp8 import use_fp8_kv

    use_fp8_kv(loaded.lm)
