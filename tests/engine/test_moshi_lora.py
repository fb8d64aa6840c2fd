"""LoRA per persona, many adapters in one batched step.

Anchor: a batch mixing three adapters (ranks 4, 8, 16) and adapter-free calls gives, per call, exactly the
tokens of moshi's single-stream ``LMGen`` on a copy of the model with that call's adapter merged into the
weights (W + scaling·B·A). Then the failure modes: a missing adapter answers on the base weights with a
warning that /health names; an adapter of the wrong base, shape, rank or modules is refused with one line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")

import torch

from engine.assets import AssetStore
from engine.moshi.backend import AdapterOptions, MoshiBackend
from engine.moshi.loader import LoadedModel, load_model
from engine.moshi.lora import (
    AdapterError,
    base_identity,
    check_adapter,
    linear_shapes,
    read_adapter,
    text_shapes,
    write_adapter,
)
from engine.moshi.selftest import Call, call_audio, reference_tokens
from engine.moshi.tiny import write_tiny_model
from engine.protocol import PersonaParams

TARGETS = ("transformer.*",)
RANKS = {"a1": 4, "a2": 8, "a3": 16}
CALLS = (  # 4 slots: at ticks 2-7 three adapters and an adapter-free call share every step
    (Call("a", slot=0, start=0, frames=8), "a1"),
    (Call("b", slot=1, start=1, frames=8), None),
    (Call("c", slot=2, start=2, frames=7), "a2"),
    (Call("d", slot=3, start=2, frames=8, skip=frozenset({5})), "a3"),
    (Call("e", slot=0, start=9, frames=4), "a2"),  # slot 0 reused with another adapter
    (Call("f", slot=2, start=9, frames=4), None),  # slot 2 reused without one
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=21)


def random_weights(lm: torch.nn.Module, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (out_f, in_f) in sorted(linear_shapes(lm).items()):
        if any(fnmatch.fnmatchcase(name, p) for p in TARGETS):
            out[name] = (torch.randn(rank, in_f, generator=gen) * 0.2,
                         torch.randn(out_f, rank, generator=gen) * 0.2)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    data = tmp_path_factory.mktemp("data")
    loaded = load_model(tiny_dir)
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    for i, (adapter_id, rank) in enumerate(RANKS.items()):
        write_adapter(data / "adapters" / adapter_id, random_weights(loaded.lm, rank, seed=i),
                      rank=rank, alpha=2 * rank, base=base)
    return data


def backend_for(tiny_dir: Path, data_dir: Path, slots: int, pages: int = 4) -> MoshiBackend:
    loaded = load_model(tiny_dir)
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    return MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, slots, assets=AssetStore(data_dir),
                        adapters=AdapterOptions(pages=pages, max_rank=16, targets=TARGETS, base=base))


def merged_reference(tiny_dir: Path, data_dir: Path, adapter_id: str | None, audio: np.ndarray) -> np.ndarray:
    loaded: LoadedModel = load_model(tiny_dir)
    if adapter_id is not None:
        adapter = read_adapter(data_dir / "adapters" / adapter_id, adapter_id)
        with torch.no_grad():
            for name, (a, b_scaled) in adapter.weights.items():
                loaded.lm.get_submodule(name).weight += b_scaled @ a
    return reference_tokens(loaded, audio)  # moshi's own single-stream LMGen, greedy


def run(backend: MoshiBackend, calls: tuple[tuple[Call, str | None], ...]) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, list[str]]]:
    audio = {c.name: call_audio(c.name, c.frames) for c, _ in calls}
    tokens: dict[str, list[np.ndarray]] = {c.name: [] for c, _ in calls}
    warnings: dict[str, list[str]] = {}
    for tick in range(max(max(c.ticks()) for c, _ in calls) + 1):
        frames, owner = {}, {}
        for call, adapter_id in calls:
            ticks = call.ticks()
            if tick == call.start:
                warnings[call.name] = backend.start_slot(call.slot, PersonaParams(adapter_id=adapter_id))
            if tick in ticks:
                frames[call.slot] = audio[call.name][ticks.index(tick)]
                owner[call.slot] = call.name
        backend.step(frames)
        for slot, name in owner.items():
            tok = backend.last_tokens[slot]
            if (tok[1:] >= 0).all():
                tokens[name].append(tok.copy())
        for call, _ in calls:
            if tick == call.ticks()[-1]:
                backend.end_slot(call.slot)
    return {k: np.stack(v) for k, v in tokens.items()}, warnings


def test_mixed_adapter_batch_equals_merged_single_stream(tiny_dir: Path, data_dir: Path) -> None:
    backend = backend_for(tiny_dir, data_dir, slots=4)
    try:
        got, warnings = run(backend, CALLS)
        assert all(not w for w in warnings.values()), warnings
        assert backend.bank is not None and sorted(backend.bank.status()["resident"]) == ["a1", "a2", "a3"]
        print(f"\nadapter load (read + check, host): {backend.last_adapter_ms:.2f} ms (cached after)")
    finally:
        backend.close()
    for call, adapter_id in CALLS:
        want = merged_reference(tiny_dir, data_dir, adapter_id, call_audio(call.name, call.frames))
        mismatch = np.argwhere(got[call.name] != want)
        assert mismatch.size == 0, f"call {call.name} ({adapter_id}): first mismatch {mismatch[0]}"


def test_adapters_change_the_call(tiny_dir: Path, data_dir: Path) -> None:
    """Guards the anchor against a vacuous pass: each adapter's tokens differ from the base model's."""
    audio = call_audio("a", 8)
    base = merged_reference(tiny_dir, data_dir, None, audio)
    for adapter_id in RANKS:
        assert not np.array_equal(merged_reference(tiny_dir, data_dir, adapter_id, audio), base), adapter_id


def test_missing_adapter_answers_on_base_weights_with_a_warning(tiny_dir: Path, data_dir: Path,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "adapters" / "broken").mkdir()
    (data / "adapters" / "broken" / "adapter_config.json").write_text("{not json")
    backend = backend_for(tiny_dir, data, slots=2)
    try:
        calls = ((Call("a", slot=0, start=0, frames=6), "gone"),
                 (Call("b", slot=1, start=0, frames=6), "broken"))
        got, warnings = run(backend, calls)
        assert "adapter 'gone' unavailable" in warnings["a"][0] and "base weights" in warnings["a"][0]
        assert "adapter 'broken' unavailable" in warnings["b"][0]
        failed = backend.health()["adapters"]["failed"]
        assert set(failed) == {"gone", "broken"}
    finally:
        backend.close()
    for call, _ in calls:
        want = merged_reference(tiny_dir, data, None, call_audio(call.name, call.frames))
        np.testing.assert_array_equal(got[call.name], want)


def test_pages_full_falls_back_to_base_weights(tiny_dir: Path, data_dir: Path) -> None:
    backend = backend_for(tiny_dir, data_dir, slots=3, pages=2)
    try:
        assert backend.start_slot(0, PersonaParams(adapter_id="a1")) == []
        assert backend.start_slot(1, PersonaParams(adapter_id="a2")) == []
        third = backend.start_slot(2, PersonaParams(adapter_id="a3"))
        assert "pages are in use" in third[0]
        backend.end_slot(0)  # frees a page: the next call gets its adapter
        assert backend.start_slot(2, PersonaParams(adapter_id="a3")) == []
    finally:
        backend.close()


def test_wrong_base_shape_rank_or_module_is_refused_with_one_line(tiny_dir: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    loaded = load_model(tiny_dir)
    shapes = linear_shapes(loaded.lm)
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    good = read_adapter(data_dir / "adapters" / "a2", "a2")
    check_adapter(good, shapes, base, list(TARGETS), max_rank=16)

    cases: dict[str, str] = {}
    other = dict(base, architecture="0123456789abcdef")
    d = write_adapter(tmp_path / "arch", random_weights(loaded.lm, 4, 0), rank=4, alpha=4, base=other)
    cases["arch"] = "architecture"
    d = write_adapter(tmp_path / "weights", random_weights(loaded.lm, 4, 0), rank=4, alpha=4,
                      base=dict(base, lm_sha256="f" * 64))
    cases["weights"] = "base weights"
    name = next(iter(random_weights(loaded.lm, 4, 0)))
    w = random_weights(loaded.lm, 4, 0)
    w[name] = (torch.randn(4, 7), w[name][1])
    write_adapter(tmp_path / "shape", w, rank=4, alpha=4, base=base)
    cases["shape"] = "in this model"
    write_adapter(tmp_path / "rank", random_weights(loaded.lm, 32, 0), rank=32, alpha=32, base=base)
    cases["rank"] = "rank 32"
    dep = {n: (torch.randn(4, i), torch.randn(o, 4)) for n, (o, i) in shapes.items()
           if n.startswith("depformer")}
    write_adapter(tmp_path / "module", dict(list(dep.items())[:1]), rank=4, alpha=4, base=base)
    cases["module"] = "outside the modules"
    for case, expected in cases.items():
        adapter = read_adapter(tmp_path / case, case)
        with pytest.raises(AdapterError, match=expected) as exc:
            check_adapter(adapter, shapes, base, list(TARGETS), max_rank=16)
        assert "\n" not in str(exc.value), case
    assert d.exists()
    # Unreadable: a config without the aziza block, and a weights file that is not safetensors.
    bad = tmp_path / "bad"
    shutil.copytree(data_dir / "adapters" / "a1", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    del config["aziza"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="base model"):
        read_adapter(bad, "bad")
    shutil.copytree(data_dir / "adapters" / "a1", tmp_path / "garbage")
    (tmp_path / "garbage" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="unreadable safetensors"):
        read_adapter(tmp_path / "garbage", "garbage")


ADDED = 5


def extension_adapter(tiny_dir: Path, directory: Path) -> Path:
    """A rank-8 adapter that also adds ADDED text tokens (rows loud enough to be picked), exported by
    training/'s writer: the format the engine must load without conversion."""
    from training.export import write_adapter_files
    from training.model import Extension

    loaded = load_model(tiny_dir)
    gen = torch.Generator().manual_seed(77)
    dim = int(loaded.lm.dim)
    dep_dim = int(loaded.lm.depformer_text_emb.weight.shape[1])
    ext = Extension(text_emb=torch.randn(ADDED, dim, generator=gen),
                    text_linear=torch.randn(ADDED, dim, generator=gen) * 4.0,
                    depformer_text_emb=torch.randn(ADDED, dep_dim, generator=gen))
    shutil.copy(tiny_dir / "tokenizer.model", directory.parent / "tok.model")
    return write_adapter_files(directory, random_weights(loaded.lm, 8, seed=9), rank=8, alpha=16,
                               base=base_identity(loaded.files.config, loaded.lm_sha256), extension=ext,
                               vocab={"base": int(loaded.lm.text_card), "added": ADDED},
                               tokenizer=directory.parent / "tok.model")


