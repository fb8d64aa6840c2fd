"""The appliance's one configuration file, as aziza-bridge and aziza-admin read it.

The ``[engine]`` table of the same file is read by aziza-engine itself (``engine/config.py``): the bridge
only talks to engines through their protocol and URLs (``bridge.engine_urls``).

Sources, highest priority first:
  1. environment variables: ``AZIZA_<FIELD>`` for top-level fields (``AZIZA_DATABASE_URL``) and
     ``AZIZA_<SECTION>__<FIELD>`` for sections (``AZIZA_ENGINE__NUM_SLOTS=16``);
  2. the TOML file named by ``AZIZA_CONFIG`` (default ``/etc/aziza/aziza.toml``; missing is fine),
     with the same names: top-level keys and ``[engine]``, ``[bridge]``, ``[ari]``, ``[capacity]`` tables;
  3. the defaults below.

``docs/configuration.md`` lists every field; ``aziza-admin config show`` prints the effective values.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = "/etc/aziza/aziza.toml"


class BridgeSettings(BaseModel):
    """aziza-bridge: call media and the HTTP side (health, metrics, browser WebSocket, control)."""

    # Address of this host as Asterisk should send RTP to it (externalMedia external_host).
    rtp_advertise_host: str = "127.0.0.1"
    rtp_bind_host: str = "127.0.0.1"
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    # Jitter buffer: playout delay target and hard bound.
    jitter_target_ms: int = Field(default=40, ge=0)
    jitter_max_ms: int = Field(default=200, ge=20)
    # Inbound codec Asterisk is asked to send (the return path is always ulaw).
    inbound_format: Literal["ulaw", "slin16"] = "ulaw"
    engine_url: str = "ws://127.0.0.1:8998/session"
    # More engines (one per GPU: aziza-engine@N listens on port 8998 + N). When set, calls go to the engine
    # with the most free slots among engine_urls; engine_url is then not used.
    engine_urls: list[str] = []

    def engines(self) -> list[str]:
        """The engine session URLs calls are placed on."""
        return list(self.engine_urls) or [self.engine_url]
    http_host: str = "127.0.0.1"
    http_port: int = 8089
    # Seconds of silence (no RTP) after which a call is considered dead media.
    media_timeout_s: float = Field(default=30.0, gt=0)


class AriSettings(BaseModel):
    """The Asterisk REST Interface this bridge controls."""

    url: str = "http://127.0.0.1:8088"
    username: str = "aziza"
    password: str = "aziza"
    app: str = "aziza"
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # How a call is refused when the house is full: busy -> SIP 486, congestion -> SIP 503.
    refuse_reason: Literal["busy", "congestion"] = "busy"
    moh_class: str = "default"
    # Played to the caller before a DTMF hang-up ("#"), e.g. "sound:vm-goodbye"; None hangs up at once.
    goodbye_sound: str | None = None


class CapacitySettings(BaseModel):
    """Redis capacity leases: one slot per live call."""

    slots: int = Field(default=10, ge=1)
    lease_ttl_s: float = Field(default=15.0, gt=0)
    renew_every_s: float = Field(default=5.0, gt=0)


class AsteriskSettings(BaseModel):
    """What `aziza-admin provision asterisk` renders into the Asterisk configuration."""

    # Where rendered files go by default (`--out` overrides).
    config_dir: Path = Path("/etc/asterisk")
    sip_bind_host: str = "0.0.0.0"
    sip_port: int = Field(default=5060, ge=1, le=65535)
    # Public address for SDP/Contact behind NAT (None: not behind NAT).
    external_address: str | None = None
    # SIP trunk peers (IP or host names) whose INVITEs reach the aziza-inbound context.
    trunk_hosts: list[str] = []
    codecs: list[str] = ["ulaw", "alaw", "g722"]
    # Asterisk's own RTP ports; must not overlap the bridge's rtp_port_min..rtp_port_max.
    rtp_port_min: int = Field(default=10000, ge=1024, le=65535)
    rtp_port_max: int = Field(default=19999, ge=1024, le=65535)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AZIZA_",
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("AZIZA_CONFIG", DEFAULT_CONFIG_PATH)
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=path),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests build ``Settings(...)`` directly instead."""
    return Settings()
