"""The bridge's ``aziza_capacity_*`` families: a full house and lost leases, counted by the real Redis
lease keeper and read by the controller's registry at scrape time."""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.ari.client import AriClient
from bridge.controller import CallController
from bridge.state.leases import CapacityLeases, LeaseKeeper
from bridge.state_adapters import RedisCapacity
from tests.ari.harness import bridge_settings
from tests.ari.standins import standin_deps


def _samples(text: bytes) -> dict[str, float]:
    """Unlabelled sample name -> value (the capacity families have no labels)."""
    return {s.name: s.value for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if not s.labels}


async def test_full_house_and_lost_leases_reach_metrics(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    settings = bridge_settings("http://127.0.0.1:9")  # never connected: only the registry is read
    ari = AriClient(settings.ari)
    try:
        keeper = LeaseKeeper(CapacityLeases(client, redis_prefix, slots=2, ttl_s=10))
        deps = standin_deps().deps()
        deps.capacity = RedisCapacity(keeper)
        controller = CallController(settings, ari, deps)

        assert await deps.capacity.acquire("a") is not None
        assert await deps.capacity.acquire("b") is not None
        assert await deps.capacity.acquire("c") is None  # full: refused
        before = _samples(generate_latest(controller.metrics.registry))
        assert before["aziza_capacity_slots"] == 2 and before["aziza_capacity_leases_held"] == 2
        assert before["aziza_capacity_refused_full_total"] == 1
        assert before["aziza_capacity_leases_lost_total"] == 0

        await client.delete(keeper.leases.key)  # Redis lost every lease (restarted empty)
        assert await keeper.renew_once() is not None
        after = _samples(generate_latest(controller.metrics.registry))
        assert after["aziza_capacity_leases_lost_total"] == 2
        assert after["aziza_capacity_leases_held"] == 2 and after["aziza_capacity_renew_failures_total"] == 0
    finally:
        await ari.close()
        await client.aclose()


async def test_gate_without_a_report_exposes_no_capacity_families() -> None:
    settings = bridge_settings("http://127.0.0.1:9")
    ari = AriClient(settings.ari)
    try:
        controller = CallController(settings, ari, standin_deps().deps())  # in-memory stand-in gate
        text = generate_latest(controller.metrics.registry).decode()
        assert "aziza_capacity_" not in text and "aziza_active_sessions" in text
    finally:
        await ari.close()
