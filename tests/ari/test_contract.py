"""The contract: every REST call the client can make, and every event field the controller reads, exists
in Asterisk 22.10.1's own swagger files; and the fake Asterisk speaks exactly those models."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from bridge.ari import models
from bridge.ari.client import HANGUP_REASONS, OPERATIONS, AriClient
from bridge.ari.models import KNOWN_EVENTS, Bridge, CallerId, Channel, DialplanCep
from bridge.call_deps import CallRoute
from bridge.config import AriSettings
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import eventually, fake_and_bridge
from tests.ari.standins import standin_deps
from tests.ari.swagger import load_swagger

SWAGGER = load_swagger()
BASE_FIELDS = {f.name for f in dataclasses.fields(models.AriEvent)}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_client_operation_exists_in_swagger(name: str) -> None:
    op = OPERATIONS[name]
    spec = SWAGGER.operations.get((op.method, op.path))
    assert spec is not None, f"{op.method} {op.path} is not an ARI operation"
    for param in op.query:
        assert param in spec.params, f"{name}: {param} is not a parameter of {op.method} {op.path}"
        assert spec.params[param].param_type == "query"
    path_params = {p.name for p in spec.params.values() if p.param_type == "path"}
    assert path_params == set(typing.cast(str, op.path).replace("}", "{").split("{")[1::2])
    required = {p.name for p in spec.params.values() if p.required and p.param_type == "query"}
    assert required <= set(op.query), f"{name}: never sends required {required - set(op.query)}"


def test_hangup_reasons_are_allowed_values() -> None:
    allowed = SWAGGER.operations[("DELETE", "/channels/{channelId}")].params["reason"].allowed
    assert allowed is not None and set(HANGUP_REASONS) <= set(allowed)


_PY_TYPES = {"string": str, "Date": str, "int": int, "long": int, "boolean": bool, "object": dict}


@pytest.mark.parametrize("cls", [Channel, Bridge, CallerId, DialplanCep])
def test_resource_fields_read_exist_in_models(cls: type) -> None:
    props = SWAGGER.models[cls.SWAGGER_MODEL]["properties"]  # type: ignore[attr-defined]
    for field in dataclasses.fields(cls):
        assert field.name in props, f"{cls.__name__}.{field.name} not in swagger model"


def test_dial_fields_read_exist() -> None:
    props = SWAGGER.event_required("Dial")
    for field in dataclasses.fields(models.Dial):
        assert field.name in props, f"Dial.{field.name} is not in events.json"
    assert props["peer"]["type"] == "Channel"


def test_playback_fields_read_exist() -> None:
    props = SWAGGER.event_required("PlaybackFinished")
    for field in dataclasses.fields(models.PlaybackFinished):
        assert field.name in props
    assert props["playback"]["type"] == "Playback"
    playback = SWAGGER.models["Playback"]["properties"]
    for field in dataclasses.fields(models.Playback):
        assert field.name in playback


@pytest.mark.parametrize("name", sorted(KNOWN_EVENTS))
def test_event_fields_read_exist_in_events_json(name: str) -> None:
    props = SWAGGER.event_required(name)
    for field in dataclasses.fields(KNOWN_EVENTS[name]):
        assert field.name in props, f"{name}.{field.name} is not in events.json"
    assert "channel" in props and props["channel"]["type"] == "Channel"


async def test_fake_payloads_and_every_client_request_match_swagger() -> None:
    """Drive every operation (through a real call flow and directly), then check each request the fake
    received and each event/response it produced against the swagger files."""
    route = CallRoute(did="+15550001234", transfer_target="100@operators")
    goodbye = {"ari": {"goodbye_sound": "sound:vm-goodbye"}}
    sd = standin_deps(slots=2, routes={route.did: route})
    async with fake_and_bridge(sd.deps(), settings_overrides=goodbye) as (fake, svc):
        a = await fake.originate_call(route.did)
        b = await fake.originate_call("+15550009876")
        await eventually(lambda: len(sd.sink.answered_calls) == 2, what="2 calls up")
        refused = await fake.originate_call(route.did)
        await eventually(lambda: sd.sink.refused_calls, what="refused")
        await svc.controller.get(a).hold()
        await svc.controller.get(a).unhold()
        await fake.send_dtmf(a, "0")  # dialplan target: checked, then dialled (originate)
        await svc.controller.get(b).transfer("sip:desk@pbx.example")  # dialled through b's endpoint
        await eventually(lambda: len(sd.sink.ended_calls) == 2, what="both transferred")
        c = await fake.originate_call(route.did)
        await eventually(lambda: c in sd.sink.answered_calls, what="third call")
        await fake.send_dtmf(c, "#")  # goodbye playback, then hang-up
        await eventually(lambda: c in sd.sink.ended_calls, what="third ended")
        async with AriClient(AriSettings(url=fake.url)) as client:
            await client.subscribe("aziza", f"channel:{refused}")
            assert await client.get_channel(a) is not None
            assert (await client.asterisk_info())["system"]["version"] == "22.10.1"
            await client.reload_module("pbx_config.so")
            assert await client.list_endpoints("PJSIP") == []
        exercised = {(r.method, r.route) for r in fake.requests} | {("GET", "/events")}
        used = {(op.method, op.path) for op in OPERATIONS.values()}
        assert used <= exercised, f"operations never exercised: {used - exercised}"
        problems: list[str] = []
        for req in fake.requests:
            spec = SWAGGER.operations.get((req.method, req.route))
            if spec is None:
                problems.append(f"{req.method} {req.route}: not in swagger")
                continue
            for key, value in req.query.items():
                param = spec.params.get(key)
                if param is None:
                    problems.append(f"{req.method} {req.route}: unknown parameter {key}")
                elif param.allowed is not None and value not in param.allowed:
                    problems.append(f"{req.method} {req.route}: {key}={value} not in {param.allowed}")
            for param in spec.params.values():
                if param.required and param.param_type == "query" and param.name not in req.query:
                    problems.append(f"{req.method} {req.route}: required {param.name} missing")
        for event in fake.events_sent:
            problems += SWAGGER.validate(event["type"], event)
        assert not problems, "\n".join(problems)
        kinds = {e["type"] for e in fake.events_sent}
        assert {"StasisStart", "StasisEnd", "ChannelHangupRequest", "ChannelDestroyed", "ChannelLeftBridge",
                "ChannelDtmfReceived", "ChannelEnteredBridge", "PlaybackFinished", "Dial"} <= kinds


async def test_fake_rest_responses_match_models() -> None:
    async with FakeAsterisk() as fake:
        caller = await fake.originate_call("+15550001234")
        async with AriClient(AriSettings(url=fake.url)) as client:
            session = client.session
            await client.create_bridge("aziza-bridge-x")
            async with session.get(f"{fake.url}/ari/channels") as resp:
                channels = await resp.json()
            async with session.get(f"{fake.url}/ari/bridges") as resp:
                bridges = await resp.json()
            async with session.post(f"{fake.url}/ari/applications/aziza/subscription",
                                    params={"eventSource": f"channel:{caller}"}) as resp:
                application = await resp.json()
            async with session.post(f"{fake.url}/ari/channels/externalMedia", params={
                "app": "aziza", "external_host": "127.0.0.1:9", "format": "ulaw"}) as resp:
                media = await resp.json()
        problems = [p for c in channels for p in SWAGGER.validate("Channel", c)]
        problems += [p for b in bridges for p in SWAGGER.validate("Bridge", b)]
        problems += SWAGGER.validate("Application", application)
        problems += SWAGGER.validate("Channel", media)
        assert not problems, "\n".join(problems)
        assert set(media["channelvars"]) == {"UNICASTRTP_LOCAL_ADDRESS", "UNICASTRTP_LOCAL_PORT"}


def test_validator_catches_a_bad_payload() -> None:
    """The checker itself can fail (a contract test that cannot fail is no test)."""
    problems = SWAGGER.validate("ChannelDtmfReceived", {"type": "ChannelDtmfReceived", "digit": 5})
    assert any("application" in p for p in problems) and any("digit" in p for p in problems)
    assert any("channel" in p for p in problems) and any("duration_ms" in p for p in problems)
