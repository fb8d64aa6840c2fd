"""Client side of one engine session (see ``engine/protocol.py`` for the wire format).

One :class:`EngineSession` is one WebSocket to ``aziza-engine``: ``open`` → ``ready``, then 80 ms frames both
ways, control messages, ``close``. URLs:

* ``ws://host:port/session`` (or ``wss://``) — TCP;
* ``unix:///run/aziza/engine.sock`` — the engine's Unix socket; the WebSocket path is always ``/session``.

Failures are typed so a caller can tell a full house (refuse the call) from a dead engine (fail the call):
:class:`EngineFull`, :class:`EngineRefused` (any other error code on open), :class:`EngineUnavailable`
(connect failed, timed out or the socket died), :class:`EngineProtocolError` (the engine spoke nonsense).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from bridge.redact import mask_url
from engine.protocol import (
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


def _connect_target(url: str) -> tuple[str, aiohttp.BaseConnector | None]:
    """(WebSocket URL, connector) for a ws://, wss:// or unix:// engine URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ValueError(f"unix engine URL without a socket path: {url!r}")
        return "ws://localhost/session", aiohttp.UnixConnector(path=path)
    if parts.scheme in ("ws", "wss", "http", "https"):
        return url, None
    raise ValueError(f"engine URL must be ws://, wss:// or unix://, got {url!r}")


class EngineSession:
    """One open engine session. Use ``async with await EngineSession.open(...) as s`` or call close()."""

    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, ready: Ready
    ) -> None:
        self._http = http
        self._ws = ws
        self.ready = ready
        self.url: str | None = None  # the engine this session is on
        self._next_seq = 0
        self._closed_reason: str | None = None
        self._backlog: asyncio.Future[Any] | None = None  # flow-control wait of a send_frame_nowait
        self.frames_sent = 0
        self.frames_received = 0

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
                    opening = Open(persona=persona or PersonaParams(), call_id=call_id)
                    await ws.send_str(encode_control(opening))
                    ready = await cls._await_ready(ws, url)
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
    async def _await_ready(ws: aiohttp.ClientWebSocketResponse, url: str) -> Ready:
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
        if self._ws.closed:
            await self._http.close()
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
                            break
            self._closed_reason = self._closed_reason or "client_close"
        with contextlib.suppress(Exception):
            await self._ws.close()
        await self._http.close()

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
        step = self._ws.send_bytes(data)
        try:
            waiting_on = step.send(None)
        except StopIteration:
            pass
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._closed_reason = self._closed_reason or "engine_gone"
            raise EngineUnavailable(f"engine socket failed: {exc}") from exc
        else:
            step.close()  # the data is written; only the drain wait is left, watched through its future
            self._backlog = waiting_on if isinstance(waiting_on, asyncio.Future) else None
        seq = self._next_seq
        self._next_seq += 1
        self.frames_sent += 1
        return seq

    async def send_event(self, name: str, value: str = "") -> None:
        await self._send(encode_control(Event(name=name, value=value)))

    async def pause(self) -> None:
        await self._send(encode_control(Pause()))

    async def resume(self) -> None:
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
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                frame = decode_audio(msg.data)
            except ProtocolError as exc:
                raise EngineProtocolError(exc.message) from None
            self.frames_received += 1
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
