"""Live call state in Redis: one hash per call (``{prefix}:call:{id}``, TTL-refreshed while the call lives),
an index of live calls (``{prefix}:live``, a sorted set scored by expiry), and a pub/sub channel of call
events (``{prefix}:events``) that ``aziza-admin calls live`` follows. A bridge that dies leaves nothing
behind for longer than the TTL.

A call's hash (written by bridge.state_adapters.StateSink; every value a string, any may be missing):
``did``, ``caller``, ``persona``, ``language``, ``channel`` (phone | browser), ``state`` (setup | active |
held), ``started_at`` (epoch seconds) and, for phone calls every ~2 s, ``latency_ms`` (median round trip
inside the bridge over the last 2 s), ``ttfb_ms`` (the last caller turn's time to first agent audio) and
``turns``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis


@dataclass(frozen=True)
class CallEvent:
    call_id: str
    kind: str  # start, answer, dtmf, hold, transfer, end, refused, ...
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CallEvent:
        """Raises ValueError on anything that is not a call event."""
        obj = json.loads(raw)
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("call_id"), str)
            or not isinstance(obj.get("kind"), str)
        ):
            raise ValueError("not a call event")
        data = obj.get("data") or {}
        return cls(
            obj["call_id"], obj["kind"], data if isinstance(data, dict) else {}, float(obj.get("at", 0))
        )


class LiveCalls:
    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_s: float = 60.0) -> None:
        self._redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.channel = f"{prefix}:events"
        self._index = f"{prefix}:live"

    def _key(self, call_id: str) -> str:
        return f"{self.prefix}:call:{call_id}"

    async def update(self, call_id: str, fields: dict[str, str | int | float]) -> None:
        """Set fields of the call's hash and refresh its TTL (call this at least every ttl_s)."""
        await self.update_many({call_id: fields})

    async def update_many(self, calls: dict[str, dict[str, str | int | float]]) -> None:
        """``update`` for several calls in one round trip: at most one HSET per call."""
        if not calls:
            return
        expiry = time.time() + self.ttl_s
        async with self._redis.pipeline(transaction=True) as pipe:
            for call_id, fields in calls.items():
                if fields:
                    pipe.hset(self._key(call_id), mapping={k: str(v) for k, v in fields.items()})
                pipe.expire(self._key(call_id), max(1, int(self.ttl_s)))
            pipe.zadd(self._index, dict.fromkeys(calls, expiry))
            await pipe.execute()

    async def remove(self, call_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(call_id))
            pipe.zrem(self._index, call_id)
            await pipe.execute()

    async def publish(self, event: CallEvent) -> int:
        """Publish on the events channel; returns how many subscribers got it."""
        return int(await self._redis.publish(self.channel, event.to_json()))

    async def list_live(self) -> list[dict[str, str]]:
        await self._redis.zremrangebyscore(self._index, "-inf", time.time())
        ids = [
            i.decode() if isinstance(i, bytes) else str(i)
            for i in await self._redis.zrange(self._index, 0, -1)
        ]
        calls = []
        for call_id in ids:
            raw = await self._redis.hgetall(self._key(call_id))
            if raw:
                fields = {
                    (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in raw.items()
                }
                calls.append({"call_id": call_id, **fields})
        return calls

    async def events(self, stop: asyncio.Event | None = None) -> AsyncIterator[CallEvent]:
        """Follow the events channel until the caller stops iterating or ``stop`` is set (seen within a
        second: redis-py can turn a cancellation into a reconnect, so a flag is the sure way to stop);
        malformed messages are skipped."""
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self.channel)
        try:
            while stop is None or not stop.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    yield CallEvent.from_json(message["data"])
                except (ValueError, TypeError):
                    continue
        finally:
            await pubsub.unsubscribe(self.channel)
            await pubsub.aclose()
