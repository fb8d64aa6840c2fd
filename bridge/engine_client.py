"""Client side of one engine session (see ``engine/protocol.py`` for the wire format).

One :class:`EngineSession` is one WebSocket to ``aziza-engine``: ``open`` → ``ready``, then 80 ms frames both
ways, control messages, ``close``. URLs:

* ``ws://host:port/session`` (or ``wss://``) — TCP;
* ``unix:///run/aziza/engine.sock`` — the engine's Unix socket; the WebSocket path is always ``/session``.

:class:`EngineMux` opens sessions as channels of one WebSocket to the engine's ``/mux`` (``engine/mux.py``):
the same :class:`EngineSession` on top, one socket, one message per round of the event loop for all of
them. The bridge's processes use it (``bridge.engine_mux``).

Failures are typed so a caller can tell a full house (refuse the call) from a dead engine (fail the call):
:class:`EngineFull`, :class:`EngineRefused` (any other error code on open), :class:`EngineUnavailable`
(connect failed, timed out or the socket died), :class:`EngineProtocolError` (the engine spoke nonsense).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np

from bridge.redact import mask_url
from engine.mux import Mux, MuxChannel, step_send
from engine.protocol import (
    FRAME_MS,
    MUX_MAX_CHANNEL,
    MUX_WS_MAX_MSG_SIZE,
    AudioFrame,
    Close,
    Closed,
    Error,
    Event,
    Gap,
    Lag,
    Open,
    Pause,
    PersonaParams,
    ProtocolError,
    Ready,
    Resume,
    Text,
    decode_audio,
    decode_engine_control,
    encode_audio,
    encode_control,
)

log = logging.getLogger(__name__)

EngineMessage = AudioFrame | Text | Gap | Lag | Closed | Error

def answer_limit_frames(timeout_s: float) -> int:
    """``bridge.engine_answer_timeout_s`` as frames sent: a session whose ``unanswered`` reaches it has
    stopped answering (counted in frames, so a hold, which sends none, is not counted and load cannot move
    the verdict)."""
    return math.ceil(timeout_s * 1000.0 / FRAME_MS)


# How long close() waits for the engine's ``closed`` before dropping the socket anyway.
_CLOSE_GRACE_S = 1.0


class EngineError(Exception):
    """Base of every engine client failure."""


class EngineUnavailable(EngineError):
    """The engine could not be reached, did not answer in time, or its socket died."""


class EngineProtocolError(EngineError):
    """The engine sent something the protocol does not allow."""


class EngineRefused(EngineError):
    """The engine answered ``open`` with an error (``code`` is one of engine.protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"engine refused the session ({code}): {message}")
        self.code = code
        self.message = message


class EngineFull(EngineRefused):
    """No free slot: the call must be refused before it is answered."""


