"""`provision asterisk`: rendered config matches the DID table, is written atomically, and passes a real
Asterisk config parser (asterisklint, when installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.config import ConfigError, Settings
from bridge.state import asterisk_render
from bridge.state.models import InvalidInput
from tests.state.fixtures import empty_config

_LINT_CONFIG = """
import sys
from asterisklint import FileConfigParser
from asterisklint.defines import MessageDefManager
parser = FileConfigParser()
parser.include(sys.argv[1])
print(" ".join(c.name for c in parser))
sys.exit(1 if MessageDefManager.raised else 0)
"""


def _asterisklint() -> str:
    exe = shutil.which("asterisklint") or str(Path(sys.executable).parent / "asterisklint")
    if not Path(exe).exists():
        pytest.skip("asterisklint is not installed (pip install asterisklint)")
    return exe


@pytest.fixture
def env(migrated_fresh_database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "AZIZA_DATABASE_URL": migrated_fresh_database_url,
        "AZIZA_CONFIG": empty_config(tmp_path),
        "AZIZA_ASTERISK__TRUNK_HOSTS": '["203.0.113.5"]',
        "AZIZA_ARI__PASSWORD": "pa;ss",
    }


def invoke(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def routes(extensions_conf: str) -> list[str]:
    return re.findall(r"Stasis\(aziza,(\+\d+)\)", extensions_conf)


def test_rendered_config_follows_the_did_table(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "asterisk"
    invoke(env, "persona", "create", "support", "--language", "en")
    for number in ("+15550001234", "+442071234567", "+15550009999"):
        invoke(env, "did", "add", number, "--persona", "support")
    invoke(env, "did", "update", "+15550009999", "--disable")

    first = invoke(env, "provision", "asterisk", "--out", str(out))
    assert "extensions.conf: created" in first and "+exten => +15550001234,1" in first
    assert sorted(p.name for p in out.iterdir()) == sorted(asterisk_render.CONF_FILES)  # no temp files left
    extensions = (out / "extensions.conf").read_text()
    enabled = [d["number"] for d in json.loads(invoke(env, "did", "list", "--json")) if d["enabled"]]
    assert routes(extensions) == sorted(enabled) == ["+15550001234", "+442071234567"]
    ari = (out / "ari.conf").read_text()
    assert "[aziza]" in ari and "password=pa\\;ss" in ari  # ';' would start a comment unescaped
    http = (out / "http.conf").read_text()
    assert "bindaddr=127.0.0.1" in http and "bindport=8088" in http and "enabled=yes" in http
    assert "match=203.0.113.5" in (out / "pjsip.conf").read_text()

    assert invoke(env, "provision", "asterisk", "--out", str(out)).strip().endswith("unchanged")

    invoke(env, "did", "remove", "+442071234567")
    dry = invoke(env, "provision", "asterisk", "--out", str(out), "--dry-run")
    assert "extensions.conf: would be changed" in dry and "-exten => +442071234567,1" in dry
    assert routes((out / "extensions.conf").read_text()) == ["+15550001234", "+442071234567"]  # untouched
    changed = invoke(env, "provision", "asterisk", "--out", str(out))
    assert "extensions.conf: changed" in changed and "pjsip.conf: unchanged" in changed
    assert routes((out / "extensions.conf").read_text()) == ["+15550001234"]


def test_rendered_files_pass_asterisklint(env: dict[str, str], tmp_path: Path) -> None:
    lint = _asterisklint()
    out = tmp_path / "asterisk"
    invoke(env, "persona", "create", "support", "--language", "en")
    invoke(env, "did", "add", "+15550001234", "--persona", "support")
    invoke(env, "did", "add", "+998712345678", "--persona", "support")
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")

    dialplan = subprocess.run(
        [lint, "dialplan-check", "extensions.conf"], cwd=out, capture_output=True, text=True
    )
    assert dialplan.returncode == 0 and dialplan.stderr == "", dialplan.stderr
    for name in ("pjsip.conf", "ari.conf", "http.conf", "rtp.conf", "musiconhold.conf"):
        checked = subprocess.run(
            [str(Path(lint).parent / "python"), "-c", _LINT_CONFIG, name],
            cwd=out,
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0 and checked.stderr == "", f"{name}: {checked.stderr}"
    # ...and the linter does catch a broken file, so the checks above mean something.
    (out / "extensions.conf").write_text("[general]\n[globals]\n[aziza-inbound]\nexten => 1,1,Stasis(\n")
    broken = subprocess.run(
        [lint, "dialplan-check", "extensions.conf"], cwd=out, capture_output=True, text=True
    )
    assert broken.returncode != 0


def test_values_that_would_break_the_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="ARI password"):
        asterisk_render.render(Settings(ari={"password": "a\n[evil]"}), [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overlap"):  # refused as soon as the settings are read
        Settings(asterisk={"rtp_port_min": 20000, "rtp_port_max": 20100})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="ARI app name"):
        asterisk_render.render(Settings(ari={"app": "aziza,evil"}), [])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="templates not found"):
        asterisk_render.find_template_dir(tmp_path)


def test_unwritable_target_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(blocker / "sub")], env=env)
    assert result.exit_code == 1 and "cannot write Asterisk config" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
