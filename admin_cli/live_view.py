"""The session monitor of ``aziza-admin calls live``: live call hashes (bridge.state.live) as table rows
or JSON. Pure: ``now`` is given, so the durations can be tested."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LIVE_HEADERS = ["ID", "CHANNEL", "DID", "CALLER", "PERSONA", "LANG", "DURATION", "LATENCY", "TTFB"]
MISSING = "-"


def _number(raw: str | None) -> float | None:
    """A hash value as a finite number; None for a missing or garbled one (hashes outlive bridge versions)."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def duration_s(call: Mapping[str, str], now: float) -> float | None:
    """Seconds since the call's ``started_at`` (epoch); never negative, as clocks of two hosts may differ."""
    started = _number(call.get("started_at"))
    return None if started is None else max(0.0, now - started)


def format_duration(seconds: float | None) -> str:
    """mm:ss, minutes unbounded (75:03): a call is rarely an hour, and the column stays narrow."""
    if seconds is None:
        return MISSING
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def format_ms(raw: str | None) -> str:
    value = _number(raw)
    return MISSING if value is None else str(round(value))


def live_row(call: Mapping[str, str], now: float) -> list[str]:
    """One table row (LIVE_HEADERS); whatever the hash lacks is "-"."""

    def text(key: str) -> str:
        return call.get(key) or MISSING

    return [
        text("call_id"), text("channel"), text("did"), text("caller"), text("persona"), text("language"),
        format_duration(duration_s(call, now)), format_ms(call.get("latency_ms")),
        format_ms(call.get("ttfb_ms")),
    ]


def live_json(call: Mapping[str, str], now: float) -> dict[str, Any]:
    """The hash's raw values plus ``duration_s`` (null when the start is unknown)."""
    seconds = duration_s(call, now)
    return {**call, "duration_s": None if seconds is None else round(seconds, 1)}


def in_start_order(calls: list[dict[str, str]]) -> list[dict[str, str]]:
    """Oldest call first: Redis lists them by TTL expiry, which every periodic write reshuffles."""
    return sorted(calls, key=lambda c: (_number(c.get("started_at")) or math.inf, c.get("call_id", "")))
