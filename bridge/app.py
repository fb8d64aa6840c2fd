"""aziza-bridge: the Stasis app ``aziza`` — ARI event stream, call controller, HTTP control server.

``BridgeService`` wires one ``AriClient``, one ``EventStream`` (reconnecting, reconciling on every
connect), one ``CallController`` and the aiohttp HTTP server (health, metrics, call control, the
browser WebSocket routes). It is an async context manager so tests run the whole bridge in-process;
``main()`` runs it until SIGTERM/SIGINT, then ends every live call cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import web

from bridge import native
from bridge.ari.client import AriClient, EventStream
from bridge.call_deps import CallDeps
from bridge.config import ConfigError, Settings, get_settings
from bridge.control_api import HealthProbe, control_routes, guard_middleware
from bridge.controller import CallController
from bridge.http_guard import BROWSER_PATHS, TokenSource, allowed_hosts
from bridge.redact import mask_url
from bridge.startup import freeze_startup_heap, media_scheduling
from bridge.version import package_version

log = logging.getLogger("aziza.bridge")


class BridgeService:
    def __init__(
        self,
        settings: Settings,
        deps: CallDeps,
        *,
        health_probe: HealthProbe | None = None,
        extra_routes: Iterable[web.RouteDef] = (),
        heartbeat_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.ari = AriClient(settings.ari)
        self.controller = CallController(settings, self.ari, deps)
        self.stream = EventStream(
            self.ari, self.controller.handle_event, on_connected=self._on_connected, heartbeat_s=heartbeat_s
        )
        self._health_probe = health_probe
        self.control_tokens = TokenSource(settings.bridge.control_token_file)
        self._extra_routes = list(extra_routes)
        self._runner: web.AppRunner | None = None
        self._main: asyncio.Task[None] | None = None
        self.http_url = ""
        self.reconciles = 0

    async def _on_connected(self) -> None:
        await self.controller.reconcile()
        self.reconciles += 1

    async def start(self) -> None:
        b = self.settings.bridge
        hosts = allowed_hosts(b.http_host, b.public_url, b.allowed_hosts)
        _, token_problem = self.control_tokens.current()
        if token_problem is not None:
            log.error("control API disabled until the token file is readable: %s", token_problem)
        app = web.Application(middlewares=[guard_middleware(hosts, self.control_tokens, BROWSER_PATHS)])
        app.add_routes(
            control_routes(
                self.controller,
                ari_connected=lambda: self.stream.is_connected,
                health_probe=self._health_probe,
            )
        )
        app.add_routes(self._extra_routes)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.bridge.http_host, self.settings.bridge.http_port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            await self.ari.close()
            raise
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.http_url = f"http://{self.settings.bridge.http_host}:{port}"
        self._main = asyncio.create_task(self._run(), name="bridge-main")
        await self.controller.wait_running()
        log.info("aziza-bridge up: HTTP %s, ARI %s app %s", self.http_url, mask_url(self.settings.ari.url),
                 self.settings.ari.app)
        compiled, stale = native.compiled_modules(), native.stale_modules()
        log.info("media path: %d of %d hot modules compiled (bridge/native.py)", len(compiled),
                 len(native.NATIVE_MODULES))
        if stale:
            log.warning("compiled media modules older than their sources, running old code: %s (rebuild: "
                        "provisioning/install.sh)", ", ".join(stale))

    async def _run(self) -> None:
        # One group: the controller (owning every call) and the event stream.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.controller.run(), name="controller")
            await self.controller.wait_running()
            tg.create_task(self.stream.run(), name="ari-events")

    async def stop(self) -> None:
        """End every live call (each tears itself down), then stop the event stream and HTTP."""
        await self.controller.end_all("shutdown")
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._runner is not None:
            await self._runner.cleanup()
        await self.ari.close()

    async def __aenter__(self) -> BridgeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(settings: Settings) -> None:
    """Run the production bridge until SIGTERM/SIGINT."""
    from bridge.wiring import production_deps

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with production_deps(settings) as wired, BridgeService(
        settings, wired.deps, health_probe=wired.health_probe, extra_routes=wired.routes
    ):
        freeze_startup_heap()  # started (pools, ARI, servers): collections must not walk all that mid-call
        if not settings.bridge.media_workers:  # (this process carries the calls' media; else its workers do)
            log.info("media scheduling: %s", media_scheduling(settings.bridge.media_realtime_priority))
        await stop.wait()
        log.info("aziza-bridge stopping")


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, deps: CallDeps, **kwargs: Any) -> AsyncIterator[BridgeService]:
    async with BridgeService(settings, deps, **kwargs) as service:
        yield service


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aziza-bridge",
        description="The ARI Stasis app of the Aziza appliance: answers calls that Asterisk's dialplan sends "
        "to Stasis(<ari.app>), bridges them to an engine over RTP, and serves the control API. All settings "
        "come from $AZIZA_CONFIG (default /etc/aziza/aziza.toml) and AZIZA_* variables; see "
        "docs/configuration.md. Stops cleanly on SIGTERM/SIGINT.",
    )
    parser.add_argument("--version", action="version", version=f"aziza-bridge {package_version()}")
    return parser


def main(argv: list[str] | None = None) -> None:
    # Arguments first: --help and --version print and exit before anything starts.
    _parser().parse_args(argv)
    # Logging first, so configuration warnings (unknown AZIZA_* variables) are formatted like the rest.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"aziza-bridge: configuration: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger().setLevel(settings.log_level.upper())
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
