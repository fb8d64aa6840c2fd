"""The operator's path from the README against a real Asterisk: what `provision asterisk` rendered is what
Asterisk runs (the session fixture provisioned it the README's way), a registered test phone, a new DID
applied with `--reload`, and a file Asterisk would reject refused before anything is reloaded."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from tests.asterisk import media, sipp
from tests.asterisk.appliance import PHONE_PASSWORD, PHONE_USER, Appliance, free_udp_pair
from tests.asterisk.conftest import ECHO_FOUND, LEAD_S, Caller, Voices, new_caller

pytestmark = pytest.mark.asterisk

DID_NEW = "+15550003000"


def test_rendered_files_and_health(app: Appliance) -> None:
    etc = app.asterisk.etc
    for name in ("pjsip.conf", "extensions.conf", "ari.conf", "http.conf", "rtp.conf", "musiconhold.conf"):
        assert stat.S_IMODE((etc / name).stat().st_mode) == 0o640, name
    assert (etc / "pjsip.conf").read_text().rstrip().endswith("#include pjsip_local.conf")
    assert "[operators]" in (etc / "extensions_local.conf").read_text()  # the operator's file, untouched
    # The trunk range became an identify match; Asterisk runs exactly that.
    assert "Match: 127.0.0.1/32" in app.asterisk.cli("pjsip show endpoint trunk1")
    assert "Stasis(aziza,+15550001234)" in app.asterisk.cli("dialplan show aziza-inbound")
    health = app.admin("health")
    assert health.returncode == 0, health.stdout + health.stderr


async def test_the_test_phone_registers_with_its_password(app: Appliance, tmp_path: Path) -> None:
    sip_port, media_port = free_udp_pair("127.0.0.2")
    # From 127.0.0.2: not the trunk's address, so Asterisk identifies the phone by its username.
    phone = sipp.Sipp(tmp_path, "phone", sipp.register(PHONE_USER, PHONE_PASSWORD), sip_port=sip_port,
                      media_port=media_port, target=f"127.0.0.1:{app.ports['sip']}", local_ip="127.0.0.2")
    result = await phone.run()
    assert result.returncode == 0, result.describe()
    assert result.received_statuses() == [401, 200]  # challenged, then accepted
    contacts = await asyncio.to_thread(app.asterisk.cli, f"pjsip show aor {PHONE_USER}")
    assert f"sip:{PHONE_USER}@127.0.0.2:{sip_port}" in contacts
    wrong = sipp.Sipp(tmp_path, "wrong", sipp.register(PHONE_USER, "not-the-password"), sip_port=sip_port + 2,
                      media_port=media_port + 4, target=f"127.0.0.1:{app.ports['sip']}", local_ip="127.0.0.2",
                      timeout_s=15)
    refused = await wrong.run()
    assert refused.returncode != 0 and 200 not in refused.received_statuses()


async def test_a_new_did_is_live_after_provision_reload(
    app: Appliance, voices: Voices, callers: list[Caller], tmp_path: Path
) -> None:
    app.admin("did", "add", DID_NEW, "--persona", app.persona)
    try:
        out = (await asyncio.to_thread(app.admin, "provision", "asterisk", "--reload", "--quiet")).stdout
        assert "extensions.conf: changed" in out and "pjsip.conf: unchanged" in out
        assert "reloaded pbx_config.so (extensions.conf changed, re-reading extensions_local.conf)" in out
        assert f"Stasis(aziza,{DID_NEW})" in app.asterisk.cli("dialplan show aziza-inbound")
        timeline = media.Timeline()
        timeline.add_silence(LEAD_S)
        timeline.add_audio(voices.caller)
        timeline.add_silence(0.8)
        caller = new_caller(callers, app, tmp_path, DID_NEW, timeline, hangup_after_s=timeline.duration_s)
        await caller.start()
        result = await caller.finish()
        assert result.returncode == 0, result.describe()
        assert media.echo_check(voices.caller, caller.received().pcm()).found >= ECHO_FOUND
        assert (await asyncio.to_thread(caller.record))["persona"] == app.persona
    finally:
        app.admin("did", "remove", DID_NEW)
        await asyncio.to_thread(app.admin, "provision", "asterisk", "--reload", "--quiet")
    assert f"Stasis(aziza,{DID_NEW})" not in app.asterisk.cli("dialplan show aziza-inbound")


def test_a_file_asterisk_would_reject_is_refused_before_any_reload(app: Appliance) -> None:
    local = app.asterisk.etc / "pjsip_local.conf"
    good = local.read_text()
    local.write_text(good + "\n[desk2\ntype=endpoint\n")
    try:
        done = app.admin("provision", "asterisk", "--reload", check=False)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("Error: pjsip_local.conf line ")
        assert "no closing ']': Asterisk would reject or skip it" in done.stderr
        assert "reloaded" not in done.stdout
    finally:
        local.write_text(good)
    # Asterisk not running: one line, and the files are left whole.
    app.asterisk.stop()
    try:
        down = app.admin("provision", "asterisk", "--reload", check=False)
        assert down.returncode == 1
        assert "Error: Asterisk is not running (ARI at http://127.0.0.1:" in down.stderr
    finally:
        app.asterisk.start()
