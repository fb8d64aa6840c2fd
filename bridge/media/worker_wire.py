"""The line protocol between the bridge and its media workers, sans-IO.

One JSON object per line over the worker's stdin (bridge → worker) and stdout (worker → bridge). A request
that wants an answer carries ``id``; the answer repeats it with ``ok`` or ``error`` (and ``detail``). The
worker also speaks unprompted: ``ended`` when a call's media is over, and ``live`` every second (the
calls' latency for `calls live`, and its media metrics as Prometheus text for the bridge's ``/metrics``).

Requests (``call`` names the call in every one but ``hello``):

=========  =================================  =================================================
op         fields                             answer
=========  =================================  =================================================
hello      settings (BridgeSettings as JSON), (none: the worker starts serving)
           log_level
open       persona (PersonaParams fields)     url, seed, warnings; error engine_full /
                                              engine_unavailable
bind       inbound_format                     host, port; error bind_failed
lock       host, port                         (none)
run        (none)                             (none; ``ended`` comes when the media is over)
pause      (none)                             (none)
resume     (none)                             (none)
event      name, value                        ok; error engine_gone
stop       (none)                             ok, once the media is stopped
close      (none)                             ok, once media and engine session are closed
drop       (none)                             (none: like close, for a call abandoned mid-request)
=========  =================================  =================================================

Anything that does not parse is logged by the side that got it and skipped: a line never ends a worker.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

MAX_LINE = 1 << 24  # an ``ended`` line carries a call's histograms: tens of kB, never near this


class WireError(ValueError):
    """A line that is not a JSON object with a string ``op`` (requests) or an ``id``/``op`` (answers)."""


@dataclass(frozen=True, slots=True)
class Message:
    op: str
    call: str = ""
    id: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def encode(op: str, call: str = "", id: int | None = None, **fields: Any) -> bytes:
    body: dict[str, Any] = {"op": op}
    if call:
        body["call"] = call
    if id is not None:
        body["id"] = id
    body.update(fields)
    return json.dumps(body, separators=(",", ":"), default=_plain).encode() + b"\n"


def _plain(value: Any) -> Any:
    """What json cannot write by itself: dataclasses (a call's stats), numpy scalars, the rest as text."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def decode(line: bytes) -> Message:
    """One line as a Message; WireError for anything else."""
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("not a JSON object")
    op, call, ident = body.pop("op", None), body.pop("call", ""), body.pop("id", None)
    if not isinstance(op, str) or not isinstance(call, str):
        raise WireError("op and call must be strings")
    if ident is not None and (not isinstance(ident, int) or isinstance(ident, bool)):
        raise WireError("id must be an integer")
    return Message(op, call, ident, body)


__all__ = ["MAX_LINE", "Message", "WireError", "decode", "encode"]
