"""The training loss: Moshi's text and audio cross-entropies over the conversation frames.

As in moshi-finetune: text padding targets (PAD, EPAD) weigh ``text_padding_weight``; the first (semantic)
audio codebook weighs ``first_codebook_weight`` against 1 for the acoustic ones; the loss is text + audio,
each a weighted mean. The persona prompt's frames and padding (``-1``, moshi's zero token) carry no loss.
Sums are kept apart from counts so a validation loss over many batches is one weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class LossSums:
    text: torch.Tensor  # sum of weighted CE
    text_weight: torch.Tensor
    audio: torch.Tensor
    audio_weight: torch.Tensor

    def value(self) -> torch.Tensor:
        return self.text / self.text_weight.clamp(min=1e-9) + self.audio / self.audio_weight.clamp(min=1e-9)

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(self.text + other.text, self.text_weight + other.text_weight,
                        self.audio + other.audio, self.audio_weight + other.audio_weight)


def loss_sums(lm: torch.nn.Module, codes: torch.Tensor, loss_from: torch.Tensor, text_padding_weight: float,
              first_codebook_weight: float) -> LossSums:
    """codes [B, 17, T] (long, -1 = padding); loss_from [B]: first frame with a loss (after the prompt)."""
    out = lm(codes)
    B, _, T = codes.shape
    frames = torch.arange(T, device=codes.device)[None, :] >= loss_from[:, None]  # [B, T]
    pad_ids = torch.tensor([lm.text_padding_token_id, lm.end_of_text_padding_id], device=codes.device)

    text_mask = out.text_mask[:, 0] & frames
    text_target = codes[:, 0][text_mask]
    text_logits = out.text_logits[:, 0][text_mask].float()
    ce = F.cross_entropy(text_logits, text_target, reduction="none")
    w = torch.where(torch.isin(text_target, pad_ids), text_padding_weight, 1.0)

    dep_q = out.logits.shape[1]
    audio_mask = out.mask & frames[:, None, :]
    audio_target = codes[:, 1: 1 + dep_q]
    cb_weight = torch.ones(dep_q, device=codes.device)
    cb_weight[0] = first_codebook_weight
    a_logits = out.logits[audio_mask].float()
    a_ce = F.cross_entropy(a_logits, audio_target[audio_mask], reduction="none")
    a_w = cb_weight[:, None].expand(dep_q, T)[None].expand(B, dep_q, T)[audio_mask]
    return LossSums(text=(ce * w).sum(), text_weight=w.sum(), audio=(a_ce * a_w).sum(),
                    audio_weight=a_w.sum())
