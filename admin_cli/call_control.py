"""aziza-admin commands that talk to the running bridge: ``calls hold|unhold|transfer|hangup ID`` (thin
clients of its control API), ``talk-link`` (a signed, expiring browser link) and ``control-token``.

The bridge URL comes from the settings (``bridge.http_host``/``http_port``) or ``--bridge-url``. Every
request carries the control token from ``bridge.control_token_file`` (root:aziza 0640): root and members
of group aziza can use these commands, nobody else. Errors are one clear line on stderr and exit status 1
(bridge down, no token, unknown call, wrong state).
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from admin_cli.settings import load_cli_settings
from bridge.http_guard import MIN_TOKEN_CHARS, TokenFileError, read_token_file
from bridge.talk_token import MAX_TTL_S, parse_ttl, sign, talk_key

DEFAULT_TIMEOUT_S = 5.0


def _bridge_url(explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    bridge = load_cli_settings().bridge
    host = "127.0.0.1" if bridge.http_host in ("0.0.0.0", "::", "") else bridge.http_host
    return f"http://{host}:{bridge.http_port}"


def _token(token_file: str | None) -> str:
    path = Path(token_file) if token_file else load_cli_settings().bridge.control_token_file
    try:
        return read_token_file(path)
    except TokenFileError as exc:
        raise click.ClickException(f"control token: {exc}") from None


def _post(base: str, path: str, body: dict[str, Any], token: str, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
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


def _action(action: str, call_id: str, opts: dict[str, Any], body: dict[str, Any] | None = None) -> None:
    result = _post(_bridge_url(opts["bridge_url"]), f"/calls/{urllib.parse.quote(call_id, safe='')}/{action}",
                   body or {}, _token(opts["token_file"]), opts["timeout"])
    transfer = result.get("transfer")
    if opts["as_json"]:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(transfer, dict) and transfer.get("outcome") == "answered":
        click.echo(f"transfer: call {call_id} transferred to {transfer.get('target')} (answered)")
    elif not isinstance(transfer, dict):
        state = result.get("call", {}).get("state", "?")
        click.echo(f"{action}: call {call_id} ok (state {state})")
    if isinstance(transfer, dict) and transfer.get("outcome") != "answered":
        raise click.ClickException(
            f"transfer of call {call_id} to {transfer.get('target')} failed: {transfer.get('reason')}; "
            "the caller is back with the agent")


_token_file_option = click.option(
    "--token-file", default=None, metavar="PATH",
    help="Control token file (default: bridge.control_token_file).",
)
_common = [
    click.argument("call_id"),
    click.option("--bridge-url", default=None, help="aziza-bridge HTTP URL (default: from settings)."),
    _token_file_option,
    click.option("--json", "as_json", is_flag=True, help="Print the bridge's JSON answer."),
    click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
                 help="Seconds to wait for the bridge."),
]


def _with_common(f: Any) -> Any:
    for decorator in reversed(_common):
        f = decorator(f)
    return f


@click.command("hold")
@_with_common
def calls_hold(call_id: str, **opts: Any) -> None:
    """Put a live call on hold (music on hold; the engine session pauses)."""
    _action("hold", call_id, opts)


@click.command("unhold")
@_with_common
def calls_unhold(call_id: str, **opts: Any) -> None:
    """Take a call off hold."""
    _action("unhold", call_id, opts)


@click.command("transfer")
@_with_common
@click.argument("target")
def calls_transfer(call_id: str, target: str, **opts: Any) -> None:
    """Transfer a call: TARGET is a dialplan location (context,exten or exten@context), PJSIP/endpoint or
    a sip: URI. Waits for the outcome (--timeout covers ari.transfer_timeout_s): answered, or the
    reason the caller is back with the agent (exit status 1)."""
    if opts["timeout"] == DEFAULT_TIMEOUT_S:  # the target rings for up to ari.transfer_timeout_s
        opts["timeout"] = load_cli_settings().ari.transfer_timeout_s + 10.0
    _action("transfer", call_id, opts, {"target": target})


@click.command("hangup")
@_with_common
def calls_hangup(call_id: str, **opts: Any) -> None:
    """Hang up a live call."""
    _action("hangup", call_id, opts)


@click.command("talk-link")
@click.option("--persona", "persona_name", required=True, help="The persona the browser talks to.")
@click.option("--ttl", default="10m", show_default=True,
              help=f"How long the link can be opened: 90s, 10m, 2h (at most {MAX_TTL_S // 3600} h).")
@_token_file_option
def talk_link(persona_name: str, ttl: str, token_file: str | None) -> None:
    """Print a signed, expiring URL for a browser talk with PERSONA (one talk at a time per link)."""
    from bridge.state.models import StateError, check_persona_name

    try:
        check_persona_name(persona_name)
        ttl_s = parse_ttl(ttl)
    except (StateError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    settings = load_cli_settings()
    b = settings.bridge
    token = sign(talk_key(_token(token_file)), persona_name, ttl_s)
    base = b.public_url or f"http://{'127.0.0.1' if b.http_host in ('0.0.0.0', '::', '') else b.http_host}" \
        f":{b.http_port}"
    click.echo(f"{base}/talk?token={token}")


@click.command("control-token")
@click.option("--create", is_flag=True, help="Write a new token if the file does not exist.")
@click.option("--rotate", is_flag=True, help="Replace the token (revokes every talk link).")
@_token_file_option
def control_token(create: bool, rotate: bool, token_file: str | None) -> None:
    """Check the control token file (the installer creates it root:aziza 0640), or make one."""
    path = Path(token_file) if token_file else load_cli_settings().bridge.control_token_file
    if (create and not path.exists()) or rotate:
        _write_token(path)
        click.echo(f"wrote a new control token to {path}")
        return
    _token(str(path))
    click.echo(f"control token at {path} is readable")


def _write_token(path: Path) -> None:
    """Atomically, 0640, group aziza when it exists and we may (root)."""
    import grp

    token = secrets.token_urlsafe(32)
    assert len(token) >= MIN_TOKEN_CHARS
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        if os.geteuid() == 0:
            try:
                os.chown(tmp, 0, grp.getgrnam("aziza").gr_gid)
            except KeyError:
                pass
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {path}: {exc}") from None
