"""Test harness: a fake Asterisk and an in-process bridge wired to it."""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bridge.app import BridgeService
from bridge.call_deps import CallDeps
from bridge.config import AriSettings, BridgeSettings, CapacitySettings, Settings
from tests.ari.fake_asterisk import FakeAsterisk


@lru_cache(maxsize=1)
def control_token_file() -> Path:
    """A control token file for this test process (0640, as the installer makes it)."""
    folder = Path(tempfile.mkdtemp(prefix="aziza-token-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "control.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def control_headers(**extra: str) -> dict[str, str]:
    """What aziza-admin sends: the bearer token and a JSON content type."""
    token = control_token_file().read_text().strip()
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **extra}


def bridge_settings(ari_url: str, **overrides: Any) -> Settings:
    bridge = {"http_port": 0, "control_token_file": control_token_file(), **overrides.pop("bridge", {})}
    return Settings(
        ari=AriSettings(url=ari_url, reconnect_min_s=0.05, reconnect_max_s=0.2, **overrides.pop("ari", {})),
        bridge=BridgeSettings(**bridge),
        capacity=CapacitySettings(**overrides.pop("capacity", {})),
        **overrides,
    )


async def eventually(predicate: Callable[[], Any], within_s: float = 5.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (behaviour, not timing: the bound only catches a hang)."""
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def fake_and_bridge(
    deps: CallDeps, *, speech_8k: np.ndarray | None = None, settings_overrides: dict[str, Any] | None = None,
    **service_kwargs: Any,
) -> AsyncIterator[tuple[FakeAsterisk, BridgeService]]:
    async with FakeAsterisk(speech_8k=speech_8k) as fake:
        settings = bridge_settings(fake.url, **(settings_overrides or {}))
        async with BridgeService(settings, deps, **service_kwargs) as service:
            await asyncio.wait_for(fake.ws_connected.wait(), 5)
            await eventually(lambda: service.reconciles >= 1, what="first reconcile")
            yield fake, service
