"""``train_config.yaml``: every setting of a fine-tuning run, in one file (docs/training_guide.md).

Unknown keys and bad values are refused with one line naming the key, the value and the rule
(:class:`ConfigError`). Paths are relative to the config file's directory. ``aziza-admin train init-config``
writes the defaults below with their comments.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

LANGUAGES = ("ru", "uz")  # what this pipeline builds; a manifest row in another language is refused
DEFAULT_TARGETS = (  # the temporal transformer's attention and gating linears (docs/adapters.md)
    "transformer.layers.*.self_attn.in_projs.*",
    "transformer.layers.*.self_attn.out_projs.*",
    "transformer.layers.*.gating.linear_in",
    "transformer.layers.*.gating.linear_out",
)


class ConfigError(ValueError):
    """The config cannot be used; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    manifest: str = "manifest.jsonl"  # JSON lines: one recording each (docs/training_guide.md)
    dataset_dir: str | None = None  # default: <run_dir>/dataset
    languages: list[Literal["ru", "uz"]] = Field(default_factory=lambda: ["ru", "uz"],  # type: ignore[arg-type]
                                                 min_length=1)
    persona_prompt: str = ""  # the persona's <system> text, prepended to every sample as the engine does
    aligner: Literal["uniform", "manifest", "faster-whisper"] = "uniform"
    aligner_model: str | None = None  # a faster-whisper model directory (aligner = faster-whisper)
    min_seconds: float = Field(default=0.5, gt=0)
    max_seconds: float = Field(default=60.0, gt=0)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)  # rows without a "split" go to val by id hash
    shard_samples: int = Field(default=256, ge=1)
    min_rms: float = Field(default=1e-4, ge=0)  # agent (or mono) audio quieter than this is "silent"

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.min_seconds >= self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds}) must be below max_seconds "
                             f"({self.max_seconds})")
        if self.aligner == "faster-whisper" and not self.aligner_model:
            raise ValueError("aligner = faster-whisper needs aligner_model (a model directory on disk)")
        return self


class TokenizerConfig(_Section):
    extend: bool = True  # learn new pieces for the languages' scripts and grow the text embedding/head
    new_pieces: int = Field(default=4000, ge=8)  # size of the corpus model the new pieces come from
    # at most this many are added (best first): the engine serves up to engine.lora_max_added_tokens (2048)
    max_added: int = Field(default=2048, ge=1)
    character_coverage: float = Field(default=1.0, gt=0, le=1)


