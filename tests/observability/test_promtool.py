"""The provisioning files pass Prometheus' own checks: ``promtool check config``, ``check rules`` and the
rules' unit tests (``promtool test rules``, provisioning/prometheus/aziza-rules.test.yml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "provisioning" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)"
)


def _promtool(*args: str, cwd: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_check_config(tmp_path: Path) -> None:
    # promtool stats the bearer token file: point it at one that exists here, the rest as shipped.
    token = tmp_path / "control.token"
    token.write_text("x" * 40 + "\n")
    shipped = (PROM_DIR / "prometheus.yml").read_text()
    assert "credentials_file: /etc/aziza/control.token" in shipped
    (tmp_path / "prometheus.yml").write_text(shipped.replace("/etc/aziza/control.token", str(token)))
    shutil.copy(PROM_DIR / "aziza-rules.yml", tmp_path)
    _promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def test_check_rules() -> None:
    _promtool("check", "rules", "aziza-rules.yml", cwd=PROM_DIR)


def test_rules_unit_tests() -> None:
    _promtool("test", "rules", "aziza-rules.test.yml", cwd=PROM_DIR)