def extended_reference(tiny_dir: Path, directory: Path, audio: np.ndarray) -> np.ndarray:
    """Single-stream LMGen on a model with the adapter merged and its vocabulary installed the way
    training/ installs it (ExtendedEmbedding / ExtendedHead)."""
    from training.model import Extension, install_extension

    loaded = load_model(tiny_dir)
    adapter = read_adapter(directory, "ext")
    assert adapter.extension is not None
    with torch.no_grad():
        for name, (a, b_scaled) in adapter.weights.items():
            loaded.lm.get_submodule(name).weight += b_scaled @ a
    ext = adapter.extension
    install_extension(loaded.lm, Extension(ext.text_emb.float(), ext.text_linear.float(),
                                           ext.depformer_text_emb.float()), trainable=False)
    return reference_tokens(loaded, audio)  # moshi's own single-stream LMGen, greedy


def test_an_adapter_adding_text_tokens_is_served_in_a_mixed_batch(tiny_dir: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    extension_adapter(tiny_dir, data / "adapters" / "ext")
    loaded = load_model(tiny_dir)
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    backend = MoshiBackend(loaded.lm, loaded.mimi, loaded.tokenizer, 3, assets=AssetStore(data),
                           adapters=AdapterOptions(pages=3, max_rank=16, targets=TARGETS, base=base,
                                                   max_added=8))  # padded: 8 columns for 5 tokens
    calls = ((Call("a", slot=0, start=0, frames=9), "ext"), (Call("b", slot=1, start=1, frames=8), None),
             (Call("c", slot=2, start=1, frames=8), "a1"))
    try:
        got, warnings = run(backend, calls)
        assert all(not w for w in warnings.values()), warnings
    finally:
        backend.close()
    text_card = int(loaded.lm.text_card)
    want = extended_reference(tiny_dir, data / "adapters" / "ext", call_audio("a", 9))
    assert (want[:, 0] > text_card).any()  # the new tokens are really picked (not a vacuous pass)
    np.testing.assert_array_equal(got["a"], want)
    np.testing.assert_array_equal(got["b"], merged_reference(tiny_dir, data, None, call_audio("b", 8)))
    np.testing.assert_array_equal(got["c"], merged_reference(tiny_dir, data, "a1", call_audio("c", 8)))
    assert (got["b"][:, 0] <= text_card).all() and (got["c"][:, 0] <= text_card).all()


def test_an_extension_the_engine_cannot_serve_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    directory = extension_adapter(tiny_dir, tmp_path / "ext")
    loaded = load_model(tiny_dir)
    adapter = read_adapter(directory, "ext")
    base = base_identity(loaded.files.config, loaded.lm_sha256)
    for limit, expected in ((0, "serves none"), (3, "at most 3")):
        text = text_shapes(loaded.lm, limit)
        with pytest.raises(AdapterError, match=expected) as exc:
            check_adapter(adapter, linear_shapes(loaded.lm), base, list(TARGETS), 16, text)
        assert "\n" not in str(exc.value)
    check_adapter(adapter, linear_shapes(loaded.lm), base, list(TARGETS), 16, text_shapes(loaded.lm, 8))


def test_an_adapter_holding_nan_is_refused(data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(data_dir / "adapters" / "a2", bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN/Inf"):
        read_adapter(bad, "nan")