class LoraConfig(_Section):
    rank: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)

    @field_validator("targets")
    @classmethod
    def _inside_transformer(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.startswith("transformer."):
                raise ValueError(f"{pattern!r} is outside the temporal transformer (the engine adapts "
                                 "transformer.* only)")
        return value


class TrainConfig(_Section):
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quantize: Literal["auto", "nf4", "none"] = "auto"  # auto: NF4 (QLoRA) on CUDA, fp32 base on CPU
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # CUDA only; CPU computes in fp32
    lr: float = Field(default=2e-4, gt=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_steps: int = Field(default=2000, ge=1)
    eval_every: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)  # the best one is kept in addition
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(default=1.0, gt=0)
    text_padding_weight: float = Field(default=0.5, ge=0, le=1)  # PAD/EPAD targets count this much
    first_codebook_weight: float = Field(default=100.0, gt=0)  # semantic codebook vs the 7 acoustic ones
    embedding_lr_scale: float = Field(default=1.0, gt=0)  # new-token rows' lr = lr * this
    max_val_samples: int = Field(default=256, ge=1)


class EvalConfig(_Section):
    judge: Literal["template", "faster-whisper", "whisper"] = "template"
    judge_model: str | None = None  # model directory on disk for the Whisper judges
    max_samples: int = Field(default=50, ge=1)  # per language
    wer_targets: dict[str, float] = Field(default_factory=lambda: {"ru": 0.15, "uz": 0.20})
    temp: float = Field(default=0.0, ge=0)  # audio sampling temperature while the text is forced

    @model_validator(mode="after")
    def _judge(self) -> EvalConfig:
        if self.judge != "template" and not self.judge_model:
            raise ValueError(f"judge = {self.judge} needs judge_model (a model directory on disk)")
        for lang, target in self.wer_targets.items():
            if lang not in LANGUAGES or not 0 < target <= 1:
                raise ValueError(f"wer_targets: {lang}={target} (languages {', '.join(LANGUAGES)}, "
                                 "0 < target <= 1)")
        return self


class Config(_Section):
    model: str  # the engine's model: a weights directory or a cached Hugging Face repo id
    run_dir: str = "run"
    seed: int = 1234
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    _base_dir: Path = PrivateAttr(default=Path("."))  # the config file's directory (not a key)

    @model_validator(mode="after")
    def _dropout_and_checkpointing(self) -> Config:
        if self.lora.dropout > 0 and self.train.gradient_checkpointing:
            # moshi's checkpointing recomputes layers without restoring the RNG: other dropout masks
            raise ValueError("lora.dropout > 0 needs train.gradient_checkpointing: false (moshi recomputes "
                             "checkpointed layers without the RNG state, so dropout masks would differ)")
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def run_path(self) -> Path:
        return self.path(self.run_dir)

    @property
    def dataset_path(self) -> Path:
        return self.path(self.data.dataset_dir) if self.data.dataset_dir else self.run_path / "dataset"

    @property
    def tokenizer_path(self) -> Path:
        return self.run_path / "tokenizer"

    @property
    def model_ref(self) -> str:
        """A directory (resolved against the config's directory) or a Hugging Face repo id as written."""
        local = self.path(self.model)
        return str(local) if local.exists() else self.model


def _one_line(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    dotted = ".".join(str(p) for p in err["loc"]) or "(top level)"
    rule = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{source}: unknown key {dotted!r} (see docs/training_guide.md for the keys)")
    if err["type"] == "missing":
        return ConfigError(f"{source}: missing key {dotted!r}")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if isinstance(err.get("input"), dict):  # a rule across keys: the rule names them, not the whole section
        where = f"{dotted}: " if err["loc"] else ""
        return ConfigError(f"{source}: {where}{rule}{more}")
    return ConfigError(f"{source}: {dotted} = {err.get('input')!r}: {rule}{more}")


def parse_config(data: Any, source: str = "train_config.yaml", base_dir: Path | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    _reject_non_finite(data, source, "")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, source) from None
    config._base_dir = base_dir or Path(".")
    return config


def _reject_non_finite(data: Any, source: str, prefix: str) -> None:
    """YAML spells NaN/inf as .nan/.inf; pydantic's bounds do not catch NaN, so refuse them here."""
    if isinstance(data, dict):
        for key, value in data.items():
            _reject_non_finite(value, source, f"{prefix}{key}.")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{source}: {prefix.rstrip('.')} = {data}: must be a finite number")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (YAML); ``overrides`` are dotted keys (``train.max_steps``) applied before validation."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not readable YAML ({reason})") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return parse_config(data, str(path), path.resolve().parent)


def default_config_text(model: str = "kyutai/moshiko-pytorch-bf16") -> str:
    """The documented defaults, as ``train init-config`` writes them."""
    return f"""\
# Aziza fine-tuning run (docs/training_guide.md). Paths are relative to this file.
model: {model}        # the engine's model: a weights directory or a cached Hugging Face repo id
run_dir: run                              # checkpoints, tokenizer, dataset, reports
seed: 1234

data:
  manifest: manifest.jsonl                # one JSON object per recording (see the guide)
  # dataset_dir: run/dataset              # default <run_dir>/dataset
  languages: [ru, uz]
  persona_prompt: ""                      # the persona's <system> text, prepended as the engine does
  aligner: uniform                        # uniform | manifest (word timestamps in rows) | faster-whisper
  # aligner_model: /models/faster-whisper-large-v3
  min_seconds: 0.5
  max_seconds: 60.0
  val_fraction: 0.1                       # rows without "split" go to val by a hash of their id
  shard_samples: 256
  min_rms: 0.0001

tokenizer:
  extend: true                            # new pieces for Cyrillic / Uzbek; base ids unchanged
  new_pieces: 4000                        # vocabulary of the corpus model the new pieces are taken from
  max_added: 2048                         # at most this many added: the engine's lora_max_added_tokens
  character_coverage: 1.0

lora:
  rank: 16
  alpha: 32
  dropout: 0.0
  targets:                                # the temporal transformer's attention and gating linears
{chr(10).join(f'    - "{t}"' for t in DEFAULT_TARGETS)}

train:
  device: auto                            # auto | cpu | cuda | cuda:N
  quantize: auto                          # auto: nf4 (QLoRA, bitsandbytes) on CUDA, none on CPU
  compute_dtype: bf16
  lr: 2.0e-4
  warmup_steps: 50
  schedule: cosine                        # cosine | constant (after warmup)
  weight_decay: 0.0
  batch_size: 8
  grad_accum: 1
  max_steps: 2000
  eval_every: 100                         # validation loss every N steps (best checkpoint by it)
  checkpoint_every: 100
  keep_checkpoints: 3                     # plus the best
  gradient_checkpointing: true
  max_grad_norm: 1.0
  text_padding_weight: 0.5
  first_codebook_weight: 100.0
  embedding_lr_scale: 1.0
  max_val_samples: 256

eval:
  judge: template                         # template (closed set, tests) | faster-whisper | whisper
  # judge_model: /models/faster-whisper-large-v3
  max_samples: 50                         # per language
  wer_targets: {{ru: 0.15, uz: 0.20}}
  temp: 0.0
"""