def _connect_target(url: str, mux: bool = False) -> tuple[str, aiohttp.BaseConnector | None]:
    """(WebSocket URL, connector) for a ws://, wss:// or unix:// engine URL; ``mux``: the engine's ``/mux``
    beside the URL's ``/session``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ValueError(f"unix engine URL without a socket path: {url!r}")
        return ("ws://localhost/mux" if mux else "ws://localhost/session"), aiohttp.UnixConnector(path=path)
    if parts.scheme in ("ws", "wss", "http", "https"):
        if mux:
            base = parts.path[: -len("/session")] if parts.path.endswith("/session") else ""
            return urlunsplit(parts._replace(path=base + "/mux")), None
        return url, None
    raise ValueError(f"engine URL must be ws://, wss:// or unix://, got {url!r}")


class EngineSession:
    """One open engine session. Use ``async with await EngineSession.open(...) as s`` or call close()."""

    def __init__(
        self,
        http: aiohttp.ClientSession | None,
        ws: aiohttp.ClientWebSocketResponse | MuxChannel,
        ready: Ready,
        *,
        on_closed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._http = http  # (None on a mux: the mux's owner holds it)
        self._ws = ws
        self._on_closed = on_closed
        self.ready = ready
        self.url: str | None = None  # the engine this session is on
        self._next_seq = 0
        self._closed_reason: str | None = None
        self._backlog: asyncio.Future[Any] | None = None  # flow-control wait of a send_frame_nowait
        self.frames_sent = 0
        self.frames_received = 0
        # Frames sent since the engine last answered one (a resume starts it again: the frames sent before a
        # hold were consumed by the pause, unanswered). A session the engine has stopped serving, its socket
        # alive, would otherwise leave the caller in silence with nothing logged.
        self.unanswered = 0
        self.close_answered = False  # close() read the engine's ``closed`` (not its grace running out)

    # -- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        persona: PersonaParams | None = None,
        call_id: str | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the API the call controller uses; applied via asyncio.timeout
    ) -> EngineSession:
        """Connect, send ``open`` and wait for ``ready`` (all within ``timeout`` seconds)."""
        ws_url, connector = _connect_target(url)
        shown = mask_url(url)  # errors and logs never carry a password in the URL
        http = aiohttp.ClientSession(connector=connector)
        try:
            async with asyncio.timeout(timeout):
                try:
                    ws = await http.ws_connect(ws_url, autoping=True, heartbeat=None, max_msg_size=1 << 20)
                except (aiohttp.ClientError, OSError) as exc:
                    raise EngineUnavailable(f"cannot connect to the engine at {shown}: {exc}") from exc
                try:
                    ready = await cls._handshake(ws, url, persona, call_id)
                except BaseException:
                    await ws.close()
                    raise
        except TimeoutError:
            await http.close()
            raise EngineUnavailable(f"the engine at {shown} did not answer within {timeout:.1f} s") from None
        except BaseException:
            await http.close()
            raise
        session = cls(http, ws, ready)
        session.url = url
        return session

    @staticmethod
    async def _handshake(
        ws: aiohttp.ClientWebSocketResponse | MuxChannel, url: str, persona: PersonaParams | None,
        call_id: str | None,
    ) -> Ready:
        """Send ``open`` on ``ws`` (a socket of its own, or a mux channel) and read the engine's ``ready``."""
        await ws.send_str(encode_control(Open(persona=persona or PersonaParams(), call_id=call_id)))
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise EngineUnavailable(
                f"the engine at {mask_url(url)} closed the session before ready ({msg.type.name})"
            )
        try:
            reply = decode_engine_control(msg.data)
        except ProtocolError as exc:
            raise EngineProtocolError(f"bad reply to open: {exc.message}") from None
        if isinstance(reply, Ready):
            return reply
        if isinstance(reply, Error):
            if reply.code == "full":
                raise EngineFull(reply.code, reply.message)
            raise EngineRefused(reply.code, reply.message)
        raise EngineProtocolError(f"expected ready, got {reply.type!r}")

    async def close(self) -> None:
        """Send ``close``, give the engine a moment to answer ``closed``, drop the socket. Idempotent."""
        try:
            await self._close()
        finally:
            if self._http is not None:
                await self._http.close()
            if self._on_closed is not None:
                on_closed, self._on_closed = self._on_closed, None
                await on_closed()

    async def _close(self) -> None:
        if self._ws.closed:
            return
        if self._closed_reason is None:
            with contextlib.suppress(Exception):
                await self._ws.send_str(encode_control(Close()))
                async with asyncio.timeout(_CLOSE_GRACE_S):
                    while True:
                        msg = await self._ws.receive()
                        if msg.type != aiohttp.WSMsgType.TEXT and msg.type != aiohttp.WSMsgType.BINARY:
                            break
                        if msg.type == aiohttp.WSMsgType.TEXT and isinstance(
                            decode_engine_control(msg.data), Closed
                        ):
                            self.close_answered = True
                            break
            self._closed_reason = self._closed_reason or "client_close"
        with contextlib.suppress(Exception):
            await self._ws.close()

    async def __aenter__(self) -> EngineSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None or self._ws.closed

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    # -- sending -----------------------------------------------------------------------------------------

    async def send_frame(self, pcm: np.ndarray) -> int:
        """Send one 80 ms frame (int16, or float32 in [-1, 1]); returns its sequence number."""
        # ValueError on a wrong shape: a caller bug, not the engine's.
        data = encode_audio(self._next_seq, pcm)
        await self._send(data)
        seq = self._next_seq
        self._next_seq += 1
        self.frames_sent += 1
        self.unanswered += 1
        return seq

    def send_frame_nowait(self, pcm: np.ndarray) -> int | None:
        """Send one 80 ms frame without awaiting; its sequence number, or None when the socket is backed up.

        For the media clock's synchronous steps: an awaited send costs a task switch per frame and, with 50
        calls completing frames in the same few ms, queues each frame behind every other call's input work.
        aiohttp's uncompressed ``send_bytes`` writes to the transport before its only suspension point
        (flow control, when the engine stops reading), so it is stepped once here: it finishes at once in
        the normal case. If it suspends, the frame is already in the transport buffer; the flow-control wait
        is kept as ``_backlog`` instead of awaited, and frames are refused (None, counted by the caller)
        until the engine has drained it: a stuck engine costs dropped audio, never a growing buffer.
        """
        if self._backlog is not None:
            if not self._backlog.done():
                return None
            self._backlog = None
        if self.closed:
            raise EngineUnavailable(f"engine session is closed ({self._closed_reason or 'socket closed'})")
        data = encode_audio(self._next_seq, pcm)
        try:
            self._backlog = step_send(self._ws.send_bytes(data))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._closed_reason = self._closed_reason or "engine_gone"
            raise EngineUnavailable(f"engine socket failed: {exc}") from exc
        seq = self._next_seq
        self._next_seq += 1
        self.frames_sent += 1
        self.unanswered += 1
        return seq

    async def send_event(self, name: str, value: str = "") -> None:
        await self._send(encode_control(Event(name=name, value=value)))

    async def pause(self) -> None:
        await self._send(encode_control(Pause()))

    async def resume(self) -> None:
        self.unanswered = 0
        await self._send(encode_control(Resume()))

    async def _send(self, data: str | bytes) -> None:
        if self.closed:
            raise EngineUnavailable(f"engine session is closed ({self._closed_reason or 'socket closed'})")
        try:
            if isinstance(data, bytes):
                await self._ws.send_bytes(data)
            else:
                await self._ws.send_str(data)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._closed_reason = self._closed_reason or "engine_gone"
            raise EngineUnavailable(f"engine socket failed: {exc}") from exc

    # -- receiving ---------------------------------------------------------------------------------------

    async def receive(self) -> EngineMessage:
        """The next message from the engine. A dead socket yields ``Closed("engine_gone")`` (once, then
        again on every call); a malformed message raises EngineProtocolError."""
        if self._closed_reason is not None:
            return Closed(reason=self._closed_reason)
        return self._message(await self._ws.receive())

    def listen(self, on_message: Callable[[EngineMessage | EngineProtocolError], None] | None) -> bool:
        """Have each message handed to ``on_message`` as it is read (what ``receive`` would return, or the
        EngineProtocolError it would raise), with no task woken per frame; None: back to ``receive``. False
        (nothing changed) when this session is a WebSocket of its own: only a mux channel can."""
        ws = self._ws
        if not isinstance(ws, MuxChannel):
            return False
        if on_message is None:
            ws.listen(None)
            return True

        def deliver(msg: aiohttp.WSMessage) -> None:
            try:
                decoded = self._message(msg)
            except EngineProtocolError as exc:
                on_message(exc)
                return
            on_message(decoded)

        ws.listen(deliver)
        return True

    def _message(self, msg: aiohttp.WSMessage) -> EngineMessage:
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                frame = decode_audio(msg.data)
            except ProtocolError as exc:
                raise EngineProtocolError(exc.message) from None
            self.frames_received += 1
            self.unanswered = 0
            return frame
        if msg.type == aiohttp.WSMsgType.TEXT:
            try:
                reply = decode_engine_control(msg.data)
            except ProtocolError as exc:
                raise EngineProtocolError(exc.message) from None
            if isinstance(reply, Ready):
                raise EngineProtocolError("a second ready in one session")
            if isinstance(reply, Closed):
                self._closed_reason = reply.reason
            return reply
        # CLOSE / CLOSING / CLOSED / ERROR: the socket is gone without a ``closed`` message (or close() of
        # this session, running concurrently, closed it: then its reason stands).
        self._closed_reason = self._closed_reason or "engine_gone"
        log.debug("engine socket ended: %s", msg.type.name)
        return Closed(reason=self._closed_reason)

    async def messages(self) -> AsyncIterator[EngineMessage]:
        """Iterate messages until (and including) the ``Closed`` that ends the session."""
        while True:
            msg = await self.receive()
            yield msg
            if isinstance(msg, Closed):
                return


