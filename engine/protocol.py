"""Wire protocol between an engine client (the bridge, a browser relay, a benchmark) and aziza-engine.

Transport: one WebSocket per session, ``GET /session`` on the engine's aiohttp server (TCP on loopback by
default, or a Unix socket). Sans-IO: this module only encodes and decodes messages.

Control messages are JSON text frames with a ``type`` field:

  client -> engine  ``open``   {persona, call_id}            first message, exactly once
                    ``event``  {name, value}                 e.g. name="dtmf", value="5"
                    ``pause`` / ``resume``                   hold: no frames consumed or produced
                    ``close``                                 end the session, free the slot
  engine -> client  ``ready``  {session_id, slot, generation, sample_rate, frame_samples}
                    ``text``   {seq, text}                    agent text decoded with output frame ``seq``
                    ``error``  {code, message}               code in ERROR_CODES; "full" refuses an open
                    ``lag``    {behind_frames}                the session fell behind real time
                    ``closed`` {reason}

Audio is a binary frame: 1 byte kind (AUDIO), 4 bytes big-endian frame sequence number, then exactly
FRAME_SAMPLES little-endian int16 samples at SAMPLE_RATE (80 ms of 24 kHz mono). The engine numbers its
output frames from 0 per session; output frame k is the model's answer to the tick that consumed input k.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
FRAME_MS = 80
AUDIO_KIND = 0x01
_AUDIO_HEADER = struct.Struct(">BI")
AUDIO_FRAME_BYTES = _AUDIO_HEADER.size + 2 * FRAME_SAMPLES

ERROR_CODES = (
    "full",  # no free slot: the open is refused
    "bad_message",  # undecodable JSON / unknown type / wrong field types
    "bad_frame",  # binary frame of the wrong size or kind
    "protocol",  # a message out of order (audio before open, second open...)
    "unknown_persona",
    "internal",  # the backend failed; the session is closed, the engine lives on
    "idle_timeout",
)


class ProtocolError(ValueError):
    """A peer sent something this protocol does not allow. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PersonaParams:
    """What a session needs to know of its persona; resolved by the bridge from the database."""

    name: str = "default"
    language: str = "en"
    text_prompt: str = ""
    voice_prompt_path: str | None = None
    lora_path: str | None = None


@dataclass(frozen=True)
class Open:
    persona: PersonaParams = field(default_factory=PersonaParams)
    call_id: str | None = None
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
    type: Literal["ready"] = "ready"


@dataclass(frozen=True)
class Text:
    seq: int
    text: str
    type: Literal["text"] = "text"


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


ControlMessage = Open | Event | Pause | Resume | Close | Ready | Text | Error | Lag | Closed

_CLIENT_TYPES: dict[str, type] = {
    "open": Open, "event": Event, "pause": Pause, "resume": Resume, "close": Close,
}
_ENGINE_TYPES: dict[str, type] = {"ready": Ready, "text": Text, "error": Error, "lag": Lag, "closed": Closed}


def encode_control(msg: ControlMessage) -> str:
    return json.dumps(asdict(msg), separators=(",", ":"))


def _decode(data: str | bytes, table: dict[str, type]) -> Any:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_message", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "control message must be a JSON object")
    kind = obj.get("type")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("bad_message", f"unknown message type {kind!r}")
    try:
        if cls is Open:
            persona = obj.get("persona") or {}
            if not isinstance(persona, dict):
                raise TypeError("persona must be an object")
            call_id = obj.get("call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise TypeError("call_id must be a string")
            return Open(persona=PersonaParams(**persona), call_id=call_id)
        fields = {k: v for k, v in obj.items() if k != "type"}
        msg = cls(**fields)
    except TypeError as exc:
        raise ProtocolError("bad_message", f"bad fields for {kind!r}: {exc}") from None
    _check_field_types(msg)
    return msg


def _check_field_types(msg: Any) -> None:
    for name, expected in (("seq", int), ("slot", int), ("generation", int), ("behind_frames", int)):
        if hasattr(msg, name) and not isinstance(getattr(msg, name), expected):
            raise ProtocolError("bad_message", f"{name} must be an integer")
    for name in ("name", "value", "text", "code", "message", "reason", "session_id"):
        if hasattr(msg, name) and not isinstance(getattr(msg, name), str):
            raise ProtocolError("bad_message", f"{name} must be a string")


def decode_client_control(data: str | bytes) -> Open | Event | Pause | Resume | Close:
    """Decode a JSON message sent by a client; raises ProtocolError."""
    return _decode(data, _CLIENT_TYPES)


def decode_engine_control(data: str | bytes) -> Ready | Text | Error | Lag | Closed:
    """Decode a JSON message sent by the engine; raises ProtocolError."""
    return _decode(data, _ENGINE_TYPES)


def encode_audio(seq: int, pcm: np.ndarray) -> bytes:
    """Encode one frame. ``pcm`` is int16 (or float in [-1, 1], converted with clipping)."""
    if pcm.shape != (FRAME_SAMPLES,):
        raise ValueError(f"audio frame must have {FRAME_SAMPLES} samples, got shape {pcm.shape}")
    if pcm.dtype != np.int16:
        pcm = float_to_int16(pcm)
    return _AUDIO_HEADER.pack(AUDIO_KIND, seq & 0xFFFFFFFF) + pcm.astype("<i2", copy=False).tobytes()


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
    # Scale by 32768 (the inverse of int16_to_float) so int16 -> float -> int16 round-trips bit-exactly.
    return np.clip(np.round(np.asarray(x, dtype=np.float32) * 32768.0), -32768, 32767).astype(np.int16)


def int16_to_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / 32768.0
