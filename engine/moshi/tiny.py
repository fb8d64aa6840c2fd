"""A tiny Moshi-architecture model with random weights, written to disk in the real checkpoint layout.

Same classes as the real model (``LMModel``, ``MimiModel``), small dimensions, so tests and CPU demos run
the exact code path of a real checkpoint: ``config.json`` + LM safetensors + Mimi safetensors (+ its own
``mimi_config.json``) + a sentencepiece tokenizer trained here on a few sentences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

TINY_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1, "dimension": 64, "causal": True, "n_filters": 8, "n_residual_layers": 1,
        "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
        "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
        "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
    },
    "quantizer": {"dimension": 32, "n_q": 8, "bins": 2048, "input_dimension": 64, "output_dimension": 64},
    "transformer": {
        "d_model": 64, "num_heads": 4, "num_layers": 1, "causal": True, "layer_scale": 0.01, "context": 250,
        "conv_layout": True, "max_period": 10000, "gating": "none", "norm": "layer_norm",
        "positional_embedding": "rope", "dim_feedforward": 128, "input_dimension": 64,
        "output_dimensions": [64],
    },
}

TEXT_CARD = 128  # tokenizer vocabulary; the LM's text head has this many classes

TINY_LM_CONFIG: dict[str, Any] = {
    "dim": 128, "text_card": TEXT_CARD, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
    "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 3000, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 64, "depformer_dim_feedforward": 256,
    "depformer_num_heads": 4, "depformer_num_layers": 1, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

LM_FILE = "model.safetensors"
MIMI_FILE = "mimi.safetensors"
MIMI_CONFIG_FILE = "mimi_config.json"
TOKENIZER_FILE = "tokenizer.model"

_SENTENCES = [
    "Hello, thank you for calling. How can I help you today?",
    "Your appointment is confirmed for Tuesday at ten in the morning.",
    "I am sorry, the line is busy. Please call again later.",
    "You are a helpful assistant answering the phone for a small clinic.",
    "Could you spell your last name for me, please?",
    "The office opens at nine and closes at five thirty.",
    "<system> Speak slowly and clearly. <system>",
]


def _train_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(_SENTENCES * 4) + "\n")
    # ids 0..3 = unk, bos, eos, pad: moshi's text padding id is 3 (existing_text_padding_id).
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=TEXT_CARD, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["<system>"], hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    path.with_suffix(".vocab").unlink(missing_ok=True)


def randomize_codebooks(mimi: Any, torch: Any) -> None:
    """A fresh Mimi's codebooks are all zero (k-means fills them in training), so every frame would get
    code 0 and the LM would never see its input: give them random centroids, marked initialized."""
    with torch.no_grad():
        for name, buf in mimi.named_buffers():
            if name.endswith("embedding_sum"):
                buf.normal_(0.0, 0.01)
            elif name.endswith("_codebook._initialized"):
                buf.fill_(1.0)


def write_tiny_model(directory: str | Path, seed: int = 1234) -> Path:
    """Write a tiny random-weight model into ``directory`` (created) and return it. Deterministic per seed."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=TINY_LM_CONFIG, device="cpu", dtype=torch.float32)
    mimi = loaders.get_mimi(None, mimi_config=TINY_MIMI_CONFIG, device="cpu", num_codebooks=8)
    randomize_codebooks(mimi, torch)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / LM_FILE))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / MIMI_FILE))
    (out / MIMI_CONFIG_FILE).write_text(json.dumps(TINY_MIMI_CONFIG, indent=1))
    _train_tokenizer(out / TOKENIZER_FILE)
    config = dict(TINY_LM_CONFIG)
    config.update(
        moshi_name=LM_FILE, mimi_name=MIMI_FILE, mimi_config_name=MIMI_CONFIG_FILE,
        tokenizer_name=TOKENIZER_FILE, model_type="moshi", model_id={"aziza_tiny_seed": seed},
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    from engine.moshi.loader import write_manifest

    write_manifest(out)
    return out
