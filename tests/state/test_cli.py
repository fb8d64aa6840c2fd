"""aziza-admin state commands against a real, freshly migrated PostgreSQL database per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from admin_cli.main import cli
from bridge.media.audio_file import inspect_audio
from tests.state.fixtures import empty_config, write_wav


@pytest.fixture
def admin(migrated_fresh_database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {
        "AZIZA_DATABASE_URL": migrated_fresh_database_url,
        "AZIZA_CONFIG": empty_config(tmp_path),
        "AZIZA_DATA_DIR": str(tmp_path / "data"),
    }

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    return run


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.stderr + result.stdout
    return result.stdout


def fails(result: Result, *fragments: str) -> str:
    assert result.exit_code != 0, result.stdout
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err  # one clear line, no traceback
    for fragment in fragments:
        assert fragment in err
    return err


def test_persona_and_did_round_trip(admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    voice = write_wav(tmp_path / "voice.wav")
    ok(
        admin(
            "persona",
            "create",
            "support",
            "--language",
            "en",
            "--text-prompt",
            "Be kind.",
            "--voice-prompt",
            str(voice),
        )
    )
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Ты вежливый продавец.\nГовори кратко.", encoding="utf-8")
    ok(admin("persona", "create", "sales", "--language", "ru", "--text-prompt-file", str(prompt_file)))
    personas = json.loads(ok(admin("persona", "list", "--json")))
    by_name = {p["name"]: p for p in personas}
    assert by_name["support"]["is_default"] and not by_name["sales"]["is_default"]
    stored = Path(by_name["support"]["voice_prompt_path"])
    assert stored.parent == tmp_path / "data" / "voices"
    kept = inspect_audio(stored)  # stored as the engine reads it: 16-bit mono WAV at 24 kHz, same length
    assert (kept.format, kept.subtype, kept.channels, kept.sample_rate) == ("WAV", "PCM_16", 1, 24000)
    assert kept.seconds == pytest.approx(inspect_audio(voice).seconds, abs=0.01)

    ok(admin("did", "add", "+1 (555) 000-1234", "--persona", "support"))
    ok(
        admin(
            "did",
            "add",
            "+15550001235",
            "--persona",
            "sales",
            "--transfer-target",
            "sip:op@pbx.example",
            "--dtmf",
            "0=transfer",
            "--dtmf",
            "*=hold",
        )
    )
    dids = json.loads(ok(admin("did", "list", "--json")))
    assert [(d["number"], d["persona"]) for d in dids] == [
        ("+15550001234", "support"),
        ("+15550001235", "sales"),
    ]
    assert dids[0]["dtmf_actions"] == {"0": "transfer", "#": "hangup"}
    assert dids[1]["dtmf_actions"] == {"0": "transfer", "*": "hold"}

    ok(admin("did", "update", "+15550001234", "--persona", "sales", "--disable"))
    shown = json.loads(ok(admin("did", "show", "+15550001234", "--json")))
    assert shown["persona"] == "sales" and shown["enabled"] is False

    ok(admin("persona", "set-default", "sales"))
    ok(admin("persona", "update", "support", "--language", "uz", "--no-voice-prompt"))
    support = json.loads(ok(admin("persona", "show", "support", "--json")))
    assert support["language"] == "uz" and support["voice_prompt_path"] is None and not support["is_default"]
    assert not stored.exists()  # the voice prompt nobody uses any more is removed
    ok(admin("persona", "delete", "support"))  # no DID uses it any more
    ok(admin("did", "remove", "+15550001235"))
    assert [d["number"] for d in json.loads(ok(admin("did", "list", "--json")))] == ["+15550001234"]
    sales = json.loads(ok(admin("persona", "show", "sales", "--json")))
    assert sales["text_prompt"] == "Ты вежливый продавец.\nГовори кратко."
    assert "NUMBER" in ok(admin("did", "list")) and "sales *" in ok(admin("persona", "list"))


def test_bad_input_gets_one_clear_line(admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok(admin("persona", "create", "support", "--language", "en"))
    fails(admin("persona", "create", "support", "--language", "en"), "already exists")
    fails(admin("persona", "create", "x y", "--language", "en"), "persona name")
    fails(admin("persona", "create", "other", "--language", "fr"), "language 'fr'")
    fails(
        admin("persona", "create", "other", "--language", "en", "--voice-prompt", str(tmp_path / "no.wav")),
        "no such file",
    )
    cases = {
        "narrow": (dict(rate=8000), "8000 Hz"),
        "short": (dict(seconds=0.5), "0.50 s"),
        "long": (dict(seconds=31, rate=16000), "31.00 s"),
    }
    for name, (shape, fragment) in cases.items():
        wav = write_wav(tmp_path / f"{name}.wav", **shape)  # type: ignore[arg-type]
        fails(admin("persona", "create", name, "--language", "en", "--voice-prompt", str(wav)), fragment)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" + bytes(range(256)))
    fails(
        admin("persona", "create", "g", "--language", "en", "--voice-prompt", str(garbage)),
        "not a readable audio file",
    )
    # Nothing half-created by the failures above.
    assert [p["name"] for p in json.loads(ok(admin("persona", "list", "--json")))] == ["support"]

    for number in ("5550001234", "+0123", "+1555000123456789", "+1555abc", ""):
        fails(admin("did", "add", number, "--persona", "support"), "E.164")
    fails(admin("did", "add", "+15550001234", "--persona", "ghost"), "persona 'ghost' does not exist")
    fails(
        admin("did", "add", "+15550001234", "--persona", "support", "--transfer-target", "bad target!"),
        "transfer target",
    )
    fails(admin("did", "add", "+15550001234", "--persona", "support", "--dtmf", "0=explode"), "DTMF action")
    ok(admin("did", "add", "+15550001234", "--persona", "support"))
    ok(admin("did", "add", "+15550009999", "--persona", "support"))
    fails(admin("did", "add", "+15550001234", "--persona", "support"), "already exists")
    fails(admin("persona", "delete", "support"), "+15550001234", "+15550009999")
    fails(admin("did", "remove", "+15550000000"), "does not exist")
    fails(admin("did", "update", "+15550001234"), "nothing to update")
    fails(admin("persona", "show", "ghost"), "does not exist")
    fails(admin("calls", "show", "no-such-call"), "does not exist")


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = {"AZIZA_CONFIG": empty_config(tmp_path)}
    result = CliRunner().invoke(
        cli, ["did", "list", "--database-url", "postgresql://nobody@127.0.0.1:1/none"], env=env
    )
    fails(result, "cannot connect to the database")


def test_unmigrated_database_says_to_migrate(fresh_database_url: str, tmp_path: Path) -> None:
    env = {"AZIZA_CONFIG": empty_config(tmp_path), "AZIZA_DATABASE_URL": fresh_database_url}
    fails(CliRunner().invoke(cli, ["persona", "list"], env=env), "aziza-admin db migrate")
    status = json.loads(ok(CliRunner().invoke(cli, ["db", "status", "--json"], env=env)))
    assert status["version"] == 0 and [p["version"] for p in status["pending"]] == [1, 2]
    migrated = ok(CliRunner().invoke(cli, ["db", "migrate"], env=env))
    assert "applied 0001_initial" in migrated and "applied 0002_engine_session" in migrated
    assert "up to date" in ok(CliRunner().invoke(cli, ["db", "migrate"], env=env))


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "aziza.toml"
    bad.write_text("[capacity]\nslots = 0\n")
    fails(CliRunner().invoke(cli, ["config", "show"], env={"AZIZA_CONFIG": str(bad)}), "configuration")
    good = tmp_path / "good.toml"
    good.write_text("[capacity]\nslots = 4\n[ari]\npassword = 's3cret'\n")
    shown = json.loads(ok(CliRunner().invoke(cli, ["config", "show"], env={"AZIZA_CONFIG": str(good)})))
    assert shown["capacity"]["slots"] == 4 and shown["ari"]["password"] == "********"
