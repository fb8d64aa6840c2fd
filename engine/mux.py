"""Many engine sessions over one WebSocket (``GET /mux``; the wire format is in ``engine/protocol.py``).

Both ends use this module. A :class:`Mux` wraps one open WebSocket (aiohttp's client or server side) and
holds its channels. A :class:`MuxChannel` stands for one session's WebSocket to the code above it: it has the
part of aiohttp's WebSocket interface that the session code uses (``receive`` with a timeout, ``send_bytes``,
``send_str``, ``close``, ``closed``, ``exception``), so the session protocol's own code runs unchanged on a
channel, on the engine (``engine/server.py``) and in the bridge (``bridge/engine_client.py``).

Why: with a WebSocket per call, every 80 ms frame cost a system call, a WebSocket frame and a wake-up of the
other process, each way, per call (at 50 calls, about a sixth of the bridge's CPU). Here the audio that
channels send is held until the event loop's current round of callbacks is over (``call_soon``: the media
clock serves all the calls due in one tick in one round) and then goes out in one message; the other end
reads it in one wake-up and hands each channel its frame.

Order: a channel's control message goes out after every frame queued before it. Flow control is the
socket's: while the socket's buffer drains, ``send_bytes`` waits (the bridge's ``send_frame_nowait`` turns
that wait into refused frames, as it did on a socket of its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import WSMessage, WSMsgType
from aiohttp.http_websocket import WS_CLOSED_MESSAGE

from engine.protocol import (
    MUX_MAX_FRAMES,
    ProtocolError,
    decode_mux_audio,
    decode_mux_text,
    encode_mux_audio,
    encode_mux_text,
)

log = logging.getLogger(__name__)

MAX_CHANNELS = 4096  # channels one mux may hold at once (each costs the engine two tasks)

# Either end's WebSocket: aiohttp's ClientWebSocketResponse or web.WebSocketResponse.
MuxSocket = Any


def step_send(send: Coroutine[Any, Any, None]) -> asyncio.Future[Any] | None:
    """Run aiohttp's uncompressed ``send_bytes`` up to its only suspension point, by which time it has
    written to the transport: the drain wait it stopped at (the peer reads slowly), or None when it finished.
    A failed send raises as the coroutine does. (For synchronous callers: the media clock's steps and the
    mux's flush, which must not await.)"""
    try:
        waiting = send.send(None)
    except StopIteration:
        return None
    send.close()  # (the data is written; the drain wait goes on without the coroutine)
    if not isinstance(waiting, asyncio.Future):
        return None
    # A future yielded by ``await`` carries a "yielded, not yet taken" flag that whoever takes it resets, as
    # asyncio's Task does. Left set, the next ``await`` of that future raises "await wasn't used with
    # future", and aiohttp awaits the same stored drain waiter on its next send while the socket is paused:
    # every session on a backed-up mux then failed at once, silently (seen at 200 calls).
    waiting._asyncio_future_blocking = False
    return waiting


class MuxClosed(ConnectionResetError):
    """The channel or its mux's socket is closed."""


class MuxChannel:
    """One session's end of a :class:`Mux` (see the module docstring)."""

    def __init__(self, mux: Mux, channel: int) -> None:
        self.mux = mux
        self.channel = channel
        self._inbox: asyncio.Queue[WSMessage] = asyncio.Queue()
        self._listener: Callable[[WSMessage], None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self.mux.closed

    def feed(self, msg: WSMessage) -> None:
        listener = self._listener
        if listener is None:
            self._inbox.put_nowait(msg)
            return
        try:
            listener(msg)
        except Exception:  # (the listener's own bug: the mux and the other channels go on)
            log.exception("engine mux: the listener of channel %d failed", self.channel)

    def listen(self, listener: Callable[[WSMessage], None] | None) -> None:
        """Hand each message to ``listener`` as the mux reads it, instead of queueing it for receive(): no
        task wakes per frame (messages queued before are handed over first). None: back to receive()."""
        self._listener = listener
        while listener is not None and not self._inbox.empty() and self._listener is listener:
            self.feed(self._inbox.get_nowait())

    async def receive(self, timeout: float | None = None) -> WSMessage:  # noqa: ASYNC109 - aiohttp's API
        """The next message for this channel; CLOSED once the channel or the socket is closed. TimeoutError
        after ``timeout`` seconds, as aiohttp's."""
        if self._inbox.empty() and self.closed:
            return WS_CLOSED_MESSAGE
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    async def send_bytes(self, data: bytes, compress: int | None = None) -> None:
        """Queue one encoded audio frame; it leaves with the others of this round of the event loop."""
        if self.closed:
            raise MuxClosed("engine mux channel is closed")
        waiting = self.mux.queue_audio(self.channel, data)
        if waiting is not None:
            await waiting  # the socket is draining (see send_frame_nowait: the frame is already queued)

    async def send_str(self, data: str, compress: int | None = None) -> None:
        if self.closed:
            raise MuxClosed("engine mux channel is closed")
        await self.mux.send_text(self.channel, data)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Close this channel only (the session protocol's ``close``/``closed`` are sent before this)."""
        if self._closed:
            return False
        self.closed_by_mux()
        self.mux.forget(self)
        return True

    def exception(self) -> BaseException | None:
        return None

    def closed_by_mux(self) -> None:
        if not self._closed:
            self._closed = True
            self.feed(WS_CLOSED_MESSAGE)  # (a receive() waiting now ends, as on a socket that closed)


class Mux:
    """One WebSocket carrying many channels. ``on_new``: the engine's end, called with a channel the peer
    opened (its first message is queued in it); without it (the client's end) messages for a channel that
    is not open are dropped."""

    def __init__(self, ws: MuxSocket, *, on_new: Callable[[MuxChannel], None] | None = None,
                 on_bad: Callable[[bool], None] | None = None, max_channels: int = MAX_CHANNELS) -> None:
        self.ws = ws
        self.on_new = on_new
        # a message not in the mux's format, called with True for a binary one (the engine's metrics count it)
        self.on_bad = on_bad
        self.max_channels = max_channels
        self.channels: dict[int, MuxChannel] = {}
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[int, bytes]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._backlog: asyncio.Future[Any] | None = None
        self._closed = False
        self.messages_out = 0  # binary messages sent and read (benchmarks: frames per message)
        self.frames_out = 0
        self.messages_in = 0
        self.frames_in = 0
        self.dropped = 0  # messages for no open channel, or beyond max_channels
        self.bad_messages = 0

    @property
    def closed(self) -> bool:
        return self._closed or self.ws.closed

    # -- channels ----------------------------------------------------------------------------------------

    def open_channel(self, channel: int) -> MuxChannel:
        """A new channel with this number (unique among the open ones)."""
        if channel in self.channels:
            raise ValueError(f"channel {channel} is open")
        ch = self.channels[channel] = MuxChannel(self, channel)
        return ch

    def forget(self, ch: MuxChannel) -> None:
        if self.channels.get(ch.channel) is ch:
            del self.channels[ch.channel]

    # -- sending -----------------------------------------------------------------------------------------

    def queue_audio(self, channel: int, frame: bytes) -> asyncio.Future[Any] | None:
        """Queue a frame for this round's message; the drain wait of the socket, if it is backed up."""
        backlog = self._backlog
        if backlog is not None and backlog.done():
            backlog = self._backlog = None
        self._pending.append((channel, frame))
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)
        return backlog

    async def send_text(self, channel: int, text: str) -> None:
        self.flush()  # the frames queued before this message go first
        await self.ws.send_str(encode_mux_text(channel, text))

    def flush(self) -> None:
        """Send the queued frames now, in as few messages as MUX_MAX_FRAMES allows."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        if not pending or self.closed:
            return
        for start in range(0, len(pending), MUX_MAX_FRAMES):
            batch = pending[start : start + MUX_MAX_FRAMES]
            self._write_now(encode_mux_audio(batch))
            self.messages_out += 1
            self.frames_out += len(batch)

    def _write_now(self, data: bytes) -> None:
        """Write now; a drain wait is kept as the backlog (see queue_audio)."""
        try:
            backlog = step_send(self.ws.send_bytes(data))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            log.debug("engine mux: send failed: %s", exc)
            self._close_channels()
            return
        if backlog is not None:
            self._backlog = backlog

    # -- receiving ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read the socket until it ends; then every channel reads CLOSED."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == WSMsgType.BINARY:
                    self._on_audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self._on_text(msg.data)
                else:  # CLOSE / CLOSING / CLOSED / ERROR
                    return
        finally:
            self._close_channels()

    def _close_channels(self) -> None:
        self._closed = True
        channels = list(self.channels.values())
        self.channels.clear()
        for ch in channels:
            ch.closed_by_mux()

    def _bad(self, exc: ProtocolError, binary: bool) -> None:
        self.bad_messages += 1
        if self.bad_messages <= 10 or self.bad_messages % 1000 == 0:  # (a peer sending garbage floods no log)
            log.warning("engine mux: %s (%d so far)", exc.message, self.bad_messages)
        if self.on_bad is not None:
            self.on_bad(binary)

    def _on_audio(self, data: bytes) -> None:
        try:
            records = decode_mux_audio(data)
        except ProtocolError as exc:
            self._bad(exc, True)
            return
        self.messages_in += 1
        self.frames_in += len(records)
        channels = self.channels
        for channel, frame in records:
            ch = channels.get(channel)
            if ch is None:
                self.dropped += 1
                continue
            ch.feed(WSMessage(WSMsgType.BINARY, frame, None))

    def _on_text(self, data: str) -> None:
        try:
            channel, text = decode_mux_text(data)
        except ProtocolError as exc:
            self._bad(exc, False)
            return
        ch = self.channels.get(channel)
        on_new = None
        if ch is None:
            on_new = self.on_new
            if on_new is None or len(self.channels) >= self.max_channels:
                self.dropped += 1
                return
            ch = self.open_channel(channel)
        ch.feed(WSMessage(WSMsgType.TEXT, text, None))
        if on_new is not None:  # (a channel the peer opened: its first message is queued in it)
            on_new(ch)


__all__ = ["MAX_CHANNELS", "Mux", "MuxChannel", "MuxClosed", "step_send"]
