"""`provision asterisk`: rendered config matches the DID table, is written atomically, passes a real
Asterisk config parser (asterisklint, when installed), refuses transfer targets the dialplan cannot reach,
leaves the operator's include files alone, and reloads Asterisk through ARI (against the fake Asterisk
here; tests/asterisk/ does it against a real one)."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.config import ConfigError, Settings
from bridge.state import asterisk_render
from bridge.state.models import InvalidInput
from tests.ari.fake_asterisk import FakeAsterisk
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
    # no temp files left; the operator's include files created
    assert sorted(p.name for p in out.iterdir()) == sorted([*asterisk_render.CONF_FILES,
                                                           *asterisk_render.LOCAL_FILES])
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


def test_trunk_ranges_hosts_and_the_test_phone(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 13: a trunk given as a range was rendered as an invalid contact=; now it is matched only."""
    out = tmp_path / "asterisk"
    env = env | {"AZIZA_ASTERISK__TRUNK_HOSTS": '["198.51.100.0/24", "sip.example.net", "192.0.2.7"]',
                 "AZIZA_ASTERISK__TEST_PHONE_USERNAME": "desk1",
                 "AZIZA_ASTERISK__TEST_PHONE_PASSWORD": "s3;cret"}
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")
    pjsip = (out / "pjsip.conf").read_text()
    sections = _sections(pjsip)
    assert sections["trunk1-identify"] == {"type": "identify", "endpoint": "trunk1",
                                           "match": "198.51.100.0/24"}
    assert "aors" not in sections["trunk1"] and "trunk1-aor" not in sections
    assert "contact=sip:198.51.100" not in pjsip
    assert sections["trunk2-aor"]["contact"] == "sip:sip.example.net"
    assert sections["trunk3-identify"]["match"] == "192.0.2.7"
    assert sections["desk1-auth"] == {"type": "auth", "auth_type": "userpass", "username": "desk1",
                                      "password": "s3\\;cret"}
    assert pjsip.count("[desk1]") == 2 and "max_contacts=1" in pjsip  # endpoint + aor of the same name
    assert pjsip.rstrip().endswith("#include pjsip_local.conf")
    bad = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(tmp_path / "x")],
                             env=env | {"AZIZA_ASTERISK__TRUNK_HOSTS": '["198.51.100.0/33"]'})
    assert bad.exit_code == 1 and bad.stderr.strip().splitlines() == [
        "Error: asterisk.trunk_hosts: '198.51.100.0/33' is not an address range (CIDR)"]
    assert not (tmp_path / "x").exists()


def test_without_trunks_a_warning_says_what_to_set(env: dict[str, str], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(tmp_path / "a"), "--quiet"],
                                env=env | {"AZIZA_ASTERISK__TRUNK_HOSTS": "[]"})
    assert result.exit_code == 0
    assert "no SIP endpoint rendered: set asterisk.trunk_hosts" in result.stderr


def _sections(text: str) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            name = line.strip("[]")
            current = {}
            found[name if name not in found else name + "#2"] = current
        elif "=" in line and not line.startswith((";", "#")):
            key, _, value = line.partition("=")
            current[key] = value
    return found


def test_transfer_targets_must_exist_in_the_dialplan(env: dict[str, str], tmp_path: Path) -> None:
    """The README's own example ("operators,100") used to drop callers: no such context was rendered."""
    out = tmp_path / "asterisk"
    invoke(env, "persona", "create", "support", "--language", "en")
    invoke(env, "did", "add", "+15550001234", "--persona", "support", "--transfer-target", "operators,100")
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(out)], env=env)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: DID +15550001234: transfer target 'operators,100': no context [operators] in the dialplan; "
        "define it in extensions_local.conf ([operators] exten => 100,1,Dial(PJSIP/...)) or change the "
        "target (aziza-admin did update --transfer-target)"]
    assert not out.exists()  # nothing written
    out.mkdir()
    local = out / "extensions_local.conf"
    local.write_text("[operators]\nexten => 200,1,Dial(PJSIP/desk)\n")
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(out)], env=env)
    assert result.exit_code == 1 and "context [operators] has no extension 100" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["extensions_local.conf"]
    # a pattern in an included context reaches it
    local.write_text("[operators]\ninclude => desks\n[desks]\nexten => _1XX,1,Dial(PJSIP/desk${EXTEN})\n")
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")
    assert local.read_text().startswith("[operators]")  # the operator's file is never rewritten
    assert (out / "extensions.conf").read_text().rstrip().endswith("#include extensions_local.conf")
    invoke(env, "did", "update", "+15550001234", "--transfer-target", "sip:desk@pbx.example")
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")  # a SIP URI is dialled as given


