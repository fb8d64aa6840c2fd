"""The appliance's one configuration file, as aziza-bridge and aziza-admin read it.

The ``[engine]`` table of the same file is read by aziza-engine itself (``engine/config.py``): the bridge
only talks to engines through their protocol and URLs (``bridge.engine_urls``).

Sources, highest priority first:
  1. environment variables: ``AZIZA_<FIELD>`` for top-level fields (``AZIZA_DATABASE_URL``) and
     ``AZIZA_<SECTION>__<FIELD>`` for sections (``AZIZA_ENGINE__NUM_SLOTS=16``);
  2. the TOML file named by ``AZIZA_CONFIG`` (default ``/etc/aziza/aziza.toml``, which may be missing; a
     file that ``AZIZA_CONFIG`` names must exist), with the same names: top-level keys and ``[engine]``,
     ``[bridge]``, ``[ari]``, ``[capacity]`` tables;
  3. the defaults below.

A bad value raises :class:`ConfigError`, one line per problem naming the field, the value (secrets masked),
where it came from and the rule. Unknown ``AZIZA_*`` variables and unknown TOML keys are not errors (a
typo must not stop a running appliance from restarting) but :func:`config_warnings` names each one.
``docs/configuration.md`` lists every field; ``aziza-admin config show`` prints the effective values.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.redact import mask_value

DEFAULT_CONFIG_PATH = "/etc/aziza/aziza.toml"
DEFAULT_CONTROL_TOKEN_FILE = "/etc/aziza/control.token"
ENV_PREFIX = "AZIZA_"
ENGINE_SECTION = "engine"  # the [engine] table and AZIZA_ENGINE__*: aziza-engine's, not read here
ENGINE_ENV_PREFIX = f"{ENV_PREFIX}{ENGINE_SECTION.upper()}__"
# AZIZA_* variables that are not settings fields but are read by other parts of the appliance.
OTHER_AZIZA_VARIABLES = frozenset({
    "AZIZA_CONFIG",  # this module: the TOML file
    "AZIZA_ASTERISK_TEMPLATES",  # provision asterisk: template directory
    "AZIZA_VENV", "AZIZA_DB_NAME", "AZIZA_DB_USER", "AZIZA_NO_START",  # provisioning scripts
    "AZIZA_NATIVE", "AZIZA_PURE_PYTHON",  # compiled media modules: build them, run them (bridge/native.py)
    "AZIZA_TEST_PG_ADMIN_URL", "AZIZA_TEST_REDIS_URL", "AZIZA_TEST_FUZZ_CASES", "AZIZA_ARI_DOCS",  # tests
})
PortNumber = Field(ge=0, le=65535)  # 0: an ephemeral port (tests)

log = logging.getLogger("aziza.config")


class ConfigError(ValueError):
    """The configuration cannot be used. ``problems``: one line each, naming field, value and rule."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _MaskedRepr(BaseModel):
    """repr() of a settings object never shows a secret (tracebacks and debug logs print it)."""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, value if isinstance(value, BaseModel) else mask_value(name or "", value)


def _check_port_range(low: int, high: int, what: str) -> None:
    if low > high:
        raise ValueError(f"{what}_min = {low} is above {what}_max = {high}: the range must not be empty")


