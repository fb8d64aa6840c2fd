"""Sans-IO parts: event parsing, backoff, transfer targets, typed errors."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.ari.errors import (
    AriConflict,
    AriNotFound,
    AriServerError,
    AriUnprocessable,
    error_for_status,
)
from bridge.ari.models import (
    AriEventError,
    ChannelDestroyed,
    ChannelDtmfReceived,
    StasisStart,
    UnknownEvent,
    parse_event,
)
from bridge.backoff import Backoff
from bridge.call import parse_transfer_target


def channel(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "1700000000.1", "protocol_id": "x", "name": "PJSIP/trunk-00000001", "state": "Ring",
        "caller": {"name": "", "number": "+15550009999"}, "connected": {"name": "", "number": ""},
        "accountcode": "", "creationtime": "2026-01-01T00:00:00.000+0000", "language": "en",
        "dialplan": {"context": "from-trunk", "exten": "+15550001234", "priority": 1, "app_name": "Stasis",
                     "app_data": "aziza,+15550001234"},
    }
    base.update(overrides)
    return base


def test_stasis_start_parses() -> None:
    ev = parse_event({"type": "StasisStart", "application": "aziza", "timestamp": "t", "args": ["+1555"],
                      "channel": channel()})
    assert isinstance(ev, StasisStart)
    assert ev.args == ("+1555",) and ev.channel.caller.number == "+15550009999"
    assert not ev.channel.is_unicast_rtp


def test_unicast_rtp_channel_vars() -> None:
    ev = parse_event({"type": "StasisStart", "application": "aziza", "timestamp": "t", "args": [],
                      "channel": channel(name="UnicastRTP/127.0.0.1:5000-0x1",
                                         channelvars={"UNICASTRTP_LOCAL_PORT": 4000})})
    assert isinstance(ev, StasisStart) and ev.channel.is_unicast_rtp
    assert ev.channel.channelvars == {"UNICASTRTP_LOCAL_PORT": "4000"}


def test_dtmf_and_destroyed() -> None:
    ev = parse_event({"type": "ChannelDtmfReceived", "application": "a", "timestamp": "t", "digit": "#",
                      "duration_ms": 100, "channel": channel()})
    assert isinstance(ev, ChannelDtmfReceived) and ev.digit == "#"
    ev2 = parse_event({"type": "ChannelDestroyed", "application": "a", "timestamp": "t", "cause": 16,
                       "cause_txt": "Normal Clearing", "channel": channel()})
    assert isinstance(ev2, ChannelDestroyed) and ev2.cause == 16


def test_unknown_event_is_tolerated() -> None:
    ev = parse_event({"type": "RecordingFinished", "application": "a", "timestamp": "t", "recording": {}})
    assert isinstance(ev, UnknownEvent) and ev.raw["type"] == "RecordingFinished"


@pytest.mark.parametrize("bad", [
    [], "x", {"no": "type"}, {"type": 5},
    {"type": "StasisStart", "args": ["a"], "channel": None},
    {"type": "StasisStart", "args": "a", "channel": channel()},
    {"type": "ChannelDtmfReceived", "digit": 5, "duration_ms": 1, "channel": channel()},
    {"type": "ChannelDtmfReceived", "digit": "1", "duration_ms": True, "channel": channel()},
    {"type": "StasisEnd", "channel": channel(caller="nope")},
    {"type": "StasisEnd", "channel": channel(channelvars=[1])},
])
def test_malformed_events_raise_clear_errors(bad: Any) -> None:
    with pytest.raises(AriEventError):
        parse_event(bad)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                     children, max_size=4)))
def test_parse_event_never_raises_anything_but_event_error(data: Any) -> None:
    try:
        parse_event(data)
    except AriEventError:
        pass


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [min(4.0, 0.5 * 2**i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    b.reset()
    assert b.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_error_classes_by_status() -> None:
    assert isinstance(error_for_status(404, "GET", "/x", "m"), AriNotFound)
    assert isinstance(error_for_status(409, "GET", "/x", "m"), AriConflict)
    assert isinstance(error_for_status(422, "GET", "/x", "m"), AriUnprocessable)
    err = error_for_status(503, "GET", "/x", "m")
    assert isinstance(err, AriServerError) and err.status == 503 and "503" in str(err)


@pytest.mark.parametrize(("target", "kind", "expect"), [
    ("100", "dialplan", (None, "100", "Local/100@from-trunk/n")),
    ("100@operators", "dialplan", ("operators", "100", "Local/100@operators/n")),
    ("s@ivr:1", "dialplan", ("ivr", "s", "Local/s@ivr/n")),
    ("operators,100", "dialplan", ("operators", "100", "Local/100@operators/n")),
    ("ivr,s,1", "dialplan", ("ivr", "s", "Local/s@ivr/n")),
    ("sip:desk@pbx.example", "endpoint", "PJSIP/trunk1/sip:desk@pbx.example"),
    ("PJSIP/operator", "endpoint", "PJSIP/operator"),
])
def test_transfer_targets(target: str, kind: str, expect: Any) -> None:
    t = parse_transfer_target(target, "PJSIP/trunk1-00000002")
    assert t.kind == kind
    if kind == "dialplan":
        assert (t.context, t.extension, t.dial_string("from-trunk")) == expect
    else:
        assert t.endpoint == expect == t.dial_string("from-trunk")


@pytest.mark.parametrize("bad", ["", "a b", "@ctx", "100@", "100@ctx:x", "PJSIP/", "/x", "a,,1", "a,b,c",
                                 "a,b,1,2", "ivr,s,2", "s@ivr:3", "a@b@c"])
def test_bad_transfer_targets(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_transfer_target(bad, "PJSIP/trunk1-00000002")
