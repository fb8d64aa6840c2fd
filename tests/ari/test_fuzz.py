"""Slow fuzz runs (issue 11): 10^5 hypothesis cases each over the control API and the /ws/talk JSON, with 0
uncaught exceptions. ``-m slow`` runs them; ``AZIZA_TEST_FUZZ_CASES`` changes the count.

Both run the real servers over real loopback sockets. An uncaught exception shows either as an HTTP 500
(aiohttp's answer to a handler that raised), as an ERROR record from aiohttp's or the bridge's loggers, or
as a talk torn down by a message that should only have been answered with an ``error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.browser_ws import MAX_CONTROL_JSON
from bridge.safe_json import BadJson, parse_json_object
from bridge.talk_token import sign
from tests.ari.fake_asterisk import FakeAsterisk
from tests.ari.harness import control_headers, eventually, fake_and_bridge
from tests.ari.standins import standin_deps
from tests.engine.test_browser_ws import KEY, stack

pytestmark = pytest.mark.slow
CASES = int(os.environ.get("AZIZA_TEST_FUZZ_CASES", "100000"))

# JSON of every shape, including nesting far deeper than anything the bridge accepts.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_deep = st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n) | st.integers(1, 60_000).map(
    lambda n: '{"target": ' * n + "1" + "}" * n
)
_body_text = (
    _json.map(json.dumps)
    | st.fixed_dictionaries({"target": st.text(max_size=40) | _json}).map(json.dumps)
    | _deep
    | st.text(max_size=200)
    | st.sampled_from(["", "{", "null", "NaN", '{"target": NaN}', "[]", '{"target": "sip:x@y"}', "\ud800"])
)
_body = _body_text.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=300)


class ErrorLog(logging.Handler):
    """Counts ERROR records (aiohttp logs every exception a handler lets out)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def error_log(*names: str) -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@asynccontextmanager
async def _client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:  # made inside the loop, as aiohttp requires
        yield http


def _run(cases: int, body: Any) -> None:
    settings(max_examples=cases, deadline=None, database=None, derandomize=True,
             suppress_health_check=list(HealthCheck))(body)()


