"""JSON from untrusted peers (the control API, the browser channel), bounded before it is parsed.

``json.loads`` recurses once per nesting level: ``[[[[...]]]]`` 100,000 deep raises ``RecursionError``,
which no ``except ValueError`` catches (it gave HTTP 500 on ``/calls/ID/hold`` and tore down a browser
talk). The size and the nesting depth are checked first, by a linear scan that does not recurse, so
the parser only ever sees documents it can handle. Every refusal is a :class:`BadJson` (a ValueError)
with a message fit to send back.
"""

from __future__ import annotations

import json
from typing import Any

from engine.protocol import json_depth as nesting_depth  # the one scan (the engine's wire protocol uses it)

MAX_DEPTH = 32
MAX_BYTES = 64 * 1024


class BadJson(ValueError):
    """The text is not acceptable JSON (too big, too deep, not JSON, not UTF-8)."""


def parse_json(raw: str | bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` or raise :class:`BadJson`. NaN/Infinity are refused too (they are not JSON)."""
    if len(raw) > max_bytes:
        raise BadJson(f"JSON over {max_bytes} bytes")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJson("JSON must be UTF-8") from None
    else:
        text = raw
    if nesting_depth(text) > max_depth:
        raise BadJson(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: belt and braces after the depth scan
        raise BadJson(f"not JSON: {exc}"[:200]) from None


def parse_json_object(raw: str | bytes, **limits: int) -> dict[str, Any]:
    value = parse_json(raw, **limits)
    if not isinstance(value, dict):
        raise BadJson("JSON must be an object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
