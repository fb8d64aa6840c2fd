"""Test harness: a fake Asterisk and an in-process bridge wired to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from bridge.app import BridgeService
from bridge.call_deps import CallDeps
from bridge.config import AriSettings, BridgeSettings, CapacitySettings, Settings
from tests.ari.fake_asterisk import FakeAsterisk


def bridge_settings(ari_url: str, **overrides: Any) -> Settings:
    return Settings(
        ari=AriSettings(url=ari_url, reconnect_min_s=0.05, reconnect_max_s=0.2, **overrides.pop("ari", {})),
        bridge=BridgeSettings(http_port=0, **overrides.pop("bridge", {})),
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