class BridgeSettings(_MaskedRepr):
    """aziza-bridge: call media and the HTTP side (health, metrics, browser WebSocket, control)."""

    # Address of this host as Asterisk should send RTP to it (externalMedia external_host).
    rtp_advertise_host: str = "127.0.0.1"
    rtp_bind_host: str = "127.0.0.1"
    rtp_port_min: int = Field(default=20000, ge=1024, le=65535)
    rtp_port_max: int = Field(default=29999, ge=1024, le=65535)
    # Jitter buffer: playout delay target and hard bound.
    jitter_target_ms: int = Field(default=40, ge=0)
    jitter_max_ms: int = Field(default=200, ge=20)
    # Inbound codec Asterisk is asked to send (the return path is always ulaw).
    inbound_format: Literal["ulaw", "slin16"] = "ulaw"
    # The media clock's tick (ms): every call's RTP is read and sent on it, so the calls due in a tick share
    # one wake-up (bridge/media/read_schedule.py); a packet waits at most a tick. 0: each at its own instant.
    media_tick_ms: float = Field(default=4.0, ge=0, le=10)
    # Media worker processes (bridge/media/workers.py): phone calls' media (RTP, engine session) runs in
    # N processes, each call on the one with the fewest, so the media path uses N cores. 0: in the bridge
    # process itself (one core; fine for a few dozen calls). The installer writes one per core.
    media_workers: int = Field(default=0, ge=0, le=64)
    # SCHED_RR priority of the processes that carry calls' media (each media worker, or the bridge itself with
    # media_workers = 0), as Asterisk's -p (priority 10) does: beside busy processes the kernel otherwise runs
    # the media loop's timer wake-ups late. 0: normal scheduling. Needs root, CAP_SYS_NICE or RLIMIT_RTPRIO
    # at least this (the unit's LimitRTPRIO=10); refused, the media runs normally and a warning says so.
    media_realtime_priority: int = Field(default=5, ge=0, le=99)
    # Engine sessions as channels of one WebSocket per engine and process (the engine's /mux, engine/mux.py):
    # the frames of a tick's calls go in one message each way. false: a WebSocket per session (/session).
    engine_mux: bool = True
    engine_url: str = "ws://127.0.0.1:8998/session"
    # More engines (one per GPU: aziza-engine@N listens on port 8998 + N). When set, calls go to the engine
    # with the most free slots among engine_urls; engine_url is then not used.
    engine_urls: list[str] = []

    def engines(self) -> list[str]:
        """The engine session URLs calls are placed on."""
        return list(self.engine_urls) or [self.engine_url]
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8089, ge=0, le=65535)
    # Seconds of silence (no RTP) after which a call is considered dead media.
    media_timeout_s: float = Field(default=30.0, gt=0)
    # Seconds of the caller's audio (counted in 80 ms frames sent, so a hold, which sends none, is not
    # counted) that the engine may take without answering one frame: then the call's media ends as
    # engine_stalled (a browser talk too), rather than the caller hearing silence for the rest of the call.
    engine_answer_timeout_s: float = Field(default=5.0, gt=0)
    # The control API's bearer token (root:aziza 0640, written by the installer; aziza-admin reads it too).
    control_token_file: Path = Path(DEFAULT_CONTROL_TOKEN_FILE)
    # Host names (besides loopback and http_host) the HTTP side answers to; others get 421.
    allowed_hosts: list[str] = []
    # Base URL browsers reach the bridge at, for talk links (default: http://http_host:http_port).
    public_url: str | None = None
    # Origins (besides public_url's) whose pages may open /ws/talk.
    talk_origins: list[str] = []

    @field_validator("media_tick_ms")
    @classmethod
    def _tick_divides_ptime(cls, value: float) -> float:
        if value and abs(20.0 / value - round(20.0 / value)) > 1e-9:
            raise ValueError("must be 0 or divide 20 ms into whole ticks (1, 2, 2.5, 4, 5, 10...)")
        return value

    @field_validator("engine_url")
    @classmethod
    def _engine_url_scheme(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://", "unix://")):
            raise ValueError("must start with ws://, wss:// or unix://")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _rtp_range(self) -> Self:
        _check_port_range(self.rtp_port_min, self.rtp_port_max, "rtp_port")
        return self


class AriSettings(_MaskedRepr):
    """The Asterisk REST Interface this bridge controls."""

    url: str = "http://127.0.0.1:8088"
    username: str = "aziza"
    password: str = "aziza"
    app: str = "aziza"
    reconnect_min_s: float = Field(default=0.5, gt=0)
    # Asterisk is on loopback: retrying often is cheap, and after a restart new calls wait for the retry.
    reconnect_max_s: float = Field(default=2.0, gt=0)
    # How a call is refused when the house is full: busy -> SIP 486, congestion -> SIP 503.
    refuse_reason: Literal["busy", "congestion"] = "busy"
    moh_class: str = "default"
    # Played to the caller before a DTMF hang-up ("#"), e.g. "sound:vm-goodbye"; None hangs up at once.
    goodbye_sound: str | None = None
    # How long a transfer target may ring before the caller comes back to the agent.
    transfer_timeout_s: int = Field(default=30, ge=1, le=600)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s = {self.reconnect_min_s} is above reconnect_max_s = {self.reconnect_max_s}"
            )
        return self


