"""Wire protocol between an engine client (the bridge, a browser relay, a benchmark) and aziza-engine.

Transport: one WebSocket per session, ``GET /session`` on the engine's aiohttp server (TCP on loopback by
default, or a Unix socket). Sans-IO: this module only encodes and decodes messages.

Control messages are JSON text frames with a ``type`` field, at most ``MAX_CONTROL_BYTES`` long and
``MAX_JSON_DEPTH`` deep (both checked before the JSON parser runs); every field is type-checked and unknown
fields are refused:

  client -> engine  ``open``   {persona, call_id, seed}      first message, exactly once; seed optional
                    ``event``  {name, value}                 e.g. name="dtmf", value="5"
                    ``pause`` / ``resume``                   hold: no frames consumed or produced
                    ``close``                                 end the session, free the slot
  engine -> client  ``ready``  {session_id, slot, generation, sample_rate, frame_samples, seed, warnings}
                    ``text``   {seq, text}                    agent text decoded with output frame ``seq``
                    ``gap``    {first_seq, count, reason, filled}   input frames that did not come in order
                    ``error``  {code, message}               code in ERROR_CODES; "full" refuses an open
                    ``lag``    {behind_frames}                the session fell behind real time
                    ``closed`` {reason}

A persona names its assets by id (``voice_prompt_id``, ``adapter_id``: file names under the engine's own
data dir); a client never passes a file path.

Audio is a binary frame: 1 byte kind (AUDIO), 4 bytes big-endian frame sequence number, then exactly
FRAME_SAMPLES little-endian int16 samples at SAMPLE_RATE (80 ms of 24 kHz mono). The client numbers its
input frames (any start, +1 per frame, modulo 2**32); the engine's output frame ``n`` is the model's
answer to input frame ``n``. Input that skips numbers opens a gap: the engine says so with ``gap``
(``reason`` "missing"), steps up to ``filled`` of the missing frames as silence (their outputs carry their
numbers) and skips the rest; a frame numbered before the last one taken is dropped (``reason`` "late"); a
frame the engine dropped because the session fell behind is reported with ``reason`` "overflow".

Multiplexed transport (``GET /mux``): many sessions over one WebSocket, each a *channel* numbered by the
client (0 .. MUX_MAX_CHANNEL). A text message is the channel number in decimal, one space, then a control
message of the session protocol above, verbatim; a binary message is 1 byte kind (MUX_AUDIO), 2 bytes
big-endian count, then ``count`` records of 4 bytes big-endian channel and one audio frame exactly as above
(kind, sequence number, samples). Each channel is a session with the session protocol's rules (open first,
``closed`` last); the frames due together travel in one message (one system call and one wake-up each way for
a whole tick of calls, instead of one per frame).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
FRAME_MS = 80
AUDIO_KIND = 0x01
_AUDIO_HEADER = struct.Struct(">BI")
AUDIO_FRAME_BYTES = _AUDIO_HEADER.size + 2 * FRAME_SAMPLES
SEQ_MOD = 1 << 32

MUX_AUDIO_KIND = 0x02
_MUX_HEADER = struct.Struct(">BH")
_MUX_CHANNEL = struct.Struct(">I")
MUX_RECORD_BYTES = _MUX_CHANNEL.size + AUDIO_FRAME_BYTES
MUX_MAX_FRAMES = 64  # frames in one multiplexed message (a longer batch is sent as several)
MUX_MAX_MESSAGE_BYTES = _MUX_HEADER.size + MUX_MAX_FRAMES * MUX_RECORD_BYTES
# The WebSocket limit for a mux socket: aiohttp refuses a message of max_msg_size bytes or more (a full
# batch of MUX_MAX_FRAMES once closed the socket under every call on it).
MUX_WS_MAX_MSG_SIZE = MUX_MAX_MESSAGE_BYTES + 4096
MUX_MAX_CHANNEL = (1 << 31) - 1
MAX_CONTROL_BYTES = 8192  # a persona's text prompt is the largest field
MAX_JSON_DEPTH = 4  # {"type": "open", "persona": {...}} is depth 2
MAX_TEXT_PROMPT = 4000
MAX_NAME = 128
MAX_EVENT_VALUE = 256
# An asset id: a file name under the engine's data dir (no separators, no leading dot).
ASSET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ERROR_CODES = (
    "full",  # no free slot: the open is refused
    "bad_message",  # undecodable JSON / unknown type / wrong field types / over a limit
    "bad_frame",  # binary frame of the wrong size or kind
    "protocol",  # a message out of order (audio before open, second open...)
    "unknown_persona",
    "internal",  # the backend failed; the session is closed, the engine lives on
    "idle_timeout",
    "pause_timeout",  # held longer than the engine's pause_max_s
)
GAP_REASONS = ("missing", "late", "overflow")


class ProtocolError(ValueError):
    """A peer sent something this protocol does not allow. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PersonaParams:
    """What a session needs to know of its persona; resolved by the bridge from the database.

    Sampling fields left None take the engine's settings (Moshi's defaults); 0 temperature is greedy."""

    name: str = "default"
    language: str = "en"
    text_prompt: str = ""
    voice_prompt_id: str | None = None  # a file under the engine's data_dir/voices/
    adapter_id: str | None = None  # a LoRA adapter directory under the engine's data_dir/adapters/
    temp: float | None = None
    top_k: int | None = None
    temp_text: float | None = None
    top_k_text: int | None = None


