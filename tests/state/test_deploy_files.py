"""systemd units (systemd-analyze verify) and the Debian install script (bash -n, shellcheck)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.config import BridgeSettings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("aziza.target", "aziza-engine.service", "aziza-bridge.service", "aziza-engine@.service")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify insists that ExecStart binaries exist: check copies pointing at one that does, keeping
    # everything else (directives, dependencies, hardening) as written.
    exe = shutil.which("true") or "/bin/true"
    checked = []
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        assert name.endswith(".target") or "/opt/aziza/venv/bin/" in text
        name = name.replace("@.", "@0.")  # a template is verified as one of its instances
        checked.append(name)
        (tmp_path / name).write_text(
            text.replace("/opt/aziza/venv/bin/aziza-admin", exe)
            .replace("/opt/aziza/venv/bin/aziza-engine", exe)
            .replace("/opt/aziza/venv/bin/aziza-bridge", exe)
        )
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in checked)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys or bad values only print warnings with exit status 0: any output about our files fails.
    ours = [line for line in result.stderr.splitlines() if any(n in line for n in checked)]
    assert result.returncode == 0 and ours == [], result.stderr


def test_engine_template_pins_one_gpu_per_instance() -> None:
    from engine.config import EngineSettings

    service = _unit("aziza-engine@.service")["Service"]
    assert service["Environment"] == "CUDA_VISIBLE_DEVICES=%i"
    assert service["ExecStart"].endswith("aziza-engine --instance %i")
    two = EngineSettings(instance=2).for_instance("2")
    assert (two.port, two.device) == (9000, "cuda:0")  # only its own GPU is visible to it
    assert EngineSettings(instance=3).for_instance(None).device == "cuda:3"
    assert EngineSettings(instance=1, device="cpu").for_instance("1").device == "cpu"


def test_units_run_as_aziza_with_hardening_and_dependencies() -> None:
    for name in ("aziza-engine.service", "aziza-engine@.service", "aziza-bridge.service"):
        unit = _unit(name)
        service = unit["Service"]
        assert service["User"] == "aziza" and service["EnvironmentFile"] == "-/etc/aziza/aziza.env"
        assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
        assert service["ReadWritePaths"] == "/var/lib/aziza" and service["Restart"] in (
            "always",
            "on-failure",
        )
        assert unit["Install"]["WantedBy"] == "aziza.target"
    assert "PrivateDevices" not in _unit("aziza-engine.service")["Service"]  # the GPU must stay reachable
    bridge = _unit("aziza-bridge.service")["Unit"]
    assert "redis-server.service" in bridge["Requires"]
    # The media loop's SCHED_RR (bridge.media_realtime_priority) is allowed to the unprivileged user.
    bridge_service = _unit("aziza-bridge.service")["Service"]
    assert bridge_service["RestrictRealtime"] == "no"
    assert int(bridge_service["LimitRTPRIO"]) >= BridgeSettings().media_realtime_priority > 0
    assert "postgresql.service" in bridge["After"] and "redis-server.service" in bridge["After"]


def test_install_scripts_parse_and_pass_shellcheck() -> None:
    scripts = [ROOT / "provisioning" / "system_install.sh", ROOT / "provisioning" / "install.sh"]
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(scripts[0])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
