"""ARI resources and events as dataclasses, parsed sans-IO from the JSON Asterisk sends.

Field names follow the swagger models in ``ari-api-docs/`` (channels.json, bridges.json, events.json)
exactly; ``tests/ari/test_contract.py`` checks every field read here against those files. Only the
fields the controller reads are kept; unknown event types parse to ``UnknownEvent`` (counted, never an
error), a known event with a missing/mistyped required field raises ``AriEventError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


class AriEventError(ValueError):
    """A message from Asterisk that is not a well-formed ARI event."""


def _obj(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise AriEventError(f"{what}: expected an object, got {type(data).__name__}")
    return data


def _str(data: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise AriEventError(f"{what}.{key}: expected a string, got {value!r}")
    return value


def _int(data: dict[str, Any], key: str, what: str, *, default: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AriEventError(f"{what}.{key}: expected an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class CallerId:
    SWAGGER_MODEL: ClassVar[str] = "CallerID"
    name: str
    number: str

    @classmethod
    def from_json(cls, data: Any) -> CallerId:
        obj = _obj(data, "CallerID")
        return cls(name=_str(obj, "name", "CallerID"), number=_str(obj, "number", "CallerID"))


@dataclass(frozen=True)
class DialplanCep:
    SWAGGER_MODEL: ClassVar[str] = "DialplanCEP"
    context: str
    exten: str
    priority: int
    app_name: str
    app_data: str

    @classmethod
    def from_json(cls, data: Any) -> DialplanCep:
        obj = _obj(data, "DialplanCEP")
        return cls(
            context=_str(obj, "context", "DialplanCEP"),
            exten=_str(obj, "exten", "DialplanCEP"),
            priority=_int(obj, "priority", "DialplanCEP"),
            # app_name/app_data are required in the model but older Asterisks omit them.
            app_name=_str(obj, "app_name", "DialplanCEP", required=False),
            app_data=_str(obj, "app_data", "DialplanCEP", required=False),
        )


@dataclass(frozen=True)
class Channel:
    SWAGGER_MODEL: ClassVar[str] = "Channel"
    id: str
    name: str
    state: str
    caller: CallerId
    dialplan: DialplanCep
    channelvars: dict[str, str] = field(default_factory=dict)

    @property
    def is_unicast_rtp(self) -> bool:
        """An externalMedia leg (ours or an orphan), never a caller."""
        return self.name.startswith("UnicastRTP/")

    @classmethod
    def from_json(cls, data: Any) -> Channel:
        obj = _obj(data, "Channel")
        raw_vars = obj.get("channelvars") or {}
        if not isinstance(raw_vars, dict):
            raise AriEventError("Channel.channelvars: expected an object")
        return cls(
            id=_str(obj, "id", "Channel"),
            name=_str(obj, "name", "Channel"),
            state=_str(obj, "state", "Channel"),
            caller=CallerId.from_json(obj.get("caller")),
            dialplan=DialplanCep.from_json(obj.get("dialplan")),
            channelvars={str(k): "" if v is None else str(v) for k, v in raw_vars.items()},
        )


@dataclass(frozen=True)
class Bridge:
    SWAGGER_MODEL: ClassVar[str] = "Bridge"
    id: str
    technology: str
    bridge_type: str
    channels: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Any) -> Bridge:
        obj = _obj(data, "Bridge")
        chans = obj.get("channels")
        if not isinstance(chans, list) or not all(isinstance(c, str) for c in chans):
            raise AriEventError("Bridge.channels: expected a list of strings")
        return cls(
            id=_str(obj, "id", "Bridge"),
            technology=_str(obj, "technology", "Bridge"),
            bridge_type=_str(obj, "bridge_type", "Bridge"),
            channels=tuple(chans),
        )


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AriEvent:
    """Fields of the swagger ``Event`` model every event carries."""

    type: str
    application: str
    timestamp: str


@dataclass(frozen=True)
class ChannelEvent(AriEvent):
    channel: Channel


@dataclass(frozen=True)
class StasisStart(ChannelEvent):
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class StasisEnd(ChannelEvent):
    pass


@dataclass(frozen=True)
class ChannelHangupRequest(ChannelEvent):
    cause: int = 0


@dataclass(frozen=True)
class ChannelDestroyed(ChannelEvent):
    cause: int = 0
    cause_txt: str = ""


@dataclass(frozen=True)
class ChannelDtmfReceived(ChannelEvent):
    digit: str = ""
    duration_ms: int = 0


@dataclass(frozen=True)
class ChannelHold(ChannelEvent):
    musicclass: str = ""


@dataclass(frozen=True)
class ChannelUnhold(ChannelEvent):
    pass


@dataclass(frozen=True)
class ChannelStateChange(ChannelEvent):
    pass


@dataclass(frozen=True)
class ChannelEnteredBridge(ChannelEvent):
    bridge: Bridge | None = None


@dataclass(frozen=True)
class ChannelLeftBridge(ChannelEvent):
    bridge: Bridge | None = None


@dataclass(frozen=True)
class Playback:
    SWAGGER_MODEL: ClassVar[str] = "Playback"
    id: str
    media_uri: str
    target_uri: str  # "channel:<id>" for a channel playback
    state: str

    @classmethod
    def from_json(cls, data: Any) -> Playback:
        obj = _obj(data, "Playback")
        return cls(*(_str(obj, key, "Playback") for key in ("id", "media_uri", "target_uri", "state")))

    @property
    def channel_id(self) -> str | None:
        kind, _, target = self.target_uri.partition(":")
        return target if kind == "channel" and target else None


@dataclass(frozen=True)
class PlaybackFinished(AriEvent):
    playback: Playback


@dataclass(frozen=True)
class Dial(AriEvent):
    """A dialing attempt's state changed (the outcome of an originate: ANSWER, BUSY, NOANSWER, ...).
    Not a ChannelEvent: the dialed channel is ``peer``."""

    peer: Channel
    dialstatus: str


@dataclass(frozen=True)
class UnknownEvent(AriEvent):
    """Any event type this app does not act on; kept raw for logs."""

    raw: dict[str, Any] = field(default_factory=dict)


KNOWN_EVENTS: dict[str, type[ChannelEvent]] = {
    cls.__name__: cls
    for cls in (
        StasisStart,
        StasisEnd,
        ChannelHangupRequest,
        ChannelDestroyed,
        ChannelDtmfReceived,
        ChannelHold,
        ChannelUnhold,
        ChannelStateChange,
        ChannelEnteredBridge,
        ChannelLeftBridge,
    )
}


def parse_event(message: Any) -> AriEvent:
    """One decoded WebSocket JSON message -> an event dataclass. Raises AriEventError when malformed."""
    obj = _obj(message, "Message")
    kind = _str(obj, "type", "Message")
    base: dict[str, Any] = {
        "type": kind,
        "application": _str(obj, "application", kind, required=False),
        "timestamp": _str(obj, "timestamp", kind, required=False),
    }
    if kind == "PlaybackFinished":
        return PlaybackFinished(**base, playback=Playback.from_json(obj.get("playback")))
    if kind == "Dial":
        return Dial(**base, peer=Channel.from_json(obj.get("peer")), dialstatus=_str(obj, "dialstatus", kind))
    cls = KNOWN_EVENTS.get(kind)
    if cls is None:
        return UnknownEvent(**base, raw=obj)
    extra: dict[str, Any] = {"channel": Channel.from_json(obj.get("channel"))}
    if cls is StasisStart:
        args = obj.get("args")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise AriEventError("StasisStart.args: expected a list of strings")
        extra["args"] = tuple(args)
    elif cls is ChannelHangupRequest:
        extra["cause"] = _int(obj, "cause", kind, default=0)
    elif cls is ChannelDestroyed:
        extra["cause"] = _int(obj, "cause", kind)
        extra["cause_txt"] = _str(obj, "cause_txt", kind)
    elif cls is ChannelDtmfReceived:
        extra["digit"] = _str(obj, "digit", kind)
        extra["duration_ms"] = _int(obj, "duration_ms", kind)
    elif cls is ChannelHold:
        extra["musicclass"] = _str(obj, "musicclass", kind, required=False)
    elif cls in (ChannelEnteredBridge, ChannelLeftBridge):
        extra["bridge"] = Bridge.from_json(obj.get("bridge")) if obj.get("bridge") is not None else None
    return cls(**base, **extra)
