"""Bad input is one clear line: train_config.yaml keys and values, manifest rows. Plus the text-per-frame
layout and the tokenizer extension's promise (base ids and base tokenization unchanged)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["NO_TORCH_COMPILE"] = "1"
pytest.importorskip("moshi")
pytest.importorskip("peft")

import sentencepiece as spm
import soundfile
import yaml
from click.testing import CliRunner

from admin_cli.main import cli
from engine.moshi.tiny import _SENTENCES, write_tiny_model
from training.align import UniformAligner, WordSpan, match_words
from training.config import ConfigError, default_config_text, load_config, parse_config
from training.interleave import text_stream
from training.manifest import ManifestError, read_manifest
from training.tokenizer_ext import extend_tokenizer

PAD, EPAD = 3, 0


# -- train_config.yaml ------------------------------------------------------------------------------------


def test_default_config_is_valid_and_documents_every_section(tmp_path: Path) -> None:
    path = tmp_path / "train_config.yaml"
    result = CliRunner().invoke(cli, ["train", "init-config", str(path), "--model", "/models/moshiko"])
    assert result.exit_code == 0, result.output
    config = load_config(path)
    assert config.model == "/models/moshiko" and config.eval.wer_targets == {"ru": 0.15, "uz": 0.20}
    assert config.lora.targets[0] == "transformer.layers.*.self_attn.in_projs.*"
    assert parse_config(yaml.safe_load(default_config_text("m"))).train.max_steps == 2000


@pytest.mark.parametrize(("data", "line"), [
    ({"model": "m", "trian": {}}, "unknown key 'trian'"),
    ({"model": "m", "train": {"lr": -1}}, "train.lr = -1: Input should be greater than 0"),
    ({"model": "m", "train": {"batch_size": "big"}}, "train.batch_size = 'big'"),
    ({"model": "m", "train": {"lr": float("nan")}}, "train.lr = nan: must be a finite number"),
    ({"model": "m", "train": {"optimizer": "sgd"}}, "unknown key 'train.optimizer'"),
    ({"model": "m", "lora": {"targets": ["depformer.layers.0.gating.linear_in"]}}, "outside the temporal"),
    ({"model": "m", "data": {"languages": ["en"]}}, "data.languages.0 = 'en'"),
    ({"model": "m", "eval": {"judge": "whisper"}}, "needs judge_model"),
    ({"train": {}}, "missing key 'model'"),
    ({"model": "m", "lora": {"dropout": 0.1}}, "lora.dropout > 0 needs train.gradient_checkpointing: false"),
])
def test_bad_config_is_one_line(data: dict, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "train_config.yaml")
    message = str(err.value)
    assert line in message and "\n" not in message, message
    assert message.startswith("train_config.yaml: ")


def test_cli_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "train_config.yaml"
    path.write_text("model: m\ntrain:\n  lr: 0\n")
    result = CliRunner().invoke(cli, ["train", "run", "--config", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "train.lr = 0" in lines[0], result.output


# -- manifest rows ----------------------------------------------------------------------------------------


def _wav(path: Path, seconds: float = 1.0, channels: int = 1) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    soundfile.write(str(path), np.stack([tone] * channels, axis=1) if channels > 1 else tone, 16000)


@pytest.mark.parametrize(("row", "line"), [
    ({"id": "a", "audio": "gone.wav", "language": "ru", "transcript": "да"},
     "audio file 'gone.wav' does not exist"),
    ({"id": "a", "audio": "junk.wav", "language": "ru", "transcript": "да"},
     "audio file 'junk.wav' is unreadable"),
    ({"id": "a", "audio": "ok.wav", "language": "kk", "transcript": "да"},
     "language 'kk' is not one of ru, uz"),
    ({"id": "a", "audio": "ok.wav", "language": "uz", "transcript": "  "}, "empty transcript for 'a'"),
    ({"id": "a", "audio": "ok.wav", "language": "uz", "text": "salom"}, "unknown key 'text'"),
    ({"id": "a", "audio": "ok.wav", "language": "uz", "transcript": "x", "role": "boss"}, "role 'boss'"),
])
def test_bad_manifest_row_stops_with_one_line(tmp_path: Path, row: dict, line: str) -> None:
    _wav(tmp_path / "ok.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav file")
    manifest = tmp_path / "manifest.jsonl"
    good = {"id": "g", "audio": "ok.wav", "language": "ru", "transcript": "хорошо"}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(row, ensure_ascii=False) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, ["ru", "uz"], skip_bad=False, skipped={})
    assert str(err.value) == f"manifest.jsonl:2: {line}" or (str(err.value).startswith("manifest.jsonl:2: ")
                                                            and line in str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_skip_bad_counts_each_reason(tmp_path: Path) -> None:
    _wav(tmp_path / "ok.wav")
    _wav(tmp_path / "st.wav", channels=2)
    rows = [
        {"id": "a", "audio": "ok.wav", "language": "ru", "transcript": "да"},
        {"id": "b", "audio": "st.wav", "language": "uz", "transcript": "ha", "agent_channel": 1},
        {"id": "c", "audio": "gone.wav", "language": "ru", "transcript": "да"},
        {"id": "d", "audio": "ok.wav", "language": "de", "transcript": "ja"},
        {"id": "e", "audio": "ok.wav", "language": "ru", "transcript": ""},
        {"id": "a", "audio": "ok.wav", "language": "ru", "transcript": "снова"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{broken\n")
    skipped: dict[str, int] = {}
    kept = read_manifest(manifest, ["ru", "uz"], skip_bad=True, skipped=skipped)
    assert [(r.sample_id, info.channels) for r, info in kept] == [("a", 1), ("b", 2)]
    assert skipped == {"missing file": 1, "wrong language": 1, "empty transcript": 1, "duplicate id": 1,
                       "not JSON": 1}


# -- text per frame ---------------------------------------------------------------------------------------


def test_text_stream_places_words_at_their_frames_with_epad() -> None:
    encode = {"aa": [10], "bb": [11, 12], "cc": [13]}.__getitem__
    spans = [WordSpan("aa", 0.0, 0.2), WordSpan("bb", 0.4, 0.7), WordSpan("cc", 1.2, 1.4)]
    stream = text_stream(spans, 20, encode, PAD, EPAD)
    #            0   1    2    3    4     5   6    7   8    9   10   11   12   13   14   ...
    expected = [10, PAD, PAD, PAD, EPAD, 11, 12, PAD, PAD, PAD, PAD, PAD, PAD, PAD, EPAD, 13] + [PAD] * 4
    assert stream.tokens.tolist() == expected  # bb starts at 0.4 s = frame 5, cc at 1.2 s = frame 15
    assert stream.overflow == 0 and stream.max_shift_frames == 1


def test_text_stream_queues_fast_words_and_counts_overflow() -> None:
    encode = {"long": [1, 2, 4, 5, 6], "x": [7]}.__getitem__
    spans = [WordSpan("long", 0.0, 0.1), WordSpan("x", 0.1, 0.2)]
    fits = text_stream(spans, 8, encode, PAD, EPAD)
    # x starts in frame 1 (0.1 s) and waits behind "long" until frame 5
    assert fits.tokens.tolist() == [1, 2, 4, 5, 6, 7, PAD, PAD] and fits.max_shift_frames == 4
    short = text_stream(spans, 4, encode, PAD, EPAD)
    assert short.overflow == 2  # tokens 6 and 7 never found a frame


def test_uniform_aligner_spreads_words_over_the_voiced_region() -> None:
    sr = 24000
    audio = np.zeros(sr * 2, dtype=np.float32)
    audio[sr // 2: sr * 3 // 2] = 0.3 * np.sin(np.arange(sr) * 0.05)  # voiced from 0.5 s to 1.5 s
    spans = UniformAligner().align(audio, sr, "abc defghi", "ru", None)
    assert [s.word for s in spans] == ["abc", "defghi"]
    assert spans[0].start == pytest.approx(0.5, abs=0.02) and spans[-1].end <= 1.5 + 1e-6
    assert spans[1].start == pytest.approx(0.5 + 1.0 * 4 / 11, abs=0.02)  # in proportion to length + 1


def test_asr_words_are_matched_to_the_transcript() -> None:
    heard = [WordSpan("zdravstvuyte", 0.1, 0.6), WordSpan("mir", 0.7, 0.9), WordSpan("extra", 1.0, 1.1)]
    spans = match_words(["Zdravstvuyte", "dobryy", "mir"], heard)
    assert [(s.word, s.start) for s in spans] == [("Zdravstvuyte", 0.1), ("dobryy", 0.6), ("mir", 0.7)]


# -- tokenizer extension ----------------------------------------------------------------------------------

CORPUS = ["Здравствуйте, чем могу вам помочь?", "Ваша запись подтверждена на вторник.",
          "Assalomu alaykum, sizga qanday yordam bera olaman?", "Oʻzbekiston poytaxti Toshkent.",
          "Ассалому алайкум, сизга қандай ёрдам бера оламан?", "Men gʻalaba qozondim."] * 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def test_extension_keeps_base_ids_and_base_tokenization(tiny_dir: Path, tmp_path: Path) -> None:
    base_file = tiny_dir / "tokenizer.model"
    base = spm.SentencePieceProcessor(model_file=str(base_file))
    ext = extend_tokenizer(base_file, CORPUS, tmp_path, text_card=128, new_pieces=300)
    got = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert ext.base == 128 and ext.added > 20 and got.vocab_size() == 128 + ext.added
    assert ext.by_script.get("cyrillic", 0) > 0 and ext.by_script.get("latin", 0) > 0  # ʻ pieces
    for i in range(base.vocab_size()):  # same pieces, same ids
        assert got.id_to_piece(i) == base.id_to_piece(i)
    for i in range(base.vocab_size(), 128):
        assert got.is_unused(i)  # placeholders up to text_card, never produced
    # base-tokenized text is unchanged: the base's own corpus, and the persona prompt layout
    for text in [*_SENTENCES, "<system> Speak slowly and clearly. <system>", "Thank you, the office opens."]:
        assert got.encode(text) == base.encode(text), text
    # new text: no <unk> left, and each id maps to a model text id after moshi's initial token
    ids = got.encode("Здравствуйте, чем могу помочь? Oʻzbekiston")
    assert got.unk_id() not in ids and any(i >= 128 for i in ids)
    assert base.unk_id() in base.encode("Здравствуйте")
    assert ext.model_id(5) == 5 and ext.model_id(128) == 129


def test_extension_is_bounded_by_max_added(tiny_dir: Path, tmp_path: Path) -> None:
    # The engine serves at most engine.lora_max_added_tokens new rows: the export never brings more.
    base_file = tiny_dir / "tokenizer.model"
    full = extend_tokenizer(base_file, CORPUS, tmp_path / "full", text_card=128, new_pieces=300)
    capped = extend_tokenizer(base_file, CORPUS, tmp_path / "capped", text_card=128, new_pieces=300,
                              max_added=10)
    assert full.added > 10 and capped.added == 10
    assert capped.pieces == full.pieces[:10]  # the corpus model's best pieces first
    got = spm.SentencePieceProcessor(model_file=str(tmp_path / "capped" / "tokenizer.model"))
    assert got.vocab_size() == 128 + 10
