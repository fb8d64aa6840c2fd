"""Who may use the bridge's HTTP side: the rules as pure functions (sans-IO), applied by
``control_api.guard_middleware``.

The control API moves calls (hold, transfer, hang-up), so a request must prove it comes from the operator:

* ``Host`` must name this bridge (loopback, ``bridge.http_host``, ``bridge.public_url``'s host, or one of
  ``bridge.allowed_hosts``), else **421**: a page on ``evil.example`` that DNS-rebinds its name to
  127.0.0.1 still sends ``Host: evil.example``.
* No ``Origin`` header, else **403**: browsers add it to cross-site requests, aziza-admin never sends it.
* ``Authorization: Bearer <token>`` with the token in ``bridge.control_token_file`` (root:aziza 0640,
  made by the installer), else **401**. A web page cannot read the file, and cannot add the header to a
  "simple" cross-site request without a CORS preflight, which the bridge never answers.
* ``POST`` bodies must be ``Content-Type: application/json``, else **415**: an HTML form or a
  ``text/plain`` fetch (the CORS simple request that once redirected a live call) is refused unread.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# The browser channel's routes: Host-checked like the rest, but they check their own Origin allowlist and
# signed talk token instead of the control token (a browser cannot hold that).
BROWSER_PATHS = frozenset({"/talk", "/ws/talk"})
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


class TokenFileError(Exception):
    """The control token file cannot be used; the message says why and what to do."""


def host_name(host_header: str) -> str | None:
    """The host part of a ``Host`` header, lower-cased, without port or trailing dot; None if malformed."""
    value = host_header.strip().lower()
    if not value or any(c.isspace() or c in "/@\\?#" for c in value):
        return None
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
    else:
        if value.count(":") > 1:  # a bare IPv6 address is not a valid Host
            return None
        host, sep, port = value.partition(":")
        rest = sep + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return host.rstrip(".") or None


def allowed_hosts(http_host: str, public_url: str | None, extra: Iterable[str]) -> frozenset[str]:
    names = set(LOOPBACK_HOSTS)
    if http_host not in ("", "0.0.0.0", "::"):
        names.add(http_host.lower().strip("[]"))
    if public_url:
        public = urlsplit(public_url).hostname
        if public:
            names.add(public.lower())
    names.update(h.lower().rstrip(".").strip("[]") for h in extra if h)
    return frozenset(names)


def check_host(headers: Mapping[str, str], allowed: frozenset[str]) -> Refusal | None:
    raw = headers.get("Host")
    name = host_name(raw) if raw is not None else None
    if name is None or name not in allowed:
        return Refusal(421, f"this bridge does not answer to Host {raw!r}"[:200])
    return None


def check_control(
    method: str, headers: Mapping[str, str], token: str | None, token_problem: str | None
) -> Refusal | None:
    """The control API's rules after the Host check: Origin, token, content type (in that order)."""
    if "Origin" in headers:
        return Refusal(403, "cross-origin requests are refused by the control API")
    if token is None:
        return Refusal(503, f"control API disabled: {token_problem or 'no token'}")
    auth = headers.get("Authorization", "")
    scheme, _, presented = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return Refusal(401, "missing or wrong control token (aziza-admin sends it for you)")
    if method == "POST":
        ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return Refusal(415, f"POST bodies must be application/json, not {ctype or 'unspecified'!r}"[:200])
    return None


def check_origin(headers: Mapping[str, str], allowed: frozenset[str]) -> Refusal | None:
    """Browser channel: the page opening the WebSocket must be one of ours (an Origin allowlist)."""
    origin = headers.get("Origin")
    if origin is None:
        return Refusal(403, "an Origin header is required")
    if normalize_origin(origin) not in allowed:
        return Refusal(403, f"origin {origin!r} is not allowed"[:200])
    return None


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` lower-cased, default ports dropped; anything else becomes ''."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def talk_origins(
    http_host: str, http_port: int, public_url: str | None, extra: Iterable[str]
) -> frozenset[str]:
    """Origins whose pages may open /ws/talk: the bridge's own (it serves /talk) and the configured ones."""
    origins = {normalize_origin(o) for o in extra}
    if public_url:
        origins.add(normalize_origin(public_url))
    for host in ({http_host} - {"", "0.0.0.0", "::"}) | {"127.0.0.1", "localhost"}:
        bracketed = f"[{host}]" if ":" in host else host
        origins.add(normalize_origin(f"http://{bracketed}:{http_port}"))
    origins.discard("")
    return frozenset(origins)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (whitespace stripped). Raises TokenFileError with the fix in the message."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise TokenFileError(
            f"{path} does not exist (the installer creates it; or: aziza-admin control-token --create)"
        ) from None
    except PermissionError:
        raise TokenFileError(
            f"{path}: permission denied (run as root or as a member of group aziza)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenFileError(f"{path}: the token must be one word of at least {MIN_TOKEN_CHARS} characters")
    return token


class TokenSource:
    """The token file, re-read when it changes (rotation needs no restart); never raises."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.token: str | None = None
        self.problem: str | None = None

    def current(self) -> tuple[str | None, str | None]:
        """(token, None) or (None, why there is none)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is None or stamp != self._stamp:
            self._stamp = stamp
            try:
                self.token, self.problem = read_token_file(self.path), None
            except TokenFileError as exc:
                self.token, self.problem = None, str(exc)
        return self.token, self.problem