@dataclass(frozen=True)
class Open:
    persona: PersonaParams = field(default_factory=PersonaParams)
    call_id: str | None = None
    seed: int | None = None  # sampling seed; the engine picks one when absent and says which in ready
    type: Literal["open"] = "open"


@dataclass(frozen=True)
class Event:
    name: str
    value: str = ""
    type: Literal["event"] = "event"


@dataclass(frozen=True)
class Pause:
    type: Literal["pause"] = "pause"


@dataclass(frozen=True)
class Resume:
    type: Literal["resume"] = "resume"


@dataclass(frozen=True)
class Close:
    type: Literal["close"] = "close"


@dataclass(frozen=True)
class Ready:
    session_id: str
    slot: int
    generation: int
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    seed: int = 0
    # e.g. "adapter 'sales-ru' unavailable (...): answering on the base weights"
    warnings: tuple[str, ...] = ()
    type: Literal["ready"] = "ready"


@dataclass(frozen=True)
class Text:
    seq: int
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class Gap:
    first_seq: int
    count: int
    reason: str  # one of GAP_REASONS
    filled: int = 0  # how many of them were stepped as silence (their output frames follow)
    type: Literal["gap"] = "gap"


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    type: Literal["error"] = "error"


@dataclass(frozen=True)
class Lag:
    behind_frames: int
    type: Literal["lag"] = "lag"


@dataclass(frozen=True)
class Closed:
    reason: str = "normal"
    type: Literal["closed"] = "closed"


@dataclass(frozen=True)
class AudioFrame:
    """80 ms of 24 kHz mono audio, int16 samples."""

    seq: int
    pcm: np.ndarray  # shape (FRAME_SAMPLES,), dtype int16


ControlMessage = Open | Event | Pause | Resume | Close | Ready | Text | Gap | Error | Lag | Closed

_CLIENT_TYPES: dict[str, type] = {
    "open": Open, "event": Event, "pause": Pause, "resume": Resume, "close": Close,
}
_ENGINE_TYPES: dict[str, type] = {
    "ready": Ready, "text": Text, "gap": Gap, "error": Error, "lag": Lag, "closed": Closed,
}


def encode_control(msg: ControlMessage) -> str:
    return json.dumps(asdict(msg), separators=(",", ":"))


def json_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON text outside string literals, by a linear scan: the parser
    recurses once per level, so the depth is checked before it runs (here and in ``bridge/safe_json.py``)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_message", message)


