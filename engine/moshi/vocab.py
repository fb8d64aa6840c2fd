"""Serving adapters that add text tokens (the adapter format's vocabulary extension, docs/adapters.md).

New token ``i`` of an adapter is text id ``text_card + 1 + i`` (``text_card`` is moshi's initial token).
Three layers of the LM know text ids; each is wrapped so that a batch mixes rows with different
vocabularies in one step, with static shapes:

* ``text_linear`` (:class:`PagedTextHead`): the base logits, then the initial token's column (never
  predicted: -inf), then ``max_added`` columns scored against the row's own page of new rows and -inf past
  the row's count (all of them for a row without an extension): output index = text id, as training has it;
* ``text_emb`` and ``depformer_text_emb`` (:class:`PagedEmbedding`): ids above ``text_card`` read the row's
  page of new embeddings.

The pages are the LoRA bank's: the adapter on page ``p`` has its new rows there too. With no adapter in use
(the bank disabled) every wrapper is the base layer, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from engine.moshi.lora import AdapterBank

TOKENIZER_FILE = "tokenizer.model"


@dataclass
class VocabExtension:
    """An adapter's new text tokens (host tensors, the file's dtype)."""

    text_emb: torch.Tensor  # [added, dim]
    text_linear: torch.Tensor  # [added, dim]
    depformer_text_emb: torch.Tensor  # [added, depformer_dim]
    tokenizer: Path
    base: int  # the base tokenizer's size (= the LM's text_card)

    @property
    def added(self) -> int:
        return int(self.text_emb.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.text_emb, self.text_linear,
                                                          self.depformer_text_emb))


def _zeros_like_rows(pages: int, max_added: int, width: int, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.is_floating_point() and like.element_size() >= 2 else torch.bfloat16
    return torch.zeros(pages, max_added, width, device=like.device, dtype=dtype)


class PagedEmbedding(nn.Module):
    """A moshi ``ScaledEmbedding`` (ids ``0 .. n-1``; ``-1`` = zero) plus each row's page of new ids."""

    rows: torch.Tensor

    def __init__(self, base: nn.Module, bank: AdapterBank, max_added: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        weight = base.get_parameter("weight")
        self.num_embeddings: int = int(getattr(base, "num_embeddings"))  # noqa: B009
        self.register_buffer("rows", _zeros_like_rows(bank.pages, max_added, int(weight.shape[1]), weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.bank.enabled:
            return self.base(ids)
        n = self.num_embeddings
        new = ids >= n
        y = self.base(torch.where(new, torch.zeros_like(ids), ids))
        page = self.bank.vocab_page_for(ids.shape[0]).view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        ext = self.rows[page, (ids - n).clamp(0, self.rows.shape[1] - 1)].to(y.dtype)
        return torch.where(new[..., None], ext, y)


class PagedTextHead(nn.Module):
    """The text head: base logits, the initial token's column (-inf), then the row's new tokens."""

    rows: torch.Tensor

    def __init__(self, base: nn.Linear, bank: AdapterBank, max_added: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.in_features = base.in_features
        self.register_buffer("rows", _zeros_like_rows(bank.pages, max_added, base.in_features, base.weight))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return int(self.base.out_features) + (1 + self.rows.shape[1] if self.bank.enabled else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.bank.enabled:
            return y
        pages, width = self.rows.shape[0], self.rows.shape[1]
        ext = F.linear(x.to(self.rows.dtype), self.rows.view(pages * width, -1)).to(y.dtype)
        ext = ext.view(*ext.shape[:-1], pages, width)
        rows = x.shape[0]
        page = self.bank.vocab_page_for(rows).view(rows, *([1] * (ext.dim() - 1)))
        ext = ext.gather(-2, page.expand(*ext.shape[:-2], 1, width)).squeeze(-2)
        valid = self.bank.vocab_valid_for(rows).view(rows, *([1] * (ext.dim() - 2)), width)
        ext = torch.where(valid, ext, torch.full_like(ext, float("-inf")))
        initial = torch.full((*y.shape[:-1], 1), float("-inf"), dtype=y.dtype, device=y.device)
        return torch.cat([y, initial, ext], dim=-1)


def install(lm: nn.Module, bank: AdapterBank, max_added: int) -> tuple[PagedEmbedding, PagedTextHead,
                                                                          PagedEmbedding]:
    """Wrap the LM's three text-id layers (before streaming starts); returns the wrappers."""
    emb = PagedEmbedding(lm.text_emb, bank, max_added)  # type: ignore[arg-type]
    head = PagedTextHead(lm.text_linear, bank, max_added)  # type: ignore[arg-type]
    dep = PagedEmbedding(lm.depformer_text_emb, bank, max_added)  # type: ignore[arg-type]
    lm.text_emb, lm.text_linear, lm.depformer_text_emb = emb, head, dep
    return emb, head, dep


def uninstall(lm: nn.Module, layers: tuple[PagedEmbedding, PagedTextHead, PagedEmbedding]) -> None:
    lm.text_emb, lm.text_linear, lm.depformer_text_emb = (layer.base for layer in layers)
