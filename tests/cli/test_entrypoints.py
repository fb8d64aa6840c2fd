"""The three installed commands: ``--help`` prints usage and starts nothing, ``--version`` prints the
package version. Each runs as the real console script from the venv."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMANDS = ("aziza-bridge", "aziza-engine", "aziza-admin")


def _run(command: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command: str) -> None:
    result = _run(command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command} {metadata.version('aziza')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_starts_nothing(command: str, tmp_path: Path) -> None:
    # A port held here: a command that started its service on it would fail or hang instead of
    # printing usage; a config that cannot be read would make a started service exit 2.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        env = dict(os.environ, AZIZA_CONFIG=str(tmp_path / "missing.toml"), AZIZA_BRIDGE__HTTP_PORT=port,
                   AZIZA_ENGINE__PORT=port, AZIZA_ARI__URL="http://127.0.0.1:9")
        result = _run(command, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.lower().startswith("usage:"), result.stdout
    assert command in result.stdout
    assert "--version" in result.stdout
    assert "Traceback" not in result.stderr and "up:" not in result.stderr
