"""Masking secrets before anything is printed, logged or returned: passwords inside URLs and DSNs,
secret-named query parameters and settings fields.

Pure functions (no I/O) so every place that shows configuration — ``aziza-admin config show``, the
bridge's start-up log, health reports, configuration errors — masks the same way.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "********"
# Field and query-parameter names whose values are secrets wherever they appear.
SECRET_NAMES = frozenset({"password", "passwd", "pass", "secret", "token", "api_key", "apikey", "key"})
_DSN_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_NAMES or lowered.endswith(("_password", "_secret", "_token"))


def mask_url(text: str) -> str:
    """``scheme://user:pw@host/db?password=x`` → ``scheme://user:********@host/db?password=********``.

    Anything that is not a URL is returned with libpq ``password=...`` pairs masked (a DSN), so a
    value of unknown shape never leaks its password. Never raises.
    """
    if "://" not in text:
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}"
        elif at and parts.scheme.startswith("redis") and userinfo:
            # redis://secret@host: a lone userinfo is the password (redis-py reads it so).
            netloc = f"{MASK}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(is_secret_name(k) for k, _ in pairs):
                query = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe="*/")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparsable (e.g. a bad port): mask everything between "://" and "@"
        return re.sub(r"://[^@/]*@", f"://{MASK}@", text)


def url_passwords(*urls: str) -> list[str]:
    """The passwords inside these URLs (to scrub from error texts that might quote them)."""
    found = []
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found.append(password)
    return found


def mask_value(name: str, value: Any) -> Any:
    """One settings value as it may be shown: secrets by name, URLs by content, containers recursively."""
    if isinstance(value, dict):
        return {k: mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(name, v) for v in value]
    if is_secret_name(name) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return mask_url(value)
    return value


def mask_text(text: str, secrets: list[str]) -> str:
    """``text`` with every URL in it masked and each of ``secrets`` (known values) replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: mask_url(m.group(0)), text)
