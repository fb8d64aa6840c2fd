"""Tokenizer extension: new SentencePiece pieces for Russian (Cyrillic) and Uzbek (Latin and Cyrillic).

The extended tokenizer is the base model with pieces appended (docs/adapters.md, "Vocabulary extension"):
- ids ``0 .. base-1`` are exactly the base's (same pieces, same scores, same types). A base tokenizer with
  fewer pieces than the LM's ``text_card`` (the tiny test model) is padded with UNUSED pieces up to it, so
  ``base = text_card`` and new piece ``i`` has id ``text_card + i`` (model text id ``text_card + 1 + i``:
  ``text_card`` is moshi's initial token);
- new pieces are learned from the corpus text (a unigram model trained on the transcripts) and kept only
  where the base cannot spell the text without ``<unk>`` or byte pieces: Cyrillic words, Uzbek Latin words
  with ``ʻ``/``ʼ``. Plain-ASCII Uzbek Latin pieces are dropped: the base already spells them, and adding
  them would change how the base tokenizes its own languages;
- their scores are the corpus model's minus :data:`NEW_PIECE_OFFSET`, far below any base piece, so a word
  the base spells without ``<unk>`` is tokenized exactly as before (Viterbi never picks a new piece there),
  and among new pieces the corpus model's preferences hold.
"""

from __future__ import annotations

import hashlib
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sentencepiece

NEW_PIECE_OFFSET = 1.0e4
TOKENIZER_FILE = "tokenizer.model"
_UNUSED = 5  # sentencepiece ModelProto.SentencePiece.Type.UNUSED
_NORMAL = 1


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class VocabExtension:
    base: int  # = the LM's text_card
    added: int
    pieces: list[str]
    by_script: dict[str, int] = field(default_factory=dict)
    skipped_covered: int = 0  # corpus pieces the base already spells (not added)
    sha256: str = ""

    def model_id(self, sp_id: int) -> int:
        """SentencePiece id -> the LM's text id (new pieces sit after moshi's initial token)."""
        return sp_id if sp_id < self.base else sp_id + 1

    def as_block(self) -> dict[str, int]:
        return {"base": self.base, "added": self.added}


def script_of(piece: str) -> str:
    for ch in piece:
        if "CYRILLIC" in unicodedata.name(ch, ""):
            return "cyrillic"
    return "latin"


def _needs_new_piece(base: sentencepiece.SentencePieceProcessor, text: str) -> bool:
    ids = base.encode(text)
    return any(base.is_unknown(i) or base.is_byte(i) for i in ids)


def extend_tokenizer(base_model: Path, corpus: list[str], out_dir: Path, text_card: int, new_pieces: int,
                     character_coverage: float = 1.0, max_added: int | None = None) -> VocabExtension:
    """Write ``out_dir/tokenizer.model`` (base + new pieces) and return what was added: at most ``max_added``
    pieces, the corpus model's best first (the engine serves at most ``engine.lora_max_added_tokens``)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(base_model.read_bytes())
    base_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    n_base = len(proto.pieces)
    if n_base > text_card:
        raise TokenizerError(f"{base_model}: {n_base} pieces but the LM's text_card is {text_card}")
    lines = [" ".join(line.split()) for line in corpus if line.strip()]
    if not lines:
        raise TokenizerError("no corpus text to learn pieces from")
    existing = {p.piece for p in proto.pieces}
    for i in range(n_base, text_card):  # placeholders: never produced by encode, keep base = text_card
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<aziza_unused_{i}>", 0.0, _UNUSED
    learned = _learn(lines, new_pieces, character_coverage, proto.normalizer_spec.name)
    added: list[str] = []
    by_script: dict[str, int] = {}
    skipped = 0
    for piece, score in learned:
        if max_added is not None and len(added) >= max_added:
            break
        if piece in existing:
            continue
        if not _needs_new_piece(base_sp, piece.replace("\u2581", " ")):
            skipped += 1
            continue
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, score - NEW_PIECE_OFFSET, _NORMAL
        existing.add(piece)
        added.append(piece)
        by_script[script_of(piece)] = by_script.get(script_of(piece), 0) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    tmp = out_dir / f".{TOKENIZER_FILE}.tmp"
    tmp.write_bytes(data)
    tmp.replace(out_dir / TOKENIZER_FILE)
    ext = VocabExtension(base=text_card, added=len(added), pieces=added, by_script=by_script,
                         skipped_covered=skipped, sha256=hashlib.sha256(data).hexdigest())
    check_extension(base_model, out_dir / TOKENIZER_FILE, ext)
    return ext


def _learn(lines: list[str], vocab_size: int, coverage: float, normalizer: str) -> list[tuple[str, float]]:
    """A unigram model of the corpus: its normal pieces with their scores, best first."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="aziza-spm-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "corpus"
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
                character_coverage=coverage, hard_vocab_limit=False, normalization_rule_name=normalizer or
                "nmt_nfkc", minloglevel=2, num_threads=1, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
        except RuntimeError as exc:
            raise TokenizerError(f"learning pieces from the corpus failed: {exc}") from None
        proto = pb.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString((Path(tmp) / "corpus.model").read_bytes())
    pieces = [(p.piece, float(p.score)) for p in proto.pieces if p.type == _NORMAL]
    return sorted(pieces, key=lambda ps: -ps[1])


def check_extension(base_model: Path, extended: Path, ext: VocabExtension) -> None:
    """The extended tokenizer loads, keeps every base id's piece, and holds exactly base + added pieces."""
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(base_model))
    got = spm.SentencePieceProcessor(model_file=str(extended))
    if got.vocab_size() != ext.base + ext.added:
        raise TokenizerError(f"{extended}: {got.vocab_size()} pieces, expected {ext.base + ext.added}")
    for i in range(base.vocab_size()):
        if got.id_to_piece(i) != base.id_to_piece(i):
            raise TokenizerError(f"{extended}: id {i} is {got.id_to_piece(i)!r}, the base's is "
                                 f"{base.id_to_piece(i)!r}")


def load(path: Path) -> sentencepiece.SentencePieceProcessor:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from None
