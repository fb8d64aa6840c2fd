"""aziza-engine's settings: the ``[engine]`` table of the appliance's one configuration file.

The engine reads them itself (it never imports the bridge): environment ``AZIZA_ENGINE__<FIELD>`` first,
then the TOML file named by ``AZIZA_CONFIG`` (default ``/etc/aziza/aziza.toml``), then the defaults below.
The top-level ``data_dir`` and ``log_level`` (``AZIZA_DATA_DIR``, ``AZIZA_LOG_LEVEL``) are shared with the
bridge. ``docs/configuration.md`` lists every field.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = "/etc/aziza/aziza.toml"


class EngineConfigError(RuntimeError):
    """The configuration cannot be read: a missing ``AZIZA_CONFIG`` file or an invalid value."""


class ConfigFileError(EngineConfigError):
    """``AZIZA_CONFIG`` names a file that does not exist."""


class EngineSettings(BaseModel):
    """aziza-engine: the model server (one per GPU)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8998, ge=0, le=65535)
    # When set, the engine listens on this Unix socket instead of host:port.
    unix_socket: str | None = None
    backend: Literal["echo", "moshi"] = "echo"
    num_slots: int = Field(default=10, ge=1)
    # How long the scheduler waits for more slots' frames before stepping the batch.
    batch_window_ms: float = Field(default=20.0, ge=0)
    # Echo backend: output frame k is input frame k - echo_delay_frames (silence before).
    echo_delay_frames: int = Field(default=0, ge=0)
    # Moshi backend: a weights directory (config.json + safetensors) or a Hugging Face repo id in the cache.
    model: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    # KV cache of the temporal transformer: auto = the compute dtype; fp8 = e4m3 with per-head scales.
    kv_dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    cuda_graphs: bool = True
    # Sessions that send nothing for this long are closed and their slot freed.
    idle_timeout_s: float = Field(default=30.0, gt=0)
    # A paused (held) session is closed after this long: a hold must not keep a slot forever.
    pause_max_s: float = Field(default=900.0, gt=0)
    # Missing input frames (a numbering gap) up to this many are stepped as silence, keeping the model's
    # time aligned with the caller's at the cost of that much added latency for the rest of the call; a
    # longer gap is reported and not stepped. 0: never add latency (every gap is reported only).
    max_gap_fill_frames: int = Field(default=0, ge=0)
    # Sampling, Moshi's defaults; a persona may override each. temp 0 = greedy.
    temp: float = Field(default=0.8, ge=0)
    top_k: int = Field(default=250, ge=1)
    temp_text: float = Field(default=0.7, ge=0)
    top_k_text: int = Field(default=25, ge=1)
    # Upper bound of any top_k (fixes the sampler's buffer shapes for CUDA graphs).
    max_top_k: int = Field(default=250, ge=1)
    # LoRA: adapters resident on the device at once (each a page of lora_max_rank), the modules adapters
    # may target (fnmatch patterns over the LM's module names), and the host cache of loaded adapters.
    max_adapters: int = Field(default=4, ge=0)
    lora_max_rank: int = Field(default=32, ge=1)
    lora_targets: list[str] = ["transformer.*"]
    adapter_cache_mb: int = Field(default=2048, ge=0)
    # New text tokens an adapter may bring (its vocabulary extension, docs/adapters.md); 0 refuses them.
    lora_max_added_tokens: int = Field(default=2048, ge=0)
    # Persona prefixes (prompted state) kept, least recently used dropped first.
    max_prefixes: int = Field(default=8, ge=1)
    # Device memory left free when sizing num_slots (allocator fragmentation, cuBLAS workspaces).
    memory_reserve_mb: int = Field(default=2048, ge=0)
    # systemd template aziza-engine@N: instance N listens on port + N and uses GPU N.
    instance: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _top_k_within_bound(self) -> EngineSettings:
        for name in ("top_k", "top_k_text"):
            if getattr(self, name) > self.max_top_k:
                raise ValueError(f"{name}={getattr(self, name)} exceeds max_top_k={self.max_top_k}")
        return self

    def for_instance(self, visible_devices: str | None = None) -> EngineSettings:
        """The settings of instance N: port + N, and GPU N — ``cuda:0`` when ``CUDA_VISIBLE_DEVICES``
        (``visible_devices``) already shows this process only its own GPU, as ``aziza-engine@N`` does."""
        if self.instance is None:
            return self
        device = self.device
        if device in ("auto", "cuda"):
            only_one = visible_devices is not None and "," not in visible_devices.strip(",")
            device = "cuda:0" if only_one else f"cuda:{self.instance}"
        return self.model_copy(update={"port": self.port + self.instance if self.port else 0,
                                       "device": device})


class EngineConfig(BaseSettings):
    """What aziza-engine reads: the shared top-level keys it uses and its own ``[engine]`` table."""

    model_config = SettingsConfigDict(env_prefix="AZIZA_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("/var/lib/aziza")
    log_level: str = "INFO"
    engine: EngineSettings = EngineSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_path()))


def config_path(environ: dict[str, str] | None = None) -> str:
    """The TOML file: ``AZIZA_CONFIG`` must name an existing file; the default path may be absent."""
    path = (os.environ if environ is None else environ).get("AZIZA_CONFIG")
    if path is None:
        return DEFAULT_CONFIG_PATH
    if not Path(path).is_file():
        raise ConfigFileError(f"AZIZA_CONFIG={path!r}: no such file")
    return path


@lru_cache(maxsize=1)
def get_engine_config() -> EngineConfig:
    """Read once per process (the engine); see ``load_engine_config``."""
    return load_engine_config()


def load_engine_config() -> EngineConfig:
    """Read now (the admin CLI, whose environment tests change); EngineConfigError names the field, its
    value and the rule when invalid."""
    from pydantic import ValidationError

    try:
        return EngineConfig()
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            dotted = ".".join(map(str, err["loc"]))
            env = f"AZIZA_{dotted.replace('.', '__').upper()}"
            source = f" (from {env})" if env in os.environ else ""
            rule = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{dotted} = {err.get('input')}{source}: {rule}")
        raise EngineConfigError("; ".join(lines)) from None


ENGINE_ENV_PREFIX = "AZIZA_ENGINE__"


def config_warnings(environ: dict[str, str] | None = None) -> list[str]:
    """Unknown ``AZIZA_ENGINE__*`` variables and unknown keys of the ``[engine]`` table (the bridge checks
    the rest of the file), each with a guess at what was meant. Not errors: a typo must not stop a restart."""
    import difflib
    import tomllib

    environ = dict(os.environ) if environ is None else environ
    fields = list(EngineSettings.model_fields)

    def hint(name: str) -> str:
        guess = difflib.get_close_matches(name, fields, n=1)
        return f" (did you mean {guess[0]}?)" if guess else ""

    warnings = []
    for name in sorted(environ):
        if name.upper().startswith(ENGINE_ENV_PREFIX):
            field = name[len(ENGINE_ENV_PREFIX):].lower()
            if field not in EngineSettings.model_fields:
                warnings.append(f"unknown variable {name} is ignored{hint(field)}")
    try:
        path = Path(config_path(environ))
        data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ConfigFileError, OSError, tomllib.TOMLDecodeError):
        return warnings
    table = data.get("engine")
    if isinstance(table, dict):
        warnings += [f"{path}: unknown key [engine] {key} is ignored{hint(key)}"
                     for key in table if key not in EngineSettings.model_fields]
    return warnings