class EngineMux:
    """Sessions on one engine as channels of one WebSocket to its ``/mux`` (see the module docstring).

    Connected by the first :meth:`open`; closed when its last session is closed or its socket died (the next
    open connects again). A dead socket ends every session on it, as a dead engine ends them on sockets of
    their own: each reads ``Closed("engine_gone")``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._mux: Mux | None = None
        self._http: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._numbers = itertools.count(1)

    @property
    def mux(self) -> Mux | None:
        """The open mux, if connected (benchmarks read its counters)."""
        return self._mux

    async def open(
        self,
        persona: PersonaParams | None = None,
        call_id: str | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - EngineSession.open's API
    ) -> EngineSession:
        """A session on this engine: ``open`` sent and ``ready`` read on a new channel, within ``timeout``."""
        shown = mask_url(self.url)
        try:
            async with asyncio.timeout(timeout):
                mux = await self._connected(shown)
                channel = mux.open_channel(self._number(mux))
                try:
                    ready = await EngineSession._handshake(channel, self.url, persona, call_id)
                except BaseException:
                    await channel.close()
                    await self._release()
                    raise
        except TimeoutError:
            raise EngineUnavailable(f"the engine at {shown} did not answer within {timeout:.1f} s") from None
        except ConnectionError as exc:
            raise EngineUnavailable(f"the engine at {shown} went away: {exc}") from None
        session = EngineSession(None, channel, ready, on_closed=self._release)
        session.url = self.url
        return session

    def _number(self, mux: Mux) -> int:
        while True:
            number = next(self._numbers) % (MUX_MAX_CHANNEL + 1)
            if number not in mux.channels:
                return number

    async def _connected(self, shown: str) -> Mux:
        async with self._lock:
            if self._mux is not None and not self._mux.closed:
                return self._mux
            await self._drop()
            ws_url, connector = _connect_target(self.url, mux=True)
            http = aiohttp.ClientSession(connector=connector)
            try:
                ws = await http.ws_connect(ws_url, autoping=True, heartbeat=None,
                                           max_msg_size=MUX_WS_MAX_MSG_SIZE)
            except (aiohttp.ClientError, OSError) as exc:
                await http.close()
                raise EngineUnavailable(f"cannot connect to the engine at {shown}: {exc}") from exc
            except BaseException:
                await http.close()
                raise
            self._mux, self._http = Mux(ws), http
            self._reader = asyncio.create_task(self._mux.run(), name="aziza-engine-mux-reader")
            return self._mux

    async def _release(self) -> None:
        """A session is closed: with none left on the socket (or the socket dead), close it."""
        mux = self._mux
        if mux is None or (mux.channels and not mux.closed):
            return
        await self._drop()

    async def _drop(self) -> None:
        mux, http, reader = self._mux, self._http, self._reader
        self._mux = self._http = self._reader = None
        if mux is not None:
            with contextlib.suppress(Exception):
                await mux.ws.close()
        if reader is not None:
            reader.cancel()  # (the close above normally ended it already)
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if http is not None:
            await http.close()

    async def aclose(self) -> None:
        """Close the socket now; its sessions read ``Closed("engine_gone")``."""
        async with self._lock:
            await self._drop()
