"""aziza-admin: the operator's command line.

The command tree is declared here and each command lives in its own module, imported only when that
command runs (so `aziza-admin did list` never imports torch).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from bridge.version import package_version


class LazyGroup(click.Group):
    """A click group whose subcommands are "module:attribute" strings, imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={
        # media path (issue: call media)
        "demo": "admin_cli.media_cmds:demo",
        # load test with a JSON + HTML report (issue 14)
        "loadtest": "admin_cli.loadtest:loadtest",
        # state and provisioning (issue: appliance state)
        "persona": "admin_cli.state_cmds:persona",
        "did": "admin_cli.state_cmds:did",
        "db": "admin_cli.state_cmds:db",
        "health": "admin_cli.state_cmds:health",
        "provision": "admin_cli.state_cmds:provision",
        "config": "admin_cli.state_cmds:config",
        # the running bridge (issue 11: authenticated control, browser links)
        "talk-link": "admin_cli.call_control:talk_link",
        "control-token": "admin_cli.call_control:control_token",
        # engine models (issue: batched engine)
        "model": "admin_cli.engine_cmds:model",
        "engine": "admin_cli.engine_cmds:engine",
        # fine-tuning for Russian/Uzbek personas (issue 15)
        "train": "admin_cli.train_cmds:train",
    },
)
@click.version_option(package_version(), "--version", prog_name="aziza-admin", message="%(prog)s %(version)s")
def cli() -> None:
    """Aziza appliance administration."""


@cli.group(
    cls=LazyGroup,
    lazy={
        "list": "admin_cli.state_cmds:calls_list",
        "show": "admin_cli.state_cmds:calls_show",
        "live": "admin_cli.state_cmds:calls_live",
        "hold": "admin_cli.call_control:calls_hold",
        "unhold": "admin_cli.call_control:calls_unhold",
        "transfer": "admin_cli.call_control:calls_transfer",
        "hangup": "admin_cli.call_control:calls_hangup",
    },
)
def calls() -> None:
    """Call records and live calls."""


@cli.group(
    cls=LazyGroup,
    lazy={
        "media": "admin_cli.media_cmds:bench_media",
        "engine": "admin_cli.engine_cmds:bench_engine",
    },
)
def bench() -> None:
    """Benchmarks that print numbers (not tests)."""


if __name__ == "__main__":
    cli()
