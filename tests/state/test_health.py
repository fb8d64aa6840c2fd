"""check_health / `aziza-admin health` against real services and a real (small) HTTP engine stand-in."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.config import Settings
from bridge.state.health import check_health
from bridge.state.records import CallRecorder
from tests.state.fixtures import empty_config


async def test_health_reports_each_part(state_settings: Settings, unused_tcp_port: int) -> None:
    # The engine is probed where the bridge reaches it (bridge.engine_url), not at a fixed port (8998).
    engine_url = f"ws://127.0.0.1:{unused_tcp_port}/session"
    settings = state_settings.model_copy(
        update={"bridge": state_settings.bridge.model_copy(update={"engine_url": engine_url})}
    )
    down = await check_health(settings, timeout_s=1.0)
    assert down["database"]["up"] and down["database"]["pending"] == [] and down["redis"]["up"]
    assert down["capacity"] == {"slots": 10, "in_use": 0}
    assert down["engine"]["up"] is False and down["ok"] is False
    assert down["engine"]["url"] == f"http://127.0.0.1:{unused_tcp_port}/health"

    async def engine_health(_request: web.Request) -> web.Response:
        return web.json_response({"slots_free": 10})

    app = web.Application()
    app.router.add_get("/health", engine_health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    recorder = CallRecorder(settings.database_url)
    try:
        up = await check_health(settings, recorder=recorder, timeout_s=1.0)
        assert up["ok"] is True and up["engine"]["detail"] == {"slots_free": 10}
        assert up["engine"]["engine_url"] == engine_url  # the configured engine is probed, not a fixed port
        assert up["records"]["queue_depth"] == 0
    finally:
        await runner.cleanup()

    dead = settings.model_copy(
        update={"database_url": "postgresql://x@127.0.0.1:1/x", "redis_url": "redis://127.0.0.1:1"}
    )
    report = await check_health(dead, timeout_s=1.0)
    assert report["database"]["up"] is False and report["redis"]["up"] is False and report["ok"] is False
    assert report["database"]["error"] and report["capacity"]["in_use"] is None


def test_health_cli_exit_status(tmp_path: Path) -> None:
    env = {
        "AZIZA_CONFIG": empty_config(tmp_path),
        "AZIZA_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "AZIZA_BRIDGE__ENGINE_URL": "ws://127.0.0.1:1/session",
    }
    result = CliRunner().invoke(cli, ["health", "--json"], env=env)
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False
