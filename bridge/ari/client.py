"""A thin typed asyncio ARI client on aiohttp: REST calls and the event WebSocket.

Why not asyncari: it is built on anyio/trio (asyncswagger11) and generates its client at run time from
the swagger files Asterisk serves, so calls are untyped and its task model fights the asyncio
TaskGroups the rest of the bridge uses. The subset we need is small; every operation used is listed
in ``OPERATIONS`` and checked against Asterisk's own swagger files by tests/ari/test_contract.py.

Events: ``GET /ari/events?app=<app>&subscribeAll=true``. subscribeAll is needed because the caller's
``ChannelDestroyed`` (after StasisEnd) is only delivered to subscribed apps (see ARCHITECTURE.md).
``EventStream`` reconnects with exponential backoff and calls ``on_connected`` after every
(re)connection so the controller can reconcile what happened while it was deaf.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from bridge.ari.errors import AriError, AriUnavailable, error_for_status
from bridge.ari.models import (
    AriEvent,
    AriEventError,
    Bridge,
    Channel,
    Playback,
    UnknownEvent,
    parse_event,
)
from bridge.backoff import Backoff
from bridge.config import AriSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Operation:
    """One ARI REST operation this client can issue (method, swagger path, query parameter names)."""

    method: str
    path: str
    query: tuple[str, ...] = ()


OPERATIONS: dict[str, Operation] = {
    "list_channels": Operation("GET", "/channels"),
    "get_channel": Operation("GET", "/channels/{channelId}"),
    "answer": Operation("POST", "/channels/{channelId}/answer"),
    "hangup": Operation("DELETE", "/channels/{channelId}", ("reason",)),
    "originate": Operation(
        "POST", "/channels",
        ("endpoint", "app", "appArgs", "channelId", "callerId", "timeout", "originator"),
    ),
    "get_channel_var": Operation("GET", "/channels/{channelId}/variable", ("variable",)),
    "hold": Operation("POST", "/channels/{channelId}/hold"),
    "unhold": Operation("DELETE", "/channels/{channelId}/hold"),
    "start_moh": Operation("POST", "/channels/{channelId}/moh", ("mohClass",)),
    "stop_moh": Operation("DELETE", "/channels/{channelId}/moh"),
    "play": Operation("POST", "/channels/{channelId}/play", ("media", "playbackId")),
    "external_media": Operation(
        "POST",
        "/channels/externalMedia",
        ("channelId", "app", "external_host", "encapsulation", "transport", "format", "direction"),
    ),
    "list_bridges": Operation("GET", "/bridges"),
    "create_bridge": Operation("POST", "/bridges", ("type", "bridgeId", "name")),
    "add_channel": Operation("POST", "/bridges/{bridgeId}/addChannel", ("channel",)),
    "destroy_bridge": Operation("DELETE", "/bridges/{bridgeId}"),
    "subscribe": Operation("POST", "/applications/{applicationName}/subscription", ("eventSource",)),
    "events": Operation("GET", "/events", ("app", "subscribeAll")),
    # aziza-admin provision asterisk --reload
    "asterisk_info": Operation("GET", "/asterisk/info", ("only",)),
    "reload_module": Operation("PUT", "/asterisk/modules/{moduleName}"),
    "list_endpoints_by_tech": Operation("GET", "/endpoints/{tech}"),
}

HANGUP_REASONS = ("normal", "busy", "congestion", "no_answer", "rejected", "failure")


class AriClient:
    """REST side. Owns its aiohttp session unless one is given; close with ``await close()``."""

    def __init__(
        self, settings: AriSettings, *, session: aiohttp.ClientSession | None = None, timeout_s: float = 5.0
    ) -> None:
        self.settings = settings
        self.base_url = settings.url.rstrip("/") + "/ari"
        token = base64.b64encode(f"{settings.username}:{settings.password}".encode()).decode("ascii")
        self.auth_headers = {"Authorization": f"Basic {token}"}
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.requests_made = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.auth_headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> AriClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, op_name: str, path_params: dict[str, str] | None = None, **query: Any) -> Any:
        op = OPERATIONS[op_name]
        unknown = set(query) - set(op.query)
        if unknown:
            raise ValueError(f"{op_name}: parameters {sorted(unknown)} are not part of the operation")
        path = op.path.format(**{k: quote(v, safe="") for k, v in (path_params or {}).items()})
        params = {k: _query_value(v) for k, v in query.items() if v is not None}
        self.requests_made += 1
        try:
            async with self.session.request(
                op.method, self.base_url + path, params=params, timeout=self._timeout
            ) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise error_for_status(resp.status, op.method, path, _error_message(body))
                if not body:
                    return None
                try:
                    return json.loads(body)
                except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
                    raise AriError(op.method, path, f"undecodable response body: {exc}", resp.status) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AriUnavailable(op.method, path, f"{type(exc).__name__}: {exc}") from exc

    # ---- channels ----
    async def list_channels(self) -> list[Channel]:
        return [Channel.from_json(c) for c in _list(await self._call("list_channels"))]

    async def get_channel(self, channel_id: str) -> Channel:
        return Channel.from_json(await self._call("get_channel", {"channelId": channel_id}))

    async def answer(self, channel_id: str) -> None:
        await self._call("answer", {"channelId": channel_id})

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        if reason not in HANGUP_REASONS:
            raise ValueError(f"hangup reason {reason!r} not one of {HANGUP_REASONS}")
        await self._call("hangup", {"channelId": channel_id}, reason=reason)

    async def originate(
        self, *, endpoint: str, app: str, app_args: str, channel_id: str, caller_id: str | None = None,
        timeout_s: int = 30, originator: str | None = None,
    ) -> Channel:
        """Dial ``endpoint``; once it answers it enters Stasis(``app``, ``app_args``) (StasisStart)."""
        data = await self._call(
            "originate", endpoint=endpoint, app=app, appArgs=app_args, channelId=channel_id,
            callerId=caller_id or None, timeout=timeout_s, originator=originator,
        )
        return Channel.from_json(data)

    async def get_channel_var(self, channel_id: str, variable: str) -> str:
        """A channel variable, or a dialplan function evaluated on the channel (``NAME(args)``)."""
        data = await self._call("get_channel_var", {"channelId": channel_id}, variable=variable)
        value = data.get("value") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise AriEventError(f"variable {variable}: expected {{'value': string}}, got {data!r}")
        return value

    async def hold(self, channel_id: str) -> None:
        await self._call("hold", {"channelId": channel_id})

    async def unhold(self, channel_id: str) -> None:
        await self._call("unhold", {"channelId": channel_id})

    async def start_moh(self, channel_id: str, moh_class: str | None = None) -> None:
        await self._call("start_moh", {"channelId": channel_id}, mohClass=moh_class or None)

    async def stop_moh(self, channel_id: str) -> None:
        await self._call("stop_moh", {"channelId": channel_id})

    async def play(self, channel_id: str, media: str, playback_id: str) -> Playback:
        data = await self._call("play", {"channelId": channel_id}, media=media, playbackId=playback_id)
        return Playback.from_json(data)

    async def external_media(
        self, *, channel_id: str, app: str, external_host: str, audio_format: str = "ulaw"
    ) -> Channel:
        data = await self._call(
            "external_media",
            channelId=channel_id,
            app=app,
            external_host=external_host,
            encapsulation="rtp",
            transport="udp",
            format=audio_format,
            direction="both",
        )
        return Channel.from_json(data)

    # ---- bridges ----
    async def list_bridges(self) -> list[Bridge]:
        return [Bridge.from_json(b) for b in _list(await self._call("list_bridges"))]

    async def create_bridge(self, bridge_id: str, *, name: str | None = None) -> Bridge:
        data = await self._call("create_bridge", type="mixing", bridgeId=bridge_id, name=name)
        return Bridge.from_json(data)

    async def add_channel(self, bridge_id: str, channel_ids: list[str]) -> None:
        await self._call("add_channel", {"bridgeId": bridge_id}, channel=",".join(channel_ids))

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self._call("destroy_bridge", {"bridgeId": bridge_id})

    # ---- asterisk ----
    async def asterisk_info(self, only: str = "system") -> dict[str, Any]:
        data = await self._call("asterisk_info", only=only)
        if not isinstance(data, dict):
            raise AriEventError(f"asterisk info: expected an object, got {type(data).__name__}")
        return data

    async def reload_module(self, module: str) -> None:
        await self._call("reload_module", {"moduleName": module})

    async def list_endpoints(self, tech: str) -> list[dict[str, Any]]:
        data = _list(await self._call("list_endpoints_by_tech", {"tech": tech}))
        return [e for e in data if isinstance(e, dict)]

    # ---- applications ----
    async def subscribe(self, app: str, event_source: str) -> None:
        await self._call("subscribe", {"applicationName": app}, eventSource=event_source)

    def events_url(self) -> str:
        ws_base = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return f"{ws_base}/events?app={quote(self.settings.app)}&subscribeAll=true"


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _list(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise AriEventError(f"expected a JSON list, got {type(data).__name__}")
    return data


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body.strip()[:200] or "(no body)"
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    return body.strip()[:200]


@dataclass
class StreamStats:
    connects: int = 0
    disconnects: int = 0
    events: int = 0
    unknown_events: int = 0
    bad_messages: int = 0


class EventStream:
    """The ARI event WebSocket, kept connected: reconnects with backoff for as long as ``run`` runs.

    ``on_event`` is awaited for each event in arrival order (it must not block for long: the
    controller only routes events to per-call queues). ``on_connected`` is awaited after each
    successful connection, before the first event of that connection is delivered.
    """

    def __init__(
        self,
        client: AriClient,
        on_event: Callable[[AriEvent], Awaitable[None]],
        *,
        on_connected: Callable[[], Awaitable[None]] | None = None,
        on_disconnected: Callable[[], Awaitable[None]] | None = None,
        heartbeat_s: float = 10.0,
    ) -> None:
        self.client = client
        self._on_event = on_event
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._heartbeat_s = heartbeat_s
        settings = client.settings
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.connected = asyncio.Event()
        self.stats = StreamStats()
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    async def run(self) -> None:
        """Connect, deliver, reconnect — until cancelled."""
        while True:
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, AriError) as exc:
                log.warning("ARI event socket: %s: %s", type(exc).__name__, exc)
            except Exception:  # a bug in a handler must not end the app's only event stream
                log.exception("ARI event socket: unexpected error; reconnecting")
            if self.connected.is_set():
                self.connected.clear()
                self.stats.disconnects += 1
                if self._on_disconnected is not None:
                    await self._on_disconnected()
            await asyncio.sleep(self.backoff.next_delay())

    async def _connect_once(self) -> None:
        url = self.client.events_url()
        async with self.client.session.ws_connect(
            url, headers=self.client.auth_headers, heartbeat=self._heartbeat_s, autoping=True
        ) as ws:
            self._ws = ws
            try:
                self.connected.set()
                self.stats.connects += 1
                self.backoff.reset()
                log.info("ARI event socket connected (%s)", url)
                if self._on_connected is not None:
                    await self._on_connected()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await self._deliver(msg.data)
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                        break
            finally:
                self._ws = None

    async def _deliver(self, text: str) -> None:
        try:
            event = parse_event(json.loads(text))
        except (ValueError, RecursionError, AriEventError) as exc:  # RecursionError: absurd nesting
            self.stats.bad_messages += 1
            log.warning("ARI event dropped: %s", exc)
            return
        self.stats.events += 1
        if isinstance(event, UnknownEvent):
            self.stats.unknown_events += 1
        await self._on_event(event)