def test_files_are_0640_and_group_readable_by_asterisk(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: root-only files were unreadable by an Asterisk running as user asterisk. Here the group
    stands in for `asterisk` (a machine without it gets a warning instead)."""
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    monkeypatch.setattr(asterisk_render, "ASTERISK_GROUP", group.gr_name)
    out = tmp_path / "asterisk"
    out.mkdir()
    (out / "ari.conf").write_text("old\n")
    os.chmod(out / "ari.conf", 0o600)
    (out / "rtp.conf").write_bytes(b"")  # replaced below; unchanged files are fixed too:
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")
    os.chmod(out / "rtp.conf", 0o600)
    invoke(env, "provision", "asterisk", "--out", str(out), "--quiet")
    for path in out.iterdir():
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid, path.name
    monkeypatch.setattr(asterisk_render, "ASTERISK_GROUP", "no-such-group-here")
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(out), "--quiet"], env=env)
    (out / "rtp.conf").write_text("changed by hand\n")
    result = CliRunner().invoke(cli, ["provision", "asterisk", "--out", str(out), "--quiet"], env=env)
    assert result.exit_code == 0 and "no group 'no-such-group-here' here" in result.stderr


async def test_reload_through_ari_says_what_changed(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "asterisk"
    async with FakeAsterisk() as fake:
        env = env | {"AZIZA_ARI__URL": fake.url, "AZIZA_ARI__PASSWORD": "aziza"}
        fake.endpoints = [{"technology": "PJSIP", "resource": "trunk1", "state": "online", "channel_ids": []}]
        first = await asyncio.to_thread(invoke, env, "provision", "asterisk", "--out", str(out), "--reload",
                                        "--quiet")
        assert f"Asterisk 22.10.1 at {fake.url}" in first
        assert "reloaded pbx_config.so (extensions.conf changed, re-reading extensions_local.conf)" in first
        assert "reloaded res_pjsip.so (pjsip.conf changed, re-reading pjsip_local.conf)" in first
        assert "http.conf changed: restart Asterisk to apply it" in first
        assert fake.reloaded[-1] == "res_ari.so"  # last: it may change this session's credentials
        assert sorted(fake.reloaded) == sorted(["res_pjsip.so", "pbx_config.so", "res_ari.so",
                                                "res_rtp_asterisk.so", "res_musiconhold.so"])
        fake.reloaded.clear()
        again = await asyncio.to_thread(invoke, env, "provision", "asterisk", "--out", str(out), "--reload")
        assert "unchanged" in again and sorted(fake.reloaded) == ["pbx_config.so", "res_pjsip.so"]
        # Asterisk refuses a module: its answer, one line
        fake.fail("PUT", "/asterisk/modules/{moduleName}", 409)
        refused = await asyncio.to_thread(
            CliRunner().invoke, cli, ["provision", "asterisk", "--out", str(out), "--reload"], env=env)
        assert refused.exit_code == 1 and _errors(refused.stderr) == 1
        assert "Asterisk did not reload res_pjsip.so" in refused.stderr
        assert "injected 409 (HTTP 409)" in refused.stderr
        # pjsip.conf reloaded but its endpoint is not there: Asterisk did not take the file
        fake.endpoints = []
        missing = await asyncio.to_thread(
            CliRunner().invoke, cli, ["provision", "asterisk", "--out", str(out), "--reload"], env=env)
        assert missing.exit_code == 1
        assert "Asterisk did not take the PJSIP configuration: endpoint(s) trunk1 missing" in missing.stderr
        # an endpoint of the operator's own pjsip_local.conf counts too
        fake.endpoints = [{"technology": "PJSIP", "resource": "trunk1", "state": "online", "channel_ids": []}]
        (out / "pjsip_local.conf").write_text("[operator]\ntype = endpoint\n")
        local = await asyncio.to_thread(
            CliRunner().invoke, cli, ["provision", "asterisk", "--out", str(out), "--reload"], env=env)
        assert local.exit_code == 1 and "endpoint(s) operator missing" in local.stderr
        # a file Asterisk's parser would reject: refused before anything is reloaded
        fake.reloaded.clear()
        (out / "pjsip_local.conf").write_text("[operator\ntype=endpoint\n")
        broken = await asyncio.to_thread(
            CliRunner().invoke, cli, ["provision", "asterisk", "--out", str(out), "--reload"], env=env)
        assert broken.exit_code == 1 and not fake.reloaded
        assert "Error: pjsip_local.conf line 1: no closing ']': Asterisk would reject" in broken.stderr
    # Asterisk not running: one line, the files are written all the same
    down = await asyncio.to_thread(
        CliRunner().invoke, cli, ["provision", "asterisk", "--out", str(tmp_path / "b"), "--reload"],
        env=env | {"AZIZA_ARI__URL": f"http://127.0.0.1:{_closed_port()}"})
    assert down.exit_code == 1 and _errors(down.stderr) == 1
    assert "Error: Asterisk is not running (ARI at http://127.0.0.1:" in down.stderr
    assert "the files are written" in down.stderr and (tmp_path / "b" / "pjsip.conf").is_file()


def _errors(stderr: str) -> int:
    """Error lines (warnings, e.g. a machine without group asterisk, are lines of their own)."""
    return sum(1 for line in stderr.splitlines() if not line.startswith("warning: "))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
