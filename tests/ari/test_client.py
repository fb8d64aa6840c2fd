"""The ARI client against the fake Asterisk over real HTTP: typed errors, auth, unreachable server."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from bridge.app import BridgeService
from bridge.ari.client import AriClient
from bridge.ari.errors import AriNotFound, AriUnauthorized, AriUnavailable, AriUnprocessable
from bridge.config import AriSettings
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import bridge_settings, control_headers, control_token_file, eventually
from tests.ari.standins import standin_deps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_typed_errors_and_auth() -> None:
    async with FakeAsterisk() as fake:
        async with AriClient(AriSettings(url=fake.url)) as client:
            with pytest.raises(AriNotFound, match="404"):
                await client.answer("nope")
            caller = await fake.originate_call("+15550001234")
            await client.create_bridge("aziza-bridge-1")
            media = await client.external_media(channel_id="aziza-media-1", app="aziza",
                                                external_host="127.0.0.1:9")
            assert media.channelvars["UNICASTRTP_LOCAL_PORT"].isdigit()
            with pytest.raises(AriUnprocessable):  # before the media leg's own StasisStart
                await client.add_channel("aziza-bridge-1", [caller, media.id])
            with pytest.raises(ValueError):
                await client.hangup(caller, reason="because")
            with pytest.raises(ValueError):
                await client._call("answer", {"channelId": caller}, bogus=1)
        async with AriClient(AriSettings(url=fake.url, password="wrong")) as client:
            with pytest.raises(AriUnauthorized):
                await client.list_channels()


async def test_unreachable_asterisk_is_ari_unavailable() -> None:
    async with AriClient(AriSettings(url=f"http://127.0.0.1:{_free_port()}")) as client:
        with pytest.raises(AriUnavailable, match="unreachable"):
            await client.list_channels()


async def test_bridge_without_asterisk_reports_unhealthy_then_connects() -> None:
    port = _free_port()
    settings = bridge_settings(f"http://127.0.0.1:{port}")
    async with BridgeService(settings, standin_deps().deps()) as svc:
        await eventually(lambda: svc.stream.backoff.attempts >= 2, what="retrying")
        async with aiohttp.ClientSession() as http, http.get(
                f"{svc.http_url}/health", headers=control_headers()
            ) as resp:
            assert resp.status == 503 and (await resp.json())["ari_connected"] is False
        fake = FakeAsterisk()
        await fake.start(port=port)
        try:
            await eventually(lambda: svc.stream.is_connected, what="connected once Asterisk is up")
            async with aiohttp.ClientSession() as http, http.get(
                f"{svc.http_url}/health", headers=control_headers()
            ) as resp:
                assert resp.status == 200
        finally:
            await fake.stop()


def test_cli_says_bridge_is_down_in_one_line() -> None:
    from click.testing import CliRunner

    from admin_cli.main import cli

    url = f"http://127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(cli, ["calls", "transfer", "c1", "100@ops", "--bridge-url", url,
                                      "--token-file", str(control_token_file())])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: aziza-bridge is not reachable at {url}: "
                                                  "[Errno 111] Connection refused"]
