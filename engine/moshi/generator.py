"""``SlotLMGen``: moshi's ``LMGen`` with one sampler row per batch slot.

Everything about the streaming step stays moshi's own (``LMGen._step``: token cache, delays, exec mask,
CUDA-graphed transformer); only the two places that pick a token change:

* the text token: ``LMGen`` is built greedy, and its ``on_text_hook`` (which receives the token tensor that
  the rest of the step then uses) overwrites it in place with the slot sampler's choice, made from the
  logits handed to ``on_text_logits_hook`` just before;
* the audio tokens: ``depformer_step`` (the function moshi CUDA-graphs) is this class's, with the slot
  sampler picking each codebook.

A batch of another size (the B=1 side stream that builds persona prefixes, whose tokens are all forced)
samples greedily and draws nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from moshi.models.lm import LMGen

from engine.moshi.sampling import SlotSampler

if TYPE_CHECKING:
    from moshi.models.lm import LMModel


class SlotLMGen(LMGen):
    def __init__(self, lm_model: LMModel, sampler: SlotSampler) -> None:
        super().__init__(lm_model, use_sampling=False, temp=0.0, temp_text=0.0, support_out_of_sync=True)
        self.sampler = sampler
        self._text_logits: torch.Tensor | None = None
        self.on_text_logits_hook = self._keep_text_logits
        self.on_text_hook = self._sample_text

    def _keep_text_logits(self, logits: torch.Tensor) -> None:
        self._text_logits = logits

    def _sample_text(self, token: torch.Tensor) -> None:
        logits, self._text_logits = self._text_logits, None
        if logits is None or token.shape[0] != self.sampler.num_rows:
            return  # greedy (the side stream)
        token.copy_(self.sampler.sample_text(logits[:, 0, 0].float()))

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        lm = self.lm_model
        assert lm.depformer is not None
        rows = text_token.shape[0]
        sampled = rows == self.sampler.num_rows
        prev = text_token
        tokens: list[torch.Tensor] = []
        with lm.depformer.streaming(rows):
            for cb in range(lm.dep_q):
                logits = lm.forward_depformer(cb, prev[:, None, None], transformer_out)[:, 0, 0].float()
                prev = self.sampler.sample_audio(cb, logits) if sampled else logits.argmax(dim=-1)
                tokens.append(prev)
        return torch.stack(tokens, dim=1)
