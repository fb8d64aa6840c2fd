"""Per-call sampling inside one batched step: each slot has its own generator, temperatures and top-k.

moshi samples top-k by the exponential race: ``probs = softmax(logits / temp)``, keep the k largest, draw
k Exp(1) values ``q`` and take ``argmax(probs / q)`` (``moshi.utils.sampling``). It draws ``q`` from the
process-wide generator, so in a batch every call's randomness would depend on its neighbours. Here each
slot draws its ``q`` from its own ``torch.Generator`` (seeded per call), on the host, in exactly moshi's
order and sizes (text: k_text values, then each depformer codebook: k values), so a slot samples what
moshi's own single-stream ``LMGen`` samples with that seed, whatever else is in the batch.

The draws happen before the step (``draw``) into fixed-size buffers (``max_top_k`` wide, padded with 1.0),
so the sampling itself is plain tensor code with static shapes that CUDA graphs can capture. Rows with
temperature 0 are greedy (argmax, no draws), like moshi's ``use_sampling=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temp: float  # audio codebooks; 0 = greedy
    top_k: int
    temp_text: float
    top_k_text: int


class SlotSampler:
    def __init__(self, num_rows: int, dep_q: int, max_top_k: int, device: torch.device) -> None:
        self.num_rows, self.dep_q, self.max_top_k = num_rows, dep_q, max_top_k
        self.device = device
        k = max_top_k
        # Device-side buffers the (graphed) sampling reads; updated in place, never re-allocated.
        self.text_noise = torch.ones(num_rows, k, device=device)
        self.audio_noise = torch.ones(num_rows, dep_q, k, device=device)
        self.temp_text = torch.ones(num_rows, 1, device=device)
        self.temp_audio = torch.ones(num_rows, 1, device=device)
        self.greedy_text = torch.ones(num_rows, dtype=torch.bool, device=device)
        self.greedy_audio = torch.ones(num_rows, dtype=torch.bool, device=device)
        self.keep_text = torch.ones(num_rows, k, dtype=torch.bool, device=device)  # position < top_k_text
        self.keep_audio = torch.ones(num_rows, k, dtype=torch.bool, device=device)
        # Host staging for the draws (pinned on CUDA so the copy does not block the host).
        pin = device.type == "cuda"
        self._host_text = torch.ones(num_rows, k, pin_memory=pin)
        self._host_audio = torch.ones(num_rows, dep_q, k, pin_memory=pin)
        self._params: list[SamplingParams | None] = [None] * num_rows
        self._generators: list[torch.Generator | None] = [None] * num_rows
        self.seeds: list[int | None] = [None] * num_rows

    def start(self, row: int, seed: int, params: SamplingParams) -> None:
        """A new call in ``row``: its own generator, seeded; its temperatures and top-k."""
        if params.top_k > self.max_top_k or params.top_k_text > self.max_top_k:
            top = max(params.top_k, params.top_k_text)
            raise ValueError(f"top_k {top} exceeds max_top_k {self.max_top_k}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self._generators[row], self._params[row], self.seeds[row] = gen, params, seed
        positions = torch.arange(self.max_top_k, device=self.device)
        with torch.no_grad():
            self.temp_text[row] = params.temp_text if params.temp_text > 0 else 1.0
            self.temp_audio[row] = params.temp if params.temp > 0 else 1.0
            self.greedy_text[row] = params.temp_text <= 0
            self.greedy_audio[row] = params.temp <= 0
            self.keep_text[row] = positions < params.top_k_text
            self.keep_audio[row] = positions < params.top_k

    def draw(self, rows: list[int], vocab_text: int, vocab_audio: int) -> None:
        """Draw this tick's noise for the rows about to step, in moshi's order, from each row's generator."""
        for row in rows:
            params, gen = self._params[row], self._generators[row]
            if params is None or gen is None:
                continue
            if params.temp_text > 0:
                k = min(params.top_k_text, vocab_text)
                self._host_text[row, :k].exponential_(1, generator=gen)
            if params.temp > 0:
                k = min(params.top_k, vocab_audio)
                for cb in range(self.dep_q):
                    self._host_audio[row, cb, :k].exponential_(1, generator=gen)
        if rows:
            self.text_noise.copy_(self._host_text, non_blocking=True)
            self.audio_noise.copy_(self._host_audio, non_blocking=True)

    def sample_text(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [rows, vocab] -> tokens [rows]."""
        return sample_rows(logits, self.text_noise, self.temp_text, self.keep_text, self.greedy_text)

    def sample_audio(self, codebook: int, logits: torch.Tensor) -> torch.Tensor:
        return sample_rows(logits, self.audio_noise[:, codebook], self.temp_audio, self.keep_audio,
                           self.greedy_audio)


def sample_rows(logits: torch.Tensor, noise: torch.Tensor, temp: torch.Tensor, keep: torch.Tensor,
                greedy: torch.Tensor) -> torch.Tensor:
    """moshi's top-k exponential race, one temperature / k / noise row per batch row; greedy rows argmax.

    logits [B, V] float; noise [B, K] (> 0); temp [B, 1]; keep [B, K] bool (position < row's k); greedy [B].
    """
    k = min(noise.shape[1], logits.shape[-1])
    probs = torch.softmax(logits / temp, dim=-1)
    top, index = torch.topk(probs, k, dim=-1)
    top = torch.where(keep[:, :k], top, torch.zeros_like(top))
    choice = (top / noise[:, :k]).argmax(dim=-1, keepdim=True)
    sampled = index.gather(-1, choice)[:, 0]
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
