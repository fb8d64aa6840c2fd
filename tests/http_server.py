"""Serve an aiohttp app on an ephemeral loopback port for the length of a test (real TCP, no mocks)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def serve_on_loopback(app: web.Application, *, shutdown_timeout: float = 1.0) -> AsyncIterator[int]:
    """Yields the port ``app`` listens on at 127.0.0.1; the server is cleaned up on every path."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
