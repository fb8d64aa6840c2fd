"""``aziza-admin calls hold|unhold|transfer|hangup ID``: thin clients of the bridge's control API.

The bridge URL comes from the settings (``bridge.http_host``/``http_port``) or ``--bridge-url``.
Errors are one clear line on stderr and exit status 1 (bridge down, unknown call, wrong state).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from bridge.config import Settings


def _bridge_url(explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    bridge = Settings().bridge
    host = "127.0.0.1" if bridge.http_host in ("0.0.0.0", "::", "") else bridge.http_host
    return f"http://{host}:{bridge.http_port}"


def _post(base: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path, data=data, method="POST", headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return _decode(resp.read())
    except urllib.error.HTTPError as exc:
        detail = _decode(exc.read()).get("error") or exc.reason
        raise click.ClickException(f"{detail} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"aziza-bridge is not reachable at {base}: {reason}") from None


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode(errors="replace").strip()[:200]}
    return value if isinstance(value, dict) else {}


def _action(action: str, call_id: str, bridge_url: str | None, as_json: bool, timeout: float,
            body: dict[str, Any] | None = None) -> None:
    result = _post(_bridge_url(bridge_url), f"/calls/{urllib.parse.quote(call_id, safe='')}/{action}", body,
                   timeout)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        state = result.get("call", {}).get("state", "?")
        click.echo(f"{action}: call {call_id} ok (state {state})")


_common = [
    click.argument("call_id"),
    click.option("--bridge-url", default=None, help="aziza-bridge HTTP URL (default: from settings)."),
    click.option("--json", "as_json", is_flag=True, help="Print the bridge's JSON answer."),
    click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the bridge."),
]


def _with_common(f: Any) -> Any:
    for decorator in reversed(_common):
        f = decorator(f)
    return f


@click.command("hold")
@_with_common
def calls_hold(call_id: str, bridge_url: str | None, as_json: bool, timeout: float) -> None:
    """Put a live call on hold (music on hold; the engine session pauses)."""
    _action("hold", call_id, bridge_url, as_json, timeout)


@click.command("unhold")
@_with_common
def calls_unhold(call_id: str, bridge_url: str | None, as_json: bool, timeout: float) -> None:
    """Take a call off hold."""
    _action("unhold", call_id, bridge_url, as_json, timeout)


@click.command("transfer")
@_with_common
@click.argument("target")
def calls_transfer(call_id: str, target: str, bridge_url: str | None, as_json: bool, timeout: float) -> None:
    """Blind-transfer a call: TARGET is ext@context (dialplan) or sip:URI / PJSIP/endpoint (redirect)."""
    _action("transfer", call_id, bridge_url, as_json, timeout, {"target": target})


@click.command("hangup")
@_with_common
def calls_hangup(call_id: str, bridge_url: str | None, as_json: bool, timeout: float) -> None:
    """Hang up a live call."""
    _action("hangup", call_id, bridge_url, as_json, timeout)
