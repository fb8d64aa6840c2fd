"""A real Prometheus (Debian's ``prometheus``) scrapes a running engine process and a running bridge (the
production wiring: real PostgreSQL, Redis, CallMedia; a fake Asterisk places the call), loads the shipped
alert rules, and answers queries for their metrics over its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.app import BridgeService
from bridge.config import Settings
from bridge.wiring import production_deps
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import bridge_settings, control_token_file, eventually
from tests.state.fixtures import migrated_database_url, state_settings

__all__ = ["migrated_database_url", "state_settings"]  # fixtures used below

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
HANG_GUARD_S = 30.0  # every wait below: only a hang reaches it

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed (Debian package `prometheus`; .ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _engine_process(slots: int) -> Iterator[int]:
    """``python -m engine.server`` (echo backend) on a free loopback port, up when it accepts connections."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.server", "--host", "127.0.0.1", "--port", str(port),
         "--backend", "echo", "--slots", str(slots)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            assert proc.poll() is None, f"aziza-engine exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "aziza-engine did not listen"
                time.sleep(0.1)
        yield port
    finally:
        _stop(proc)


@contextlib.contextmanager
def _prometheus(folder: Path, bridge: str, engine: str) -> Iterator[str]:
    """Prometheus on a free loopback port with temporary storage, scraping ``bridge`` and ``engine`` every
    second (the shipped rules loaded beside them)."""
    assert PROMETHEUS is not None
    shutil.copy(ROOT / "provisioning" / "prometheus" / "aziza-rules.yml", folder)
    (folder / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [aziza-rules.yml]
scrape_configs:
  - job_name: aziza-bridge
    authorization: {{type: Bearer, credentials_file: {control_token_file()}}}
    static_configs: [{{targets: ["{bridge}"]}}]
  - job_name: aziza-engine
    static_configs: [{{targets: ["{engine}"]}}]
""")
    port = _free_port()
    with (folder / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1d"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        print((folder / "prometheus.log").read_text(errors="replace")[-4000:])  # shown when a test fails
        raise
    finally:
        _stop(proc)


async def _until(what: str, probe: Callable[[], Awaitable[Any]]) -> Any:
    """Poll ``probe`` until it returns something truthy; only a hang hits the guard."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            value = await probe()
            if value:
                return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


class _Prom:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params,
                                 timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def values(self, query: str) -> dict[str, float]:
        """``job`` -> value of each series of an instant query."""
        data = await self.api("query", query=query)
        return {r["metric"].get("job", ""): float(r["value"][1]) for r in data["result"]}

    async def targets_up(self) -> bool:
        active = (await self.api("targets"))["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active)


@contextlib.asynccontextmanager
async def _bridge(state: Settings, engine_url: str) -> AsyncIterator[tuple[FakeAsterisk, BridgeService]]:
    from bridge.media.assets import load_speech_8k

    async with FakeAsterisk(speech_8k=load_speech_8k()) as fake:
        settings = bridge_settings(
            fake.url, database_url=state.database_url, redis_url=state.redis_url,
            redis_prefix=state.redis_prefix,
            bridge={"engine_url": engine_url, "rtp_port_min": 32000, "rtp_port_max": 32999},
            capacity={"slots": 3, "lease_ttl_s": 5.0, "renew_every_s": 1.0},
        )
        async with production_deps(settings) as wired, BridgeService(
            settings, wired.deps, health_probe=wired.health_probe, extra_routes=wired.routes
        ) as svc:
            await asyncio.wait_for(fake.ws_connected.wait(), HANG_GUARD_S)
            yield fake, svc


async def test_prometheus_scrapes_engine_and_bridge(state_settings: Settings, tmp_path: Path) -> None:
    with _engine_process(slots=2) as engine_port:
        engine_url = f"ws://127.0.0.1:{engine_port}/session"
        async with _bridge(state_settings, engine_url) as (fake, svc), aiohttp.ClientSession() as http:
            bridge_target = svc.http_url.removeprefix("http://")
            with _prometheus(tmp_path, bridge_target, f"127.0.0.1:{engine_port}") as prom_url:
                prom = _Prom(http, prom_url)
                await _until("both targets up", prom.targets_up)
                rules = await prom.api("rules")
                loaded = {r["name"] for g in rules["groups"] for r in g["rules"]}
                assert {"AzizaTtfbP95High", "AzizaCapacityFull", "AzizaEngineDown"} <= loaded

                assert await prom.values("aziza_engine_slots_total") == {"aziza-engine": 2.0}
                assert await prom.values("aziza_capacity_slots") == {"aziza-bridge": 3.0}
                # The media registry is per process: count from what it shows before this test's call.
                before = await _until("aziza_active_sessions scraped",
                                      lambda: prom.values("aziza_active_sessions"))
                base = before["aziza-bridge"]

                caller = await fake.originate_call("+15550001234")
                await eventually(lambda: caller in svc.controller.calls
                                 and svc.controller.get(caller).state.value == "active",
                                 within_s=HANG_GUARD_S, what="the call active")

                async def one_more() -> bool:
                    sessions = await prom.values("aziza_active_sessions")
                    busy = await prom.values("aziza_engine_slots_busy")
                    held = await prom.values("aziza_capacity_leases_held")
                    return (sessions == {"aziza-bridge": base + 1} and busy == {"aziza-engine": 1.0}
                            and held == {"aziza-bridge": 1.0})

                await _until("the call in Prometheus", one_more)
                await fake.hangup_caller(caller)
                await eventually(lambda: caller not in svc.controller.calls, within_s=HANG_GUARD_S,
                                 what="the call torn down")

                async def back_to_base() -> bool:
                    return await prom.values("aziza_active_sessions") == {"aziza-bridge": base}

                await _until("the call gone from Prometheus", back_to_base)
