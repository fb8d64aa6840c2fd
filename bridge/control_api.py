"""The bridge's HTTP control surface: /health, /metrics, live calls and per-call control.

``aziza-admin calls hold|unhold|transfer|hangup ID`` are thin clients of these routes. Errors are
JSON ``{"error": ...}`` with 404 (unknown call), 409 (call in the wrong state), 400 (bad input) or
502 (Asterisk refused/unreachable), so the CLI can print one clear line.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.ari.errors import AriError
from bridge.call import Call, CallStateError
from bridge.controller import CallController, UnknownCall

HealthProbe = Callable[[], Awaitable[dict[str, Any]]]


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

    def call_action(action: Callable[[Call, dict[str, Any]], Awaitable[None]]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            call_id = request.match_info["call_id"]
            try:
                call = controller.get(call_id)
                body: dict[str, Any] = {}
                if request.can_read_body:
                    try:
                        raw = await request.json()
                    except (ValueError, json.JSONDecodeError):
                        return _err(400, "body is not JSON")
                    if not isinstance(raw, dict):
                        return _err(400, "body must be a JSON object")
                    body = raw
                await action(call, body)
            except UnknownCall:
                return _err(404, f"no live call {call_id}")
            except CallStateError as exc:
                return _err(409, str(exc))
            except ValueError as exc:
                return _err(400, str(exc))
            except AriError as exc:
                return _err(502, f"Asterisk refused: {exc}")
            return web.json_response({"ok": True, "call": call.describe()})

        return handler

    async def do_hold(call: Call, body: dict[str, Any]) -> None:
        await call.hold()

    async def do_unhold(call: Call, body: dict[str, Any]) -> None:
        await call.unhold()

    async def do_transfer(call: Call, body: dict[str, Any]) -> None:
        target = body.get("target")
        if not isinstance(target, str) or not target.strip():
            raise ValueError('transfer needs {"target": "ext@context" | "sip:..." | "PJSIP/..."}')
        await call.transfer(target)

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