def _parse(data: str | bytes) -> dict[str, Any]:
    if len(data) > MAX_CONTROL_BYTES:
        raise _bad(f"control message of {len(data)} bytes (limit {MAX_CONTROL_BYTES})")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise _bad(f"not UTF-8: {exc}") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise _bad(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _bad(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad("control message must be a JSON object")
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# field name -> (check, what it must be)
_RULES: dict[str, tuple[Any, str]] = {
    "seq": (lambda v: _is_int(v) and 0 <= v < SEQ_MOD, "an integer in [0, 2**32)"),
    "first_seq": (lambda v: _is_int(v) and 0 <= v < SEQ_MOD, "an integer in [0, 2**32)"),
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "filled": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "slot": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "generation": (_is_int, "an integer"),
    "behind_frames": (_is_int, "an integer"),
    "sample_rate": (_is_int, "an integer"),
    "frame_samples": (_is_int, "an integer"),
    "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 1 << 63), "null or an integer in [0, 2**63)"),
    "name": (lambda v: isinstance(v, str) and len(v) <= MAX_NAME, f"a string of at most {MAX_NAME} chars"),
    "value": (lambda v: isinstance(v, str) and len(v) <= MAX_EVENT_VALUE,
              f"a string of at most {MAX_EVENT_VALUE} chars"),
    "call_id": (lambda v: v is None or (isinstance(v, str) and len(v) <= MAX_NAME),
                f"null or a string of at most {MAX_NAME} chars"),
    "reason": (lambda v: isinstance(v, str) and len(v) <= MAX_NAME, "a string"),
    "code": (lambda v: isinstance(v, str) and len(v) <= MAX_NAME, "a string"),
    "session_id": (lambda v: isinstance(v, str) and len(v) <= MAX_NAME, "a string"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "message": (lambda v: isinstance(v, str), "a string"),
    "warnings": (lambda v: isinstance(v, list) and all(isinstance(w, str) for w in v), "a list of strings"),
}
_PERSONA_RULES: dict[str, tuple[Any, str]] = {
    "name": _RULES["name"],
    "language": (lambda v: isinstance(v, str) and 0 < len(v) <= 16, "a language tag of 1-16 chars"),
    "text_prompt": (lambda v: isinstance(v, str) and len(v) <= MAX_TEXT_PROMPT,
                    f"a string of at most {MAX_TEXT_PROMPT} chars"),
    "voice_prompt_id": (lambda v: v is None or (isinstance(v, str) and bool(ASSET_ID.match(v))),
                        "null or an asset id (a file name: letters, digits, '.', '_', '-')"),
    "adapter_id": (lambda v: v is None or (isinstance(v, str) and bool(ASSET_ID.match(v))),
                   "null or an asset id (a directory name: letters, digits, '.', '_', '-')"),
    "temp": (lambda v: v is None or (_is_number(v) and 0 <= v <= 10), "null or a number in [0, 10]"),
    "temp_text": (lambda v: v is None or (_is_number(v) and 0 <= v <= 10), "null or a number in [0, 10]"),
    "top_k": (lambda v: v is None or (_is_int(v) and 1 <= v <= 4096), "null or an integer in [1, 4096]"),
    "top_k_text": (lambda v: v is None or (_is_int(v) and 1 <= v <= 4096), "null or an integer in [1, 4096]"),
}


def _check_fields(kind: str, obj: dict[str, Any], cls: type, rules: dict[str, tuple[Any, str]]) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _bad(f"{kind}: unknown field {unknown[0][:40]!r}")
    for name, value in obj.items():
        rule = rules.get(name)
        if rule is not None and not rule[0](value):
            raise _bad(f"{kind}.{name} must be {rule[1]}")


def persona_from_dict(obj: object) -> PersonaParams:
    """A persona object from a client, every field type-checked; raises ProtocolError."""
    if not isinstance(obj, dict):
        raise _bad("persona must be an object")
    _check_fields("persona", obj, PersonaParams, _PERSONA_RULES)
    return PersonaParams(**obj)


def _decode(data: str | bytes, table: dict[str, type]) -> Any:
    obj = _parse(data)
    kind = obj.get("type")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        shown = kind[:40] if isinstance(kind, str) else kind if isinstance(kind, int | float | bool) else "?"
        raise _bad(f"unknown message type {shown!r}")
    body = {k: v for k, v in obj.items() if k != "type"}
    if cls is Open:
        persona = body.pop("persona", None)
        _check_fields("open", body, Open, _RULES)
        return Open(persona=persona_from_dict(persona if persona is not None else {}), **body)
    _check_fields(str(kind), body, cls, _RULES)
    required = [f.name for f in fields(cls)
                if f.default is MISSING and f.default_factory is MISSING and f.name not in body]
    if required:
        raise _bad(f"{kind}: missing field {required[0]!r}")
    if "warnings" in body:
        body["warnings"] = tuple(body["warnings"])
    if cls is Gap and body.get("reason") not in GAP_REASONS:
        raise _bad(f"gap.reason must be one of {', '.join(GAP_REASONS)}")
    return cls(**body)


def decode_client_control(data: str | bytes) -> Open | Event | Pause | Resume | Close:
    """Decode a JSON message sent by a client; raises ProtocolError (never anything else)."""
    return _decode(data, _CLIENT_TYPES)


def decode_engine_control(data: str | bytes) -> Ready | Text | Gap | Error | Lag | Closed:
    """Decode a JSON message sent by the engine; raises ProtocolError (never anything else)."""
    return _decode(data, _ENGINE_TYPES)


def clip_for_log(value: object, limit: int = 80) -> str:
    """A client-supplied value as it may appear in a log line: repr, at most ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def seq_after(seq: int, ref: int) -> int:
    """``seq - ref`` on the 32-bit circle, in [-2**31, 2**31): > 0 when ``seq`` comes after ``ref``."""
    return (seq - ref + (SEQ_MOD >> 1)) % SEQ_MOD - (SEQ_MOD >> 1)


def encode_audio(seq: int, pcm: np.ndarray) -> bytes:
    """Encode one frame. ``pcm`` is int16 (or float in [-1, 1], converted with clipping)."""
    if pcm.shape != (FRAME_SAMPLES,):
        raise ValueError(f"audio frame must have {FRAME_SAMPLES} samples, got shape {pcm.shape}")
    if pcm.dtype != np.int16:
        pcm = float_to_int16(pcm)
    return _AUDIO_HEADER.pack(AUDIO_KIND, seq % SEQ_MOD) + pcm.astype("<i2", copy=False).tobytes()


def decode_audio(data: bytes) -> AudioFrame:
    """Decode one binary frame; raises ProtocolError('bad_frame') on wrong size or kind."""
    if len(data) != AUDIO_FRAME_BYTES:
        raise ProtocolError(
            "bad_frame", f"audio frame must be {AUDIO_FRAME_BYTES} bytes (80 ms at 24 kHz), got {len(data)}"
        )
    kind, seq = _AUDIO_HEADER.unpack_from(data)
    if kind != AUDIO_KIND:
        raise ProtocolError("bad_frame", f"unknown binary frame kind {kind:#04x}")
    pcm = np.frombuffer(data, dtype="<i2", offset=_AUDIO_HEADER.size).astype(np.int16)
    return AudioFrame(seq=seq, pcm=pcm)


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] → int16, rounded half to even and clipped (overshoot must not wrap around)."""
    # Scale by 32768 (the inverse of int16_to_float) so int16 -> float -> int16 round-trips bit-exactly.
    # In place on one temporary with the ufuncs themselves: np.clip's Python wrappers took as long as the
    # arithmetic on a frame (7.5 -> 5 us per 640 samples), and this runs for every frame each way.
    scaled = np.multiply(np.asarray(x, dtype=np.float32), np.float32(32768.0))
    np.rint(scaled, out=scaled)
    np.minimum(scaled, np.float32(32767.0), out=scaled)
    np.maximum(scaled, np.float32(-32768.0), out=scaled)
    return scaled.astype(np.int16)


def int16_to_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / 32768.0


# -- multiplexed transport (GET /mux) ----------------------------------------------------------------------


def encode_mux_text(channel: int, text: str) -> str:
    """A control message (already encoded) of one channel."""
    return f"{channel} {text}"


def decode_mux_text(data: str) -> tuple[int, str]:
    """(channel, control message) of a text message; ProtocolError('bad_message') when it has no channel."""
    head, sep, _ = data[:12].partition(" ")
    if not sep or not head.isascii() or not head.isdigit() or int(head) > MUX_MAX_CHANNEL:
        raise _bad("a multiplexed text message starts with its channel number and a space")
    return int(head), data[len(head) + 1 :]


def encode_mux_audio(records: list[tuple[int, bytes]]) -> bytes:
    """One binary message of (channel, encoded audio frame) records, at most MUX_MAX_FRAMES."""
    if not 0 < len(records) <= MUX_MAX_FRAMES:
        raise ValueError(f"a multiplexed audio message holds 1..{MUX_MAX_FRAMES} frames, got {len(records)}")
    parts = [_MUX_HEADER.pack(MUX_AUDIO_KIND, len(records))]
    for channel, frame in records:
        if len(frame) != AUDIO_FRAME_BYTES:
            raise ValueError(f"audio frame must be {AUDIO_FRAME_BYTES} bytes, got {len(frame)}")
        parts.append(_MUX_CHANNEL.pack(channel))
        parts.append(frame)
    return b"".join(parts)


def decode_mux_audio(data: bytes) -> list[tuple[int, bytes]]:
    """The (channel, audio frame bytes) records of a binary message; ProtocolError('bad_frame') on a wrong
    kind, count or size (each frame is checked by :func:`decode_audio` where its channel reads it)."""
    if len(data) < _MUX_HEADER.size:
        raise ProtocolError("bad_frame", f"multiplexed audio message of {len(data)} bytes")
    kind, count = _MUX_HEADER.unpack_from(data)
    if kind != MUX_AUDIO_KIND:
        raise ProtocolError("bad_frame", f"unknown multiplexed binary kind {kind:#04x}")
    if not 0 < count <= MUX_MAX_FRAMES or len(data) != _MUX_HEADER.size + count * MUX_RECORD_BYTES:
        raise ProtocolError(
            "bad_frame", f"multiplexed audio message of {len(data)} bytes does not hold {count} frames")
    view = memoryview(data)
    out = []
    pos = _MUX_HEADER.size
    for _ in range(count):
        (channel,) = _MUX_CHANNEL.unpack_from(data, pos)
        start = pos + _MUX_CHANNEL.size
        out.append((channel, bytes(view[start : start + AUDIO_FRAME_BYTES])))
        pos = start + AUDIO_FRAME_BYTES
    return out
