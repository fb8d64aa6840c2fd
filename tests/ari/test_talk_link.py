"""``aziza-admin talk-link`` and ``control-token``: a signed, expiring URL that opens a talk on the running
bridge, made only by whoever can read the control token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from click.testing import CliRunner, Result

from admin_cli.main import cli
from bridge.config import Settings
from bridge.state.models import Persona
from bridge.talk_token import BadTalkToken, talk_key, verify
from tests.ari.harness import control_token_file
from tests.ari.test_e2e_state import production_bridge
from tests.state.fixtures import empty_config, migrated_database_url, seeded_persona, state_settings

__all__ = ["migrated_database_url", "seeded_persona", "state_settings"]  # fixtures used below


def admin(tmp_path: Path, *args: str, **env: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"AZIZA_CONFIG": empty_config(tmp_path), **env})


def test_talk_link_prints_a_signed_expiring_url(tmp_path: Path) -> None:
    result = admin(tmp_path, "talk-link", "--persona", "support", "--ttl", "10m",
                   "--token-file", str(control_token_file()))
    assert result.exit_code == 0, result.output
    url = urlsplit(result.stdout.strip())
    assert (url.scheme, url.netloc, url.path) == ("http", "127.0.0.1:8089", "/talk")
    token = parse_qs(url.query)["token"][0]
    key = talk_key(control_token_file().read_text().strip())
    grant = verify(key, token)
    assert grant.persona == "support" and abs(grant.expires_at - (time.time() + 600)) < 60
    with pytest.raises(BadTalkToken) as expired:
        verify(key, token, now=lambda: time.time() + 601)
    assert expired.value.code == "expired"
    public = admin(tmp_path, "talk-link", "--persona", "support", "--token-file", str(control_token_file()),
                   AZIZA_BRIDGE__PUBLIC_URL="https://talk.example/")
    assert public.stdout.startswith("https://talk.example/talk?token=")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--persona", "support", "--ttl", "soon"], "bad duration"),
        (["--persona", "support", "--ttl", "2d"], "between 1 s and 24 h"),
        (["--persona", "bad name!"], "persona name"),
        (["--persona", "support", "--token-file", "/nonexistent/control.token"], "does not exist"),
    ],
)
def test_talk_link_errors_are_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    if "--token-file" not in args:
        args = [*args, "--token-file", str(control_token_file())]
    result = admin(tmp_path, "talk-link", *args)
    assert result.exit_code == 1 and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_control_token_create_check_and_rotate(tmp_path: Path) -> None:
    path = tmp_path / "control.token"
    assert admin(tmp_path, "control-token", "--token-file", str(path)).exit_code == 1  # none yet
    assert admin(tmp_path, "control-token", "--create", "--token-file", str(path)).exit_code == 0
    first = path.read_text().strip()
    assert len(first) >= 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert admin(tmp_path, "control-token", "--create", "--token-file", str(path)).exit_code == 0
    assert path.read_text().strip() == first  # --create never replaces
    checked = admin(tmp_path, "control-token", "--token-file", str(path))
    assert checked.exit_code == 0 and "readable" in checked.stdout
    assert admin(tmp_path, "control-token", "--rotate", "--token-file", str(path)).exit_code == 0
    assert path.read_text().strip() != first


async def test_the_printed_link_opens_a_talk_on_the_running_bridge(
    state_settings: Settings, seeded_persona: Persona, tmp_path: Path
) -> None:
    async with production_bridge(state_settings, slots=1) as (_, svc):
        result = await asyncio.to_thread(
            admin, tmp_path, "talk-link", "--persona", seeded_persona.name, "--ttl", "90s",
            "--token-file", str(control_token_file()), AZIZA_BRIDGE__PUBLIC_URL=svc.http_url,
        )
        assert result.exit_code == 0, result.output
        page = result.stdout.strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(page) as resp:
                assert resp.status == 200 and "/ws/talk?token=" in await resp.text()
            ws_url = page.replace("http://", "ws://").replace("/talk?", "/ws/talk?")
            async with http.ws_connect(ws_url, headers={"Origin": svc.http_url}) as ws:
                ready = json.loads((await ws.receive(timeout=10)).data)
                assert ready["type"] == "ready" and ready["persona"] == seeded_persona.name
