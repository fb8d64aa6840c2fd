"""Configuration errors and warnings (issue 11): every error names the field, the value and the rule;
typos warn; an AZIZA_CONFIG naming a missing file is an error; secrets never show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from admin_cli.main import cli
from bridge.config import ConfigError, Settings, config_warnings
from bridge.state.health import check_health
from tests.state.fixtures import empty_config

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("s3cret-db", "r3dis-pw", "ar1-pw", "eng1ne-pw", "dsn-pw")


def show(tmp_path: Path, **env: str) -> Result:
    return CliRunner().invoke(cli, ["config", "show"], env={"AZIZA_CONFIG": empty_config(tmp_path), **env})


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"AZIZA_CAPACITY__SLOTS": "-1"},
         ["capacity.slots = -1", "AZIZA_CAPACITY__SLOTS", "greater than or equal to 1"]),
        ({"AZIZA_BRIDGE__HTTP_PORT": "99999"},
         ["bridge.http_port = 99999", "AZIZA_BRIDGE__HTTP_PORT", "less than or equal to 65535"]),
        ({"AZIZA_ENGINE__PORT": "99999"}, ["engine.port = 99999", "less than or equal to 65535"]),
        ({"AZIZA_BRIDGE__RTP_PORT_MIN": "29000", "AZIZA_BRIDGE__RTP_PORT_MAX": "28000"},
         ["rtp_port_min = 29000 is above rtp_port_max = 28000", "AZIZA_BRIDGE__RTP_PORT_MIN"]),
        ({"AZIZA_BRIDGE__RTP_PORT_MIN": "80"}, ["bridge.rtp_port_min = 80", "greater than or equal to 1024"]),
        ({"AZIZA_BRIDGE__RTP_PORT_MIN": "15000", "AZIZA_BRIDGE__RTP_PORT_MAX": "16000"},
         ["overlaps asterisk.rtp_port_min..max 10000-19999"]),
        ({"AZIZA_CAPACITY__RENEW_EVERY_S": "20"}, ["renew_every_s = 20.0 must be shorter than lease_ttl_s"]),
        ({"AZIZA_BRIDGE__ENGINE_URL": "http://127.0.0.1:8998/session"},
         ["bridge.engine_url = http://127.0.0.1:8998/session", "ws://, wss:// or unix://"]),
        ({"AZIZA_CAPACITY__SLOTS": "many"}, ["capacity.slots = many", "valid integer"]),
        ({"AZIZA_BRIDGE__MEDIA_TICK_MS": "3"}, ["bridge.media_tick_ms = 3", "divide 20 ms"]),
    ],
)
def test_a_bad_value_is_one_line_naming_field_value_source_and_rule(
    tmp_path: Path, env: dict[str, str], fragments: list[str]
) -> None:
    line = one_error_line(show(tmp_path, **env))
    assert line.startswith("Error: configuration: ")
    for fragment in fragments:
        assert fragment in line, line
    assert "validation error for Settings" not in line


def test_a_secret_in_a_bad_value_is_masked_in_the_error(tmp_path: Path) -> None:
    line = one_error_line(show(tmp_path, AZIZA_REDIS_URL="http://:r3dis-pw@127.0.0.1:6379/0"))
    assert "redis_url = http://:********@127.0.0.1:6379/0" in line and "r3dis-pw" not in line


def test_aziza_config_naming_a_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "typo.toml"
    result = CliRunner().invoke(cli, ["config", "show"], env={"AZIZA_CONFIG": str(missing)})
    line = one_error_line(result)
    assert f"AZIZA_CONFIG = {missing}: does not exist" in line


def test_settings_in_process_refuse_a_missing_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AZIZA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"nope\.toml: does not exist"):
        Settings()
    monkeypatch.delenv("AZIZA_CONFIG")
    Settings()  # the default path may be missing


def test_misspelt_variables_and_toml_keys_warn_with_a_guess(tmp_path: Path) -> None:
    config = tmp_path / "aziza.toml"
    config.write_text("redis_prefx = 'x'\n[capacity]\nslot = 3\n[brige]\nhttp_port = 1\n")
    env = {"AZIZA_CONFIG": str(config), "AZIZA_CAPACITY__SLOT": "3", "AZIZA_BRIDGE_HTTP_PORT": "9000",
           "AZIZA_TEST_PG_ADMIN_URL": "postgresql://x@127.0.0.1/x"}
    warnings = config_warnings(env)
    assert ("unknown variable AZIZA_CAPACITY__SLOT is ignored (did you mean AZIZA_CAPACITY__SLOTS?)"
            in warnings)
    assert any(w.startswith("unknown variable AZIZA_BRIDGE_HTTP_PORT") and "AZIZA_BRIDGE__HTTP_PORT" in w
               for w in warnings)
    assert f"{config}: unknown key [capacity] slot is ignored (did you mean slots?)" in warnings
    assert f"{config}: unknown key redis_prefx is ignored (did you mean redis_prefix?)" in warnings
    assert f"{config}: unknown key brige is ignored (did you mean bridge?)" in warnings
    assert not any("AZIZA_TEST_PG_ADMIN_URL" in w for w in warnings)  # the suite's own variable is known
    result = CliRunner().invoke(cli, ["config", "show"], env=env)
    assert result.exit_code == 0, result.output
    assert "warning: configuration: unknown variable AZIZA_CAPACITY__SLOT" in result.stderr
    assert json.loads(result.stdout)["capacity"]["slots"] == 10  # ignored, as the warning says


def test_config_show_masks_every_secret_including_inside_urls(tmp_path: Path) -> None:
    env = {
        "AZIZA_DATABASE_URL": "postgresql://aziza:s3cret-db@db.example:5432/aziza?sslmode=require",
        "AZIZA_REDIS_URL": "redis://:r3dis-pw@127.0.0.1:6379/0",
        "AZIZA_ARI__URL": "http://aziza:ar1-pw@127.0.0.1:8088",
        "AZIZA_ARI__PASSWORD": "ar1-pw",
        "AZIZA_BRIDGE__ENGINE_URL": "wss://bridge:eng1ne-pw@gpu.example/session",
    }
    result = show(tmp_path, **env)
    assert result.exit_code == 0, result.output
    for secret in SECRETS:
        assert secret not in result.output
    shown = json.loads(result.stdout)
    assert shown["database_url"] == "postgresql://aziza:********@db.example:5432/aziza?sslmode=require"
    assert shown["redis_url"] == "redis://:********@127.0.0.1:6379/0"
    assert shown["ari"]["url"] == "http://aziza:********@127.0.0.1:8088"
    assert shown["ari"]["password"] == "********"
    revealed = CliRunner().invoke(cli, ["config", "show", "--show-secrets"],
                                  env={"AZIZA_CONFIG": empty_config(tmp_path), **env})
    assert "s3cret-db" in revealed.stdout and "ar1-pw" in revealed.stdout
    dsn = Settings(database_url="host=/var/run/postgresql dbname=aziza password=dsn-pw")
    assert "dsn-pw" not in repr(dsn) and "dsn-pw" not in json.dumps(show_json(dsn))
    assert "ar1-pw" not in repr(Settings(ari={"password": "ar1-pw"}))  # type: ignore[arg-type]


def show_json(settings: Settings) -> object:
    from bridge.config import masked_dump

    return masked_dump(settings)


async def test_health_reports_mask_secrets_in_urls_and_errors() -> None:
    settings = Settings(
        database_url="postgresql://aziza:s3cret-db@127.0.0.1:1/aziza",
        redis_url="redis://:r3dis-pw@127.0.0.1:1/0",
        bridge={"engine_url": "ws://bridge:eng1ne-pw@127.0.0.1:1/session"},  # type: ignore[arg-type]
    )
    report = await check_health(settings, timeout_s=1.0)
    text = json.dumps(report)
    assert report["ok"] is False and report["engine"]["url"] == "http://bridge:********@127.0.0.1:1/health"
    for secret in SECRETS:
        assert secret not in text


def test_the_bridge_exits_2_with_the_problem_on_a_bad_config(tmp_path: Path) -> None:
    env = {"AZIZA_CONFIG": empty_config(tmp_path), "AZIZA_CAPACITY__SLOTS": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "from bridge.app import main; main()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "aziza-bridge: configuration: capacity.slots = 0 (from AZIZA_CAPACITY__SLOTS)" in proc.stderr
    assert "Traceback" not in proc.stderr