def test_control_api_fuzz() -> None:
    loop = asyncio.new_event_loop()
    exits = AsyncExitStack()
    sd = standin_deps(slots=4)
    fake, svc = loop.run_until_complete(exits.enter_async_context(fake_and_bridge(sd.deps())))
    http = loop.run_until_complete(exits.enter_async_context(_client()))
    live: list[str] = []
    statuses: dict[int, int] = {}

    async def a_live_call(fake: FakeAsterisk) -> str:
        live[:] = [c for c in live if c in svc.controller.calls]
        if not live:  # the fuzz hung up or transferred the last one: a new caller
            caller = await fake.originate_call("+15550001234")
            await eventually(lambda: caller in sd.sink.answered_calls, what="call answered")
            live.append(caller)
        return live[0]

    async def one(method: str, path: str, header_kind: str, body: bytes | None) -> int:
        call = await a_live_call(fake)
        headers = {
            "good": control_headers(),
            "no_token": {"Content-Type": "application/json"},
            "bad_token": control_headers(Authorization="Bearer " + "0" * 43),
            "text_plain": control_headers(**{"Content-Type": "text/plain"}),
            "origin": control_headers(Origin="http://evil.example"),
            "host": control_headers(Host="evil.example"),
        }[header_kind]
        url = svc.http_url + path.replace("{live}", call)
        async with http.request(method, url, headers=headers, data=body) as resp:
            raw = await resp.read()
            if resp.status not in (404, 405) and path != "/metrics":  # not aiohttp's own text answers
                answer = json.loads(raw)  # every answer of the bridge's own, refusals included, is JSON
                assert isinstance(answer, dict) and ("error" in answer or "ok" in answer or "calls" in answer)
            return resp.status

    paths = st.sampled_from(["/calls/{live}/hold", "/calls/{live}/unhold", "/calls/{live}/transfer",
                             "/calls/{live}/hangup", "/calls/nope/hold", "/calls", "/health", "/metrics"])
    headers = st.sampled_from(["good"] * 6 + ["no_token", "bad_token", "text_plain", "origin", "host"])

    @given(st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE"]), paths, headers, st.none() | _body)
    def case(method: str, path: str, header_kind: str, body: bytes | None) -> None:
        status = loop.run_until_complete(one(method, path, header_kind, body))
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500 or status in (502, 503), status  # 502: Asterisk said no; never a 500

    started = time.monotonic()
    try:
        with error_log("aiohttp.server", "aiohttp.web", "aiohttp.access", "bridge", "aziza") as errors:
            _run(CASES, case)
        assert errors.records == [], [r.getMessage() for r in errors.records[:5]]
        assert sum(statuses.values()) >= CASES
    finally:
        loop.run_until_complete(exits.aclose())
        loop.close()
    print(f"control API fuzz: {sum(statuses.values())} requests in {time.monotonic() - started:.0f} s, "
          f"statuses {dict(sorted(statuses.items()))}")


_talk_text = (
    _json.map(json.dumps)
    | st.fixed_dictionaries({"type": st.sampled_from(["hello", "close", "dance", "HELLO", ""]) | _json,
                             "sample_rate": _json}).map(json.dumps)
    | st.fixed_dictionaries({"type": st.just("hello"), "sample_rate": st.integers(-10**6, 10**6)})
    .map(json.dumps)
    | _deep
    | st.text(max_size=200)
)
_talk_message = _talk_text.map(lambda t: ("text", t)) | st.binary(max_size=4000).map(lambda b: ("binary", b))
PROBE_TYPE = "fuzz-probe-7f3a"
PROBE = json.dumps({"type": PROBE_TYPE})
TALK_ERRORS = {"bad_message", "bad_frame"}


def test_ws_talk_json_fuzz() -> None:
    loop = asyncio.new_event_loop()
    exits = AsyncExitStack()
    _, base = loop.run_until_complete(exits.enter_async_context(stack(slots=2)))
    http = loop.run_until_complete(exits.enter_async_context(_client()))
    talks: list[aiohttp.ClientWebSocketResponse] = []
    counts = {"messages": 0, "errors": 0, "talks": 0}

    async def a_talk() -> aiohttp.ClientWebSocketResponse:
        if talks and not talks[0].closed:
            return talks[0]
        url = base.replace("http://", "ws://") + f"/ws/talk?token={sign(KEY, 'default', 600)}"
        ws = await http.ws_connect(url, headers={"Origin": base})
        ready = json.loads((await ws.receive(timeout=10)).data)
        assert ready["type"] == "ready", ready
        talks[:] = [ws]
        counts["talks"] += 1
        return ws

    async def one(kind: str, payload: str | bytes) -> None:
        ws = await a_talk()
        if kind == "text":
            assert isinstance(payload, str)
            await ws.send_str(payload)
            if _is_close(payload):  # a well-formed close ends the talk: the next case opens another
                await _drain_until_closed(ws)
                return
        else:
            assert isinstance(payload, bytes)
            await ws.send_bytes(payload)
        await ws.send_str(PROBE)
        while True:  # every reply up to the probe's: errors of known codes, audio, lag reports
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), (msg, payload)
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue
            reply = json.loads(msg.data)
            if reply.get("type") == "lag":
                continue
            assert reply["type"] == "error" and reply["code"] in TALK_ERRORS, reply
            if reply["message"] == f"unknown message type {PROBE_TYPE!r}":
                break
            counts["errors"] += 1

    @given(_talk_message)
    def case(message: tuple[str, str | bytes]) -> None:
        loop.run_until_complete(one(*message))
        counts["messages"] += 1

    started = time.monotonic()
    try:
        with error_log("aiohttp.server", "aiohttp.web", "bridge", "aziza") as errors:
            _run(CASES, case)
        assert errors.records == [], [r.getMessage() for r in errors.records[:5]]
        assert counts["messages"] >= CASES
    finally:
        loop.run_until_complete(exits.aclose())
        loop.close()
    print(f"/ws/talk fuzz: {counts['messages']} messages in {time.monotonic() - started:.0f} s, "
          f"{counts['errors']} error replies, {counts['talks']} talks")


def _is_close(text: str) -> bool:
    """Whether the bridge takes ``text`` as a close (within its limits for control messages)."""
    try:
        obj = parse_json_object(text, max_bytes=MAX_CONTROL_JSON)
    except BadJson:
        return False
    return obj.get("type") == "close"


async def _drain_until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return
