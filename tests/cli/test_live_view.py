"""`calls live`'s table and JSON, from live call hashes as the bridge writes them (admin_cli/live_view.py);
``now`` is given, so durations are exact."""

from __future__ import annotations

from admin_cli.live_view import (
    LIVE_HEADERS,
    format_duration,
    in_start_order,
    live_json,
    live_row,
)

NOW = 1_700_000_000.0
PHONE = {
    "call_id": "1700000000.42", "channel": "phone", "did": "+15550001234", "caller": "+15557654321",
    "persona": "anna", "language": "ru", "state": "active", "started_at": str(NOW - 125.9),
    "latency_ms": "41.6", "ttfb_ms": "212.4", "turns": "3",
}


def test_a_full_hash_renders_every_column() -> None:
    row = live_row(PHONE, NOW)
    assert dict(zip(LIVE_HEADERS, row, strict=True)) == {
        "ID": "1700000000.42", "CHANNEL": "phone", "DID": "+15550001234", "CALLER": "+15557654321",
        "PERSONA": "anna", "LANG": "ru", "DURATION": "02:05", "LATENCY": "42", "TTFB": "212",
    }


def test_missing_and_garbled_fields_render_as_dash() -> None:
    browser = {"call_id": "b1", "channel": "browser", "did": "", "persona": "anna", "latency_ms": "nan",
               "ttfb_ms": "soon", "started_at": "yesterday"}
    assert live_row(browser, NOW) == ["b1", "browser", "-", "-", "anna", "-", "-", "-", "-"]
    assert live_row({"call_id": "c0"}, NOW) == ["c0"] + ["-"] * (len(LIVE_HEADERS) - 1)


def test_duration_is_minutes_and_seconds_and_never_negative() -> None:
    assert format_duration(0) == "00:00"
    assert format_duration(59.99) == "00:59"
    assert format_duration(3725) == "62:05"  # minutes unbounded: no hour column for the rare long call
    assert format_duration(None) == "-"
    ahead = {"started_at": str(NOW + 3)}  # the bridge's clock a little ahead of this host's
    assert live_row(ahead, NOW)[6] == "00:00"


def test_json_keeps_the_raw_values_and_adds_duration() -> None:
    assert live_json(PHONE, NOW) == {**PHONE, "duration_s": 125.9}
    assert live_json({"call_id": "c0"}, NOW) == {"call_id": "c0", "duration_s": None}


def test_oldest_call_first_whatever_redis_order() -> None:
    calls = [{"call_id": "new", "started_at": str(NOW - 5)}, {"call_id": "unknown"},
             {"call_id": "old", "started_at": str(NOW - 500)}]
    assert [c["call_id"] for c in in_start_order(calls)] == ["old", "new", "unknown"]
