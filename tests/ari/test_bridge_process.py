"""``aziza-bridge`` as a real process: configured from AZIZA_* env, it connects to (fake) Asterisk, carries
a call through the real engine, PostgreSQL and Redis, and on SIGTERM ends the call cleanly and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from admin_cli.procs import child_pids
from bridge.config import Settings
from bridge.state import repo
from engine.config import EngineSettings
from engine.server import run_engine
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import control_headers, control_token_file, eventually
from tests.state.fixtures import migrated_database_url, state_settings

__all__ = ["migrated_database_url", "state_settings"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("media_workers", [0, 2], ids=["media-in-process", "media-workers"])
async def test_bridge_process_serves_a_call_and_stops_cleanly_on_sigterm(
    state_settings: Settings, tmp_path: Path, media_workers: int
) -> None:
    http_port = _free_port()
    config = tmp_path / "aziza.toml"
    config.write_text("# empty: everything from the environment\n")
    async with FakeAsterisk() as fake, run_engine(EngineSettings(port=0, num_slots=2)) as engine_url:
        env = dict(os.environ)
        env.update({
            "AZIZA_CONFIG": str(config),
            "AZIZA_BRIDGE__CONTROL_TOKEN_FILE": str(control_token_file()),
            "AZIZA_DATABASE_URL": state_settings.database_url,
            "AZIZA_REDIS_URL": state_settings.redis_url,
            "AZIZA_REDIS_PREFIX": state_settings.redis_prefix,
            "AZIZA_ARI__URL": fake.url,
            "AZIZA_BRIDGE__HTTP_PORT": str(http_port),
            "AZIZA_BRIDGE__ENGINE_URL": engine_url,
            "AZIZA_BRIDGE__RTP_PORT_MIN": "32000",
            "AZIZA_BRIDGE__RTP_PORT_MAX": "32999",
            "AZIZA_BRIDGE__MEDIA_WORKERS": str(media_workers),
        })
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from bridge.app import main; main()", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await asyncio.wait_for(fake.ws_connected.wait(), 20)
            caller = await fake.originate_call("+15550001234")
            await eventually(lambda: fake.channel(caller).answered and fake.leg_for(caller) is not None,
                             within_s=10, what="answered and bridged")
            leg = fake.leg_for(caller)
            assert leg is not None
            await eventually(lambda: leg.packets_received >= 25, within_s=10, what="the engine's audio back")
            scraped = ""

            async def scrape() -> None:
                nonlocal scraped
                async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{http_port}/metrics", headers=control_headers()
                ) as r:
                    scraped = await r.text()

            for _ in range(100):  # a worker's numbers come with its next report (every second)
                await scrape()
                if "aziza_media_calls_active 1.0" in scraped:
                    break
                await asyncio.sleep(0.1)
            assert "aziza_media_calls_active 1.0" in scraped, scraped  # from whichever process runs it
            calls: list[dict[str, object]] = []
            for _ in range(100):  # the call's round trip comes with its worker's next report too
                async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{http_port}/calls", headers=control_headers()
                ) as r:
                    calls = (await r.json())["calls"]
                if calls and "latency_ms" in calls[0]:
                    break
                await asyncio.sleep(0.1)
            assert [c["call_id"] for c in calls] == [caller]
            latency = calls[0].get("latency_ms")  # the live round trip, as the operator's list shows it
            assert isinstance(latency, float) and 0.0 < latency < 1000.0, calls
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{http_port}/talk") as r:
                assert r.status == 200  # the browser channel is mounted on the same server
            workers = child_pids(proc.pid)
            assert len(workers) == media_workers
            for pid in workers:  # as systemd stops the unit: SIGTERM to every process of its group
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(1.0)  # a worker that died of it would have ended the call by now
            assert fake.channel(caller).hangup_reason is None, "the media died before the bridge's shutdown"
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, output.decode()[-2000:]
            assert fake.channel(caller).hangup_reason == "normal"
            with repo.connect(state_settings.database_url) as conn:
                row = conn.execute("SELECT end_cause FROM calls WHERE id = %s", (caller,)).fetchone()
            # Ended by the bridge's shutdown, not by its media dying under it.
            assert row is not None and "media" not in str(row["end_cause"]), row
            assert not fake.bridges
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
