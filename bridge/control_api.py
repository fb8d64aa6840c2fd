"""The bridge's HTTP control surface: /health, /metrics, live calls and per-call control.

``aziza-admin calls hold|unhold|transfer|hangup ID`` are thin clients of these routes. Every request
passes :func:`guard_middleware` first (``bridge/http_guard.py``: 421 foreign Host, 403 Origin, 401 token,
415 content type). Errors are JSON ``{"error": ...}`` with 404 (unknown call), 409 (call in the wrong
state), 400 (bad input, bad JSON at any depth) or 502 (Asterisk refused/unreachable), so the CLI can
print one clear line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.ari.errors import AriError
from bridge.call import Call, CallStateError
from bridge.controller import CallController, UnknownCall
from bridge.http_guard import TokenSource, check_control, check_host
from bridge.safe_json import BadJson, parse_json_object

HealthProbe = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_CONTROL_BODY = 64 * 1024


def guard_middleware(
    allowed_hosts: frozenset[str], tokens: TokenSource, browser_paths: frozenset[str]
) -> Any:
    """Host check for every route; Origin, token and content-type checks for all but the browser
    channel's (which checks its own Origin allowlist and signed talk token)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = check_host(request.headers, allowed_hosts)
        if refusal is None and request.path not in browser_paths:
            token, problem = tokens.current()
            refusal = check_control(request.method, request.headers, token, problem)
        if refusal is not None:
            return _err(refusal.status, refusal.message)
        return await handler(request)

    return guard


def control_routes(
    controller: CallController, *, ari_connected: Callable[[], bool], health_probe: HealthProbe | None = None
) -> list[web.RouteDef]:
    async def health(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "ari_connected": ari_connected(),
            "live_calls": len(controller.calls),
            "events_handled": controller.events_handled,
        }
        if health_probe is not None:
            try:
                body["state"] = await health_probe()
            except Exception as exc:  # health must answer even when a probe breaks
                body["state"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = body["ari_connected"] and body.get("state", {}).get("ok", True) is not False
        body["ok"] = bool(ok)
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        data = generate_latest(controller.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_calls(request: web.Request) -> web.Response:
        return web.json_response({"calls": controller.live_calls()})

    def call_action(action: Callable[[Call, dict[str, Any]], Awaitable[dict[str, Any] | None]]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            call_id = request.match_info["call_id"]
            try:
                call = controller.get(call_id)
                body: dict[str, Any] = {}
                if request.can_read_body:
                    if (request.content_length or 0) > MAX_CONTROL_BODY:
                        return _err(413, f"body over {MAX_CONTROL_BODY} bytes")
                    raw = await request.content.read(MAX_CONTROL_BODY + 1)
                    try:
                        body = parse_json_object(raw, max_bytes=MAX_CONTROL_BODY) if raw.strip() else {}
                    except BadJson as exc:
                        return _err(400, f"body: {exc}")
                extra = await action(call, body)
            except UnknownCall:
                return _err(404, f"no live call {call_id}")
            except CallStateError as exc:
                return _err(409, str(exc))
            except ValueError as exc:
                return _err(400, str(exc))
            except AriError as exc:
                return _err(502, f"Asterisk refused: {exc}")
            return web.json_response({"ok": True, "call": call.describe(), **(extra or {})})

        return handler

    async def do_hold(call: Call, body: dict[str, Any]) -> None:
        await call.hold()

    async def do_unhold(call: Call, body: dict[str, Any]) -> None:
        await call.unhold()

    async def do_transfer(call: Call, body: dict[str, Any]) -> dict[str, Any]:
        """Answers when the attempt has an outcome (the target answered, or the caller is back with the
        agent): ``{"transfer": {"target", "outcome": "answered"|"failed", "reason"}}``."""
        target = body.get("target")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(
                'transfer needs {"target": "context,exten" | "exten@context" | "sip:..." | "PJSIP/..."}')
        outcome = await call.transfer(target)
        return {"transfer": outcome.to_json()}

    async def do_hangup(call: Call, body: dict[str, Any]) -> None:
        call.hangup()

    return [
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get("/calls", list_calls),
        web.post("/calls/{call_id}/hold", call_action(do_hold)),
        web.post("/calls/{call_id}/unhold", call_action(do_unhold)),
        web.post("/calls/{call_id}/transfer", call_action(do_transfer)),
        web.post("/calls/{call_id}/hangup", call_action(do_hangup)),
    ]


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