class CapacitySettings(_MaskedRepr):
    """Redis capacity leases: one slot per live call."""

    slots: int = Field(default=10, ge=1)
    lease_ttl_s: float = Field(default=15.0, gt=0)
    renew_every_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _renew_inside_ttl(self) -> Self:
        if self.renew_every_s >= self.lease_ttl_s:
            raise ValueError(
                f"renew_every_s = {self.renew_every_s} must be shorter than lease_ttl_s = {self.lease_ttl_s}"
                " (or every lease lapses between renewals)"
            )
        return self


class AsteriskSettings(_MaskedRepr):
    """What `aziza-admin provision asterisk` renders into the Asterisk configuration."""

    # Where rendered files go by default (`--out` overrides).
    config_dir: Path = Path("/etc/asterisk")
    sip_bind_host: str = "0.0.0.0"
    sip_port: int = Field(default=5060, ge=1, le=65535)
    # Public address for SDP/Contact behind NAT (None: not behind NAT).
    external_address: str | None = None
    # SIP trunk peers whose INVITEs reach the aziza-inbound context: an IP or host name (also dialled
    # through its contact) or a CIDR range such as 198.51.100.0/24 (matched only: `identify match`).
    trunk_hosts: list[str] = []
    # One SIP phone that registers with a username and password (a test phone or softphone); its calls
    # reach aziza-inbound like a trunk's. None: no phone endpoint.
    test_phone_username: str | None = None
    test_phone_password: str | None = None
    codecs: list[str] = ["ulaw", "alaw", "g722"]
    # Asterisk's own RTP ports; must not overlap the bridge's rtp_port_min..rtp_port_max.
    rtp_port_min: int = Field(default=10000, ge=1024, le=65535)
    rtp_port_max: int = Field(default=19999, ge=1024, le=65535)

    @model_validator(mode="after")
    def _rtp_range(self) -> Self:
        _check_port_range(self.rtp_port_min, self.rtp_port_max, "rtp_port")
        return self

    @model_validator(mode="after")
    def _test_phone_pair(self) -> Self:
        if (self.test_phone_username is None) != (self.test_phone_password is None):
            raise ValueError("test_phone_username and test_phone_password go together (set both or neither)")
        return self


class Settings(_MaskedRepr, BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
    )

    database_url: str = "postgresql://aziza@127.0.0.1:5432/aziza"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Key prefix for everything this appliance keeps in Redis (tests use their own).
    redis_prefix: str = "aziza"
    data_dir: Path = Path("/var/lib/aziza")
    log_level: str = "INFO"

    bridge: BridgeSettings = BridgeSettings()
    ari: AriSettings = AriSettings()
    capacity: CapacitySettings = CapacitySettings()
    asterisk: AsteriskSettings = AsteriskSettings()

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, os.environ)) from None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _rtp_ranges_apart(self) -> Self:
        b, a = self.bridge, self.asterisk
        if b.rtp_port_min <= a.rtp_port_max and a.rtp_port_min <= b.rtp_port_max:
            raise ValueError(
                f"bridge.rtp_port_min..max {b.rtp_port_min}-{b.rtp_port_max} overlaps "
                f"asterisk.rtp_port_min..max {a.rtp_port_min}-{a.rtp_port_max}: "
                "Asterisk and the bridge would fight over the same ports"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_path(os.environ)
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=path),
        )


