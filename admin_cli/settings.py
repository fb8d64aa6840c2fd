"""The settings as aziza-admin commands read them: a configuration error becomes one clear line (exit 1);
warnings (unknown AZIZA_* variables, unknown TOML keys) go to stderr, once per command."""

from __future__ import annotations

import click

from bridge.config import ConfigError, Settings, config_warnings

_META_KEY = "aziza.settings"


def load_cli_settings() -> Settings:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _META_KEY in ctx.meta:
        cached: Settings = ctx.meta[_META_KEY]
        return cached
    try:
        settings = Settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    except Exception as exc:  # TOML syntax errors and the like: the config file is wrong
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise click.ClickException(f"configuration: {first}") from None
    for warning in config_warnings():
        click.echo(f"warning: configuration: {warning}", err=True)
    if ctx is not None:
        ctx.meta[_META_KEY] = settings
    return settings
