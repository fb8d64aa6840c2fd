"""A fake Asterisk for tests: the ARI REST subset the bridge uses plus the ``/ari/events`` WebSocket.

Every response and event is shaped by the swagger models in ``ari-api-docs/`` (test_contract.py
checks them). It keeps channel and bridge state, behaves like Asterisk 22 where it matters (the
externalMedia channel enters Stasis a few ms after the REST answer, and ``addChannel`` before that is
a 422; hang-ups emit ``ChannelHangupRequest, StasisEnd, ChannelLeftBridge, ChannelDestroyed``;
events sent while no WebSocket is connected are lost), and drives a real ``SimLeg`` UDP socket per
externalMedia channel that plays speech as ulaw RTP at 20 ms and records what comes back.
Test hooks: ``originate_call``, ``hangup_caller``, ``send_dtmf``, ``far_end_hold``, ``drop_websocket``,
``vanish_channel`` (gone without events, as while disconnected), ``fail`` (inject HTTP errors) and
``delay`` (answer a route late, after its events). Transfers: ``POST /channels`` (originate) dials an
endpoint whose fate ``dial_outcomes`` decides (answer, busy, no_answer, unavailable; Asterisk's Dial
events and causes), and ``DIALPLAN_EXISTS`` answers from ``dialplan``. ``modules`` and ``endpoints``
serve ``aziza-admin provision asterisk --reload``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from bridge.media.simleg import SimLeg

HANGUP_REASONS = (
    "normal", "busy", "congestion", "no_answer", "timeout", "rejected", "unallocated",
    "normal_unspecified", "number_incomplete", "codec_mismatch", "interworking", "failure",
    "answered_elsewhere",
)
EXTERNAL_MEDIA_FORMATS = ("ulaw", "alaw", "slin16", "slin", "g722")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


@dataclass
class FakeChannel:
    id: str
    name: str
    caller_number: str
    exten: str
    context: str = "from-trunk"
    state: str = "Ring"
    in_stasis: bool = True
    app_data: str = ""
    channelvars: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    answered: bool = False
    held: bool = False
    moh_class: str | None = None
    bridge_id: str | None = None
    hangup_reason: str | None = None
    originated_to: str | None = None  # the endpoint an originate dialled

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "protocol_id": "" if self.name.startswith("UnicastRTP/") else f"{self.id}@fake",
            "name": self.name,
            "state": self.state,
            "caller": {"name": "", "number": self.caller_number},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {
                "context": self.context,
                "exten": self.exten,
                "priority": 1,
                "app_name": "Stasis" if self.in_stasis else "",
                "app_data": self.app_data if self.in_stasis else "",
            },
            "creationtime": self.created,
            "language": "en",
        }
        if self.channelvars:
            out["channelvars"] = dict(self.channelvars)
        return out


@dataclass
class FakeBridge:
    id: str
    name: str
    bridge_type: str = "mixing"
    channels: list[str] = field(default_factory=list)
    created: str = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "technology": "simple_bridge",
            "bridge_type": self.bridge_type,
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": self.name,
            "channels": list(self.channels),
            "creationtime": self.created,
            "video_mode": "none",
        }


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    route: str  # swagger path, e.g. /channels/{channelId}/answer
    path: str
    query: dict[str, str]
    status: int


class FakeAsterisk:
    def __init__(
        self,
        *,
        app: str = "aziza",
        username: str = "aziza",
        password: str = "aziza",
        speech_8k: np.ndarray | None = None,
        media_stasis_delay_s: float = 0.005,
    ) -> None:
        self.app = app
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._auth_header = f"Basic {token}"
        self.speech_8k = speech_8k if speech_8k is not None else np.zeros(8000, dtype=np.int16)
        self.media_stasis_delay_s = media_stasis_delay_s
        self.channels: dict[str, FakeChannel] = {}
        self.bridges: dict[str, FakeBridge] = {}
        self.gone_channels: dict[str, FakeChannel] = {}  # hung up / destroyed, kept for asserts
        self.requests: list[LoggedRequest] = []
        self.events_sent: list[dict[str, Any]] = []
        self.events_lost = 0
        self.ws_connects = 0
        self.ws_params: list[dict[str, str]] = []
        self.legs: dict[str, SimLeg] = {}
        self.stasis_start_wall: dict[str, float] = {}  # caller id -> wall time its StasisStart was sent
        self.deleted_at: dict[str, float] = {}  # channel/bridge id -> wall time its DELETE arrived
        self.accept_websocket = True
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._delays: dict[tuple[str, str], float] = {}
        self._ws: set[web.WebSocketResponse] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        # Asterisk's uniqueids are epoch.sequence; a random epoch keeps call ids unique across fakes
        # (call records of every test share one database).
        self._epoch = random.randrange(1_000_000_000, 1_999_999_999)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.ws_connected = asyncio.Event()
        self._legs_running: set[str] = set()
        self.media_of: dict[str, str] = {}
        self.played: list[tuple[str, str]] = []  # (channel id, media) of each playback
        self.playback_s = 0.05  # caller channel id -> media channel id bridged with it
        # Transfers: endpoint -> "answer" | "busy" | "no_answer" | "unavailable" (default "answer"), how
        # long a dialled endpoint rings first, and the (context, extension) pairs the dialplan has.
        self.dial_outcomes: dict[str, str] = {}
        self.ring_s = 0.05
        self.dialplan: set[tuple[str, str]] = {("operators", "100")}
        self.originates: list[dict[str, str]] = []
        self.modules = {"res_pjsip.so", "pbx_config.so", "res_ari.so", "res_rtp_asterisk.so",
                        "res_musiconhold.so"}
        self.reloaded: list[str] = []
        self.endpoints: list[dict[str, Any]] = []

    # ---- server lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/ari/events", self._events_ws)
        r.add_get("/ari/channels", self._list_channels)
        r.add_post("/ari/channels/externalMedia", self._external_media)
        r.add_get("/ari/channels/{channelId}", self._get_channel)
        r.add_delete("/ari/channels/{channelId}", self._hangup)
        r.add_post("/ari/channels/{channelId}/answer", self._answer)
        r.add_post("/ari/channels", self._originate)
        r.add_get("/ari/channels/{channelId}/variable", self._get_variable)
        r.add_get("/ari/asterisk/info", self._asterisk_info)
        r.add_put("/ari/asterisk/modules/{moduleName}", self._reload_module)
        r.add_get("/ari/endpoints/{tech}", self._endpoints_by_tech)
        r.add_post("/ari/channels/{channelId}/hold", self._hold)
        r.add_delete("/ari/channels/{channelId}/hold", self._unhold)
        r.add_post("/ari/channels/{channelId}/moh", self._start_moh)
        r.add_post("/ari/channels/{channelId}/play", self._play)
        r.add_delete("/ari/channels/{channelId}/moh", self._stop_moh)
        r.add_get("/ari/bridges", self._list_bridges)
        r.add_post("/ari/bridges", self._create_bridge)
        r.add_delete("/ari/bridges/{bridgeId}", self._destroy_bridge)
        r.add_post("/ari/bridges/{bridgeId}/addChannel", self._add_channel)
        r.add_post("/ari/applications/{applicationName}/subscription", self._subscribe)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockname = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.url = f"http://{host}:{sockname[1]}"
        return self.url

    async def stop(self) -> None:
        for ws in list(self._ws):
            await ws.close()
        for task in list(self._tasks):
            task.cancel()
        for leg in self.legs.values():
            leg.stop()
            leg.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeAsterisk:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- test hooks --------------------------------------------------------------------------------

    def fail(self, method: str, route: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests to ``method route`` (swagger path) answer ``status``."""
        self._failures.setdefault((method.upper(), route), []).extend([status] * times)

    def delay(self, method: str, route: str, seconds: float) -> None:
        """Answers to ``method route`` leave ``seconds`` after the request was handled (its events are
        sent at once), as a loaded Asterisk may answer a REST call after the events it caused."""
        self._delays[(method.upper(), route)] = seconds

    async def originate_call(self, did: str, caller: str = "+15550009999") -> str:
        """A SIP caller dialled ``did``; the dialplan runs ``Stasis(aziza,<did>)``."""
        n = next(self._ids)
        chan = FakeChannel(
            id=f"{self._epoch}.{n}", name=f"PJSIP/trunk-{n:08x}", caller_number=caller, exten=did,
            app_data=f"{self.app},{did}",
        )
        self.channels[chan.id] = chan
        self.stasis_start_wall[chan.id] = time.time()
        await self._emit("StasisStart", channel=chan, args=[did])
        return chan.id

    async def hangup_caller(self, channel_id: str, cause: int = 16) -> None:
        """The caller hangs up (documented order of events)."""
        chan = self.channels[channel_id]
        await self._emit("ChannelHangupRequest", channel=chan, cause=cause)
        await self._destroy_channel(chan, cause=cause)

    async def send_dtmf(self, channel_id: str, digit: str, duration_ms: int = 120) -> None:
        await self._emit("ChannelDtmfReceived", channel=self.channels[channel_id], digit=digit,
                         duration_ms=duration_ms)

    async def far_end_hold(self, channel_id: str, held: bool = True) -> None:
        chan = self.channels[channel_id]
        if held:
            await self._emit("ChannelHold", channel=chan, musicclass="default")
        else:
            await self._emit("ChannelUnhold", channel=chan)

    async def drop_websocket(self, *, refuse_reconnect: bool = False) -> None:
        self.accept_websocket = not refuse_reconnect
        self.ws_connected.clear()
        for ws in list(self._ws):
            await ws.close(code=1001, message=b"fake asterisk restart")

    def allow_websocket(self) -> None:
        self.accept_websocket = True

    async def vanish_channel(self, channel_id: str) -> None:
        """The channel is gone, and no event says so (hung up while the app was disconnected)."""
        chan = self.channels.pop(channel_id)
        self.gone_channels[chan.id] = chan
        if chan.bridge_id and chan.bridge_id in self.bridges:
            self.bridges[chan.bridge_id].channels.remove(chan.id)
        await self._stop_leg(chan.id)

    def leg_for(self, caller_id: str) -> SimLeg | None:
        """The SimLeg of the media channel that was bridged with ``caller_id``."""
        media_id = self.media_of.get(caller_id)
        return self.legs.get(media_id) if media_id else None

    def channel(self, channel_id: str) -> FakeChannel:
        return self.channels.get(channel_id) or self.gone_channels[channel_id]

    # ---- events ------------------------------------------------------------------------------------

    async def _emit(self, kind: str, **fields: Any) -> None:
        msg: dict[str, Any] = {"type": kind, "application": self.app, "timestamp": _now(),
                               "asterisk_id": "fa:ke:00:00:00:01"}
        for key, value in fields.items():
            msg[key] = value.to_json() if isinstance(value, FakeChannel | FakeBridge) else value
        self.events_sent.append(msg)
        if not self._ws:
            self.events_lost += 1
            return
        text = json.dumps(msg)
        for ws in list(self._ws):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(text)

    async def emit_raw(self, text: str) -> None:
        """Send anything on the event socket (garbage tests)."""
        for ws in list(self._ws):
            await ws.send_str(text)

    async def _destroy_channel(self, chan: FakeChannel, *, cause: int = 16) -> None:
        if chan.in_stasis:
            chan.in_stasis = False
            await self._emit("StasisEnd", channel=chan)
        await self._leave_bridge(chan)
        self.channels.pop(chan.id, None)
        self.gone_channels[chan.id] = chan
        chan.state = "Down"
        await self._emit("ChannelDestroyed", channel=chan, cause=cause, cause_txt="Normal Clearing")
        await self._stop_leg(chan.id)

    async def _leave_bridge(self, chan: FakeChannel) -> None:
        bridge = self.bridges.get(chan.bridge_id or "")
        if bridge is not None and chan.id in bridge.channels:
            bridge.channels.remove(chan.id)
            await self._emit("ChannelLeftBridge", channel=chan, bridge=bridge)
        chan.bridge_id = None

    async def _stop_leg(self, channel_id: str) -> None:
        leg = self.legs.get(channel_id)
        if leg is not None:
            leg.stop()  # run() returns; the socket closes there (results stay readable)

    # ---- HTTP plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
        route = route.removeprefix("/ari")
        query = dict(request.query)
        status = 200
        try:
            if request.headers.get("Authorization") != self._auth_header:
                status = 401
                return _error(401, "Authentication required")
            queued = self._failures.get((request.method, route))
            if queued:
                status = queued.pop(0)
                return _error(status, f"injected {status}")
            response = await handler(request)
            status = response.status
            delay = self._delays.get((request.method, route))
            if delay:
                await asyncio.sleep(delay)
            return response
        except _Reply as reply:
            status = reply.status
            return _error(reply.status, reply.message)
        finally:
            self.requests.append(LoggedRequest(request.method, route, request.path, query, status))

    def _chan(self, request: web.Request) -> FakeChannel:
        chan = self.channels.get(request.match_info["channelId"])
        if chan is None:
            raise _Reply(404, "Channel not found")
        return chan

    def _stasis_chan(self, request: web.Request) -> FakeChannel:
        chan = self._chan(request)
        if not chan.in_stasis:
            raise _Reply(409, "Channel not in Stasis application")
        return chan

    # ---- events WebSocket -----------------------------------------------------------------------------

    async def _events_ws(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("app") != self.app:
            return _error(400, "Missing or unknown app")
        if not self.accept_websocket:
            return _error(503, "not accepting event connections")
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        self.ws_connects += 1
        self.ws_params.append(dict(request.query))
        self._ws.add(ws)
        self.ws_connected.set()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._ws.discard(ws)
        return ws

    # ---- channels -------------------------------------------------------------------------------------

    async def _list_channels(self, request: web.Request) -> web.Response:
        return web.json_response([c.to_json() for c in self.channels.values()])

    async def _get_channel(self, request: web.Request) -> web.Response:
        return web.json_response(self._chan(request).to_json())

    async def _answer(self, request: web.Request) -> web.Response:
        chan = self._stasis_chan(request)
        chan.answered = True
        chan.state = "Up"
        await self._emit("ChannelStateChange", channel=chan)
        return web.Response(status=204)

    async def _hangup(self, request: web.Request) -> web.Response:
        chan = self._chan(request)
        self.deleted_at[chan.id] = time.time()
        reason = request.query.get("reason", "normal")
        if reason not in HANGUP_REASONS:
            return _error(400, f"Invalid reason for hangup provided: {reason}")
        chan.hangup_reason = reason
        await self._emit("ChannelHangupRequest", channel=chan, soft=False)
        await self._destroy_channel(chan)
        return web.Response(status=204)

    async def _originate(self, request: web.Request) -> web.Response:
        q = request.query
        endpoint = q.get("endpoint", "")
        if not endpoint or "/" not in endpoint:
            return _error(400, "Endpoint must be specified")
        if q.get("app") != self.app:
            return _error(400, "Application is required (and must be this app)")
        channel_id = q.get("channelId") or f"{self._epoch + 2}.{next(self._ids)}"
        if channel_id in self.channels:
            return _error(409, "Channel with given unique ID already exists")
        self.originates.append(dict(q))
        n = next(self._ids)
        name = endpoint.removesuffix("/n")
        name = f"{name}-{n:08x};1" if name.startswith("Local/") else f"{name}-{n:08x}"
        chan = FakeChannel(
            id=channel_id, name=name, caller_number=q.get("callerId", ""), exten="s", context="default",
            state="Down", in_stasis=False, originated_to=endpoint,
        )
        self.channels[chan.id] = chan
        args = [a for a in q.get("appArgs", "").split(",") if a]
        timeout_s = float(q.get("timeout", "30"))
        self._spawn(self._dial(chan, self.dial_outcomes.get(endpoint, "answer"), args, timeout_s))
        return web.json_response(chan.to_json())

    async def _dial(self, chan: FakeChannel, outcome: str, args: list[str], timeout_s: float) -> None:
        """What Asterisk's dialler reports for an originate: Dial events, then StasisStart on answer or
        the channel's destruction with the Q.850 cause."""
        await self._emit("Dial", peer=chan, dialstatus="", dialstring=chan.originated_to or "")
        await asyncio.sleep(timeout_s if outcome == "no_answer" else self.ring_s)
        if chan.id not in self.channels:
            return  # hung up while ringing
        if outcome == "answer":
            chan.state = "Up"
            chan.answered = True
            await self._emit("Dial", peer=chan, dialstatus="ANSWER")
            chan.in_stasis = True
            chan.app_data = ",".join([self.app, *args])
            await self._emit("StasisStart", channel=chan, args=args)
            return
        status, cause = {"busy": ("BUSY", 17), "no_answer": ("NOANSWER", 19),
                         "unavailable": ("CHANUNAVAIL", 20)}[outcome]
        await self._emit("Dial", peer=chan, dialstatus=status)
        await self._emit("ChannelHangupRequest", channel=chan, cause=cause)
        await self._destroy_channel(chan, cause=cause)

    async def _get_variable(self, request: web.Request) -> web.Response:
        chan = self._chan(request)
        variable = request.query.get("variable", "")
        if not variable:
            return _error(400, "Variable name is required")
        if variable.startswith("DIALPLAN_EXISTS(") and variable.endswith(")"):
            context, exten, *_ = [*variable[len("DIALPLAN_EXISTS("):-1].split(","), "", ""]
            return web.json_response({"value": "1" if (context, exten) in self.dialplan else "0"})
        if variable.endswith(")"):
            return _error(500, "Unable to read provided function")
        value = chan.channelvars.get(variable)
        if value is None:
            return _error(404, "Provided variable was not found")
        return web.json_response({"value": value})

    async def _asterisk_info(self, request: web.Request) -> web.Response:
        return web.json_response({"system": {"version": "22.10.1", "entity_id": "fa:ke:00:00:00:01"}})

    async def _reload_module(self, request: web.Request) -> web.Response:
        name = request.match_info["moduleName"]
        if name not in self.modules:
            return _error(404, "Module not found in running modules")
        self.reloaded.append(name)
        return web.Response(status=204)

    async def _endpoints_by_tech(self, request: web.Request) -> web.Response:
        tech = request.match_info["tech"]
        found = [e for e in self.endpoints if e["technology"] == tech]
        if not found and tech != "PJSIP":
            return _error(404, "No Endpoints found - invalid tech")
        return web.json_response(found)

    async def _hold(self, request: web.Request) -> web.Response:
        self._stasis_chan(request).held = True
        return web.Response(status=204)

    async def _unhold(self, request: web.Request) -> web.Response:
        self._stasis_chan(request).held = False
        return web.Response(status=204)

    async def _start_moh(self, request: web.Request) -> web.Response:
        self._stasis_chan(request).moh_class = request.query.get("mohClass", "default")
        return web.Response(status=204)

    async def _stop_moh(self, request: web.Request) -> web.Response:
        self._stasis_chan(request).moh_class = None
        return web.Response(status=204)

    async def _play(self, request: web.Request) -> web.Response:
        chan = self._stasis_chan(request)
        media = request.query.get("media")
        if not media:
            return _error(400, "media is required")
        playback = {
            "id": request.query.get("playbackId") or f"pb-{next(self._ids)}", "media_uri": media,
            "target_uri": f"channel:{chan.id}", "language": "en", "state": "queued",
        }
        self.played.append((chan.id, media))
        await self._emit("PlaybackStarted", playback=playback | {"state": "playing"})
        self._spawn(self._finish_playback(chan, playback))
        return web.json_response(playback)

    async def _finish_playback(self, chan: FakeChannel, playback: dict[str, Any]) -> None:
        await asyncio.sleep(self.playback_s)
        if chan.id in self.channels:
            await self._emit("PlaybackFinished", playback=playback | {"state": "done"})

    async def _external_media(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("app") != self.app or "format" not in q:
            return _error(400, "app and format are required")
        if q.get("encapsulation", "rtp") != "rtp" or q.get("transport", "udp") != "udp":
            return _error(400, "only rtp over udp is faked")
        if q["format"] not in EXTERNAL_MEDIA_FORMATS:
            return _error(400, f"unknown format {q['format']}")
        host, _, port = q.get("external_host", "").rpartition(":")
        if not host or not port.isdigit():
            return _error(400, "external_host must be host:port")
        channel_id = q.get("channelId") or f"{self._epoch + 1}.{next(self._ids)}"
        if channel_id in self.channels:
            return _error(409, "Channel with given unique ID already exists")
        leg = SimLeg((host, int(port)), self.speech_8k, codec="ulaw")
        local_host, local_port = await leg.bind()
        chan = FakeChannel(
            id=channel_id, name=f"UnicastRTP/{host}:{port}-0x{next(self._ids):08x}", caller_number="",
            exten="s", context="default", state="Up", in_stasis=False,
            channelvars={"UNICASTRTP_LOCAL_ADDRESS": local_host, "UNICASTRTP_LOCAL_PORT": str(local_port)},
        )
        self.channels[chan.id] = chan
        self.legs[chan.id] = leg
        self._spawn(self._media_enters_stasis(chan))
        return web.json_response(chan.to_json())

    @staticmethod
    async def _run_leg(leg: SimLeg) -> None:
        try:
            await leg.run(None)
        finally:
            leg.close()

    async def _media_enters_stasis(self, chan: FakeChannel) -> None:
        await asyncio.sleep(self.media_stasis_delay_s)
        if chan.id in self.channels:
            chan.in_stasis = True
            chan.app_data = self.app
            await self._emit("StasisStart", channel=chan, args=[])

    # ---- bridges ---------------------------------------------------------------------------------------

    async def _list_bridges(self, request: web.Request) -> web.Response:
        return web.json_response([b.to_json() for b in self.bridges.values()])

    async def _create_bridge(self, request: web.Request) -> web.Response:
        bridge_id = request.query.get("bridgeId") or f"bridge-{next(self._ids)}"
        if bridge_id in self.bridges:
            return _error(409, "Bridge with given id already exists")
        bridge = FakeBridge(bridge_id, request.query.get("name", ""), request.query.get("type", "mixing"))
        self.bridges[bridge_id] = bridge
        await self._emit("BridgeCreated", bridge=bridge)
        return web.json_response(bridge.to_json())

    async def _destroy_bridge(self, request: web.Request) -> web.Response:
        bridge = self.bridges.get(request.match_info["bridgeId"])
        if bridge is None:
            return _error(404, "Bridge not found")
        self.deleted_at[bridge.id] = time.time()
        for chan_id in list(bridge.channels):
            chan = self.channels.get(chan_id)
            if chan is not None:
                await self._leave_bridge(chan)
        del self.bridges[bridge.id]
        await self._emit("BridgeDestroyed", bridge=bridge)
        return web.Response(status=204)

    async def _add_channel(self, request: web.Request) -> web.Response:
        bridge = self.bridges.get(request.match_info["bridgeId"])
        if bridge is None:
            return _error(404, "Bridge not found")
        ids = [c for c in request.query.get("channel", "").split(",") if c]
        chans = [self.channels.get(c) for c in ids]
        if not ids or any(c is None for c in chans):
            return _error(400, "Channel not found")
        if any(c is not None and not c.in_stasis for c in chans):
            return _error(422, "Channel not in Stasis application")
        for chan in chans:
            assert chan is not None
            chan.bridge_id = bridge.id
            if chan.id not in bridge.channels:
                bridge.channels.append(chan.id)
            await self._emit("ChannelEnteredBridge", channel=chan, bridge=bridge)
        media = [c for c in chans if c is not None and c.name.startswith("UnicastRTP/")]
        callers = [c for c in chans if c is not None and not c.name.startswith("UnicastRTP/")]
        for m in media:
            for c in callers:
                self.media_of[c.id] = m.id
            # Asterisk sends the bridge's audio to the external host once the channel is bridged.
            leg = self.legs.get(m.id)
            if leg is not None and m.id not in self._legs_running:
                self._legs_running.add(m.id)
                self._spawn(self._run_leg(leg))
        return web.Response(status=204)

    async def _subscribe(self, request: web.Request) -> web.Response:
        if request.match_info["applicationName"] != self.app:
            return _error(404, "Application not found")
        if "eventSource" not in request.query:
            return _error(400, "eventSource is required")
        return web.json_response({
            "name": self.app, "channel_ids": list(self.channels), "bridge_ids": list(self.bridges),
            "endpoint_ids": [], "device_names": [], "events_allowed": [], "events_disallowed": [],
        })


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class _Reply(Exception):
    """An ARI error answer raised from inside a handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