def config_path(environ: Mapping[str, str]) -> Path:
    """The TOML file to read. A file that AZIZA_CONFIG names must exist; the default may be missing."""
    named = environ.get("AZIZA_CONFIG")
    if named is None:
        return Path(DEFAULT_CONFIG_PATH)
    path = Path(named)
    if not path.is_file():
        why = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(
            [f"AZIZA_CONFIG = {named}: {why} (unset AZIZA_CONFIG to use {DEFAULT_CONFIG_PATH})"]
        )
    return path


def _field_paths(model: type[BaseModel] = Settings) -> dict[str, str]:
    """Env variable name -> dotted field path, for every field (sections one level deep)."""
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for inner in sub.model_fields:
                found[f"{ENV_PREFIX}{name}__{inner}".upper()] = f"{name}.{inner}"
        else:
            found[f"{ENV_PREFIX}{name}".upper()] = name
    return found


def _describe(exc: ValidationError, environ: Mapping[str, str]) -> list[str]:
    """One line per error: ``section.field = value (from AZIZA_X): rule``, secrets masked."""
    env_of = {path: env for env, path in _field_paths().items()}
    upper_env = {k.upper(): v for k, v in environ.items()}
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc) or "settings"
        rule = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        env = env_of.get(dotted)
        source = f" (from {env})" if env and env in upper_env else ""
        if isinstance(value, dict) or (err["type"] == "value_error" and dotted not in env_of):
            # A rule across fields names its fields and values itself; say which were set by variables.
            named = [env for path, env in env_of.items() if path.startswith(f"{dotted}.")
                     and path.rpartition(".")[2] in rule and env in upper_env]
            source = f" (from {', '.join(named)})" if named else ""
            lines.append(f"{dotted}{source}: {rule}")
            continue
        shown = mask_value(loc[-1] if loc else "", value)
        lines.append(f"{dotted} = {shown}{source}: {rule}")
    return lines


def _hint(name: str, candidates: list[str]) -> str:
    guess = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {guess[0]}?)" if guess else ""


def config_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Unknown AZIZA_* variables and unknown keys in the TOML file, each with a guess at what was meant."""
    environ = os.environ if environ is None else environ
    known = _field_paths()
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENGINE_ENV_PREFIX):
            continue  # the engine's own section: aziza-engine checks it (engine/config.py)
        if upper.startswith(ENV_PREFIX) and upper not in known and upper not in OTHER_AZIZA_VARIABLES:
            hint = _hint(upper, [*known, *OTHER_AZIZA_VARIABLES])
            warnings.append(f"unknown variable {name} is ignored{hint}")
    try:
        path = config_path(environ)
        data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ConfigError, OSError, tomllib.TOMLDecodeError):
        return warnings  # reading the settings reports these as errors
    sections = {name: f.annotation for name, f in Settings.model_fields.items()}
    for key, value in data.items():
        sub = sections.get(key)
        if key == ENGINE_SECTION:
            continue  # read and checked by aziza-engine itself
        if key not in sections:
            warnings.append(f"{path}: unknown key {key} is ignored{_hint(key, list(sections))}")
        elif isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            fields = list(sub.model_fields)
            warnings.extend(
                f"{path}: unknown key [{key}] {inner} is ignored{_hint(inner, fields)}"
                for inner in value if inner not in sub.model_fields
            )
    return warnings


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-able data with every secret masked (passwords, tokens, URL credentials)."""
    data: dict[str, Any] = mask_value("", settings.model_dump(mode="json"))
    return data


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once (warnings logged). Tests build ``Settings(...)`` directly."""
    settings = Settings()
    for warning in config_warnings():
        log.warning("configuration: %s", warning)
    return settings
