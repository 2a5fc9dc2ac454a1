"""Server-Sent Events and HTTP-streaming transports: event-stream / NDJSON framing, direct writes.

Both answer one long HTTP response whose body carries the same frames as the
WebSocket (docs/protocol.md, "SSE" and "HTTP-streaming"):

- ``text/event-stream`` (WHATWG HTML 9.2): a ``message`` frame is an event with
  no ``event:`` line (``onmessage`` gets it) and ``id: <epoch>:<seq>``; any other
  frame is ``event: <type>``; the heartbeat is a comment line;
- ``application/x-ndjson``: one frame object per line; a ``message`` carries an
  ``id`` field with the same cursor.

A connection on several channels gets its messages without ids and, instead, the
node's watermark (:mod:`pushsvc.core.watermark`): an id-only block ``id:
<epoch>:<seq>`` and a blank line (which sets the browser's last event id without
dispatching an event, WHATWG HTML 9.2.6), or on NDJSON a ``position`` line. Each
kind has two :class:`Framing` objects, with and without per-message ids.

Writes go straight to the connection's asyncio transport when the server is
uvicorn's httptools protocol with a chunked response (the body's chunks framed
here as uvicorn frames them, RFC 9112 7.1); anything else uses eager ASGI
``http.response.body`` sends. Never compressed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import PING_FRAME, Close, Disconnect, encode_frame
from ..server.eager import EagerSender

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

CLOSE_TIMEOUT = 2.0  # seconds to get the close event out before dropping the connection
LINE_CACHE = 4 * 1024 * 1024  # characters of frames kept framed per wire format (recent ones)
_MESSAGE = '{"type":"message"'
_POSITION = '{"type":"position","id":"'
_SEQ = '"seq":'


def _seq_of(line: str) -> str | None:
    """The ``seq`` of an encoded ``message`` frame, as text (None: no seq).

    ``seq`` is encoded after ``data`` and only channel names and ``encoding``
    follow it, so its last occurrence is the field (never inside ``data``).
    """
    i = line.rfind(_SEQ)
    if i < 0:
        return None
    i += len(_SEQ)
    j = i
    n = len(line)
    while j < n and line[j].isdigit():
        j += 1
    return line[i:j] if j > i else None


def _type_of(line: str) -> str:
    """The ``type`` of an encoded frame (msgspec writes the tag field first)."""
    return line[9 : line.index('"', 9)]


def chunk(body: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 7.1) carrying ``body``."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class Framing:
    """The wire format of a batch for one stream kind, shared by every connection of a node.

    Args:
        kind: ``"sse"`` (event stream) or ``"stream"`` (NDJSON).
        epoch: returns the stream's current epoch (ids are ``<epoch>:<seq>``).
        ids: True: every ``message`` carries its own id (a connection on one
            channel or pattern); False: messages carry none and ``position``
            frames (the watermark) carry the id (a connection on several).

    Attributes:
        body: batch text -> body bytes (no transfer coding).
        chunked: batch text -> one HTTP chunk of that body: the fan-out's framing
            for direct writes. Both keep their last result (keyed by the text's
            identity), so a fan-out frames a batch once for all connections.
    """

    def __init__(self, kind: str, epoch: Callable[[], str | None], ids: bool = True) -> None:
        self.kind = kind
        self.ids = ids
        self._epoch = epoch
        self._line = self._sse_line if kind == "sse" else self._ndjson_line
        self._last_text: str | None = None
        self._last_body = b""
        self._last_chunk_text: str | None = None
        self._last_chunk = b""
        # frame -> its framed text: a connection behind (its own batch, not the shared
        # one) is written the same frames the fan-out framed already
        self._lines: dict[str, str] = {}
        self._lines_epoch: str | None = None
        self._lines_size = 0  # characters held by _lines
        # one bound method each, created once: the fan-out compares framings by identity
        self.body = self._body
        self.chunked = self._chunked

    def cursor(self, seq: str) -> str:
        """The event id of ``seq``: ``<epoch>:<seq>`` (epoch empty with history off)."""
        return f"{self._epoch() or ''}:{seq}"

    def _sse_line(self, line: str) -> str:
        if line.startswith(_MESSAGE):
            seq = _seq_of(line) if self.ids else None
            if seq is not None:
                return f"id: {self.cursor(seq)}\ndata: {line}\n\n"
            return f"data: {line}\n\n"
        if line == PING_FRAME:
            return ":\n\n"
        if line.startswith(_POSITION):  # an id-only block: no event is dispatched
            return f"id: {line[len(_POSITION) : -2]}\n\n"
        return f"event: {_type_of(line)}\ndata: {line}\n\n"

    def _ndjson_line(self, line: str) -> str:
        if self.ids and line.startswith(_MESSAGE):
            seq = _seq_of(line)
            if seq is not None:
                return f'{{"id":"{self.cursor(seq)}",{line[1:]}\n'
        return line + "\n"

    def _body(self, text: str) -> bytes:
        if text is not self._last_text:
            lines = self._lines
            epoch = self._epoch()
            if epoch != self._lines_epoch or self._lines_size > LINE_CACHE:
                lines.clear()
                self._lines_size = 0
                self._lines_epoch = epoch
            get = lines.get
            fill = self._fill
            self._last_body = "".join([get(x) or fill(x) for x in text.split("\n")]).encode()
            self._last_text = text
        return self._last_body

    def _fill(self, frame: str) -> str:
        framed = self._lines[frame] = self._line(frame)
        self._lines_size += 2 * len(frame) + 40
        return framed

    def _chunked(self, text: str) -> bytes:
        if text is not self._last_chunk_text:
            self._last_chunk = chunk(self._body(text))
            self._last_chunk_text = text
        return self._last_chunk

    def close_event(self, disconnect: Disconnect) -> bytes:
        """The ``close`` event / frame for ``disconnect``."""
        data = encode_frame_close(disconnect)
        if self.kind == "sse":
            return b"event: close\ndata: " + data + b"\n\n"
        return data + b"\n"


def encode_frame_close(disconnect: Disconnect) -> bytes:
    """``{"type":"close","code","reason","reconnect"}``."""
    return encode_frame(
        Close(code=disconnect.code, reason=disconnect.reason, reconnect=disconnect.reconnect)
    )


def direct_cycle(receive: ASGIReceive) -> Any:
    """uvicorn's httptools request cycle behind ``receive``, if chunks can bypass ASGI.

    Needs a started, chunked response (no ``Content-Length``), as the stream
    endpoints send; anything else (another server, h11) uses the ASGI path.
    """
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not getattr(cycle, "chunked_encoding", False):
        return None
    if not hasattr(cycle, "transport") or not hasattr(cycle, "flow"):
        return None
    return cycle


class StreamTransport:
    """The core's :class:`~pushsvc.core.transport.Transport` over a streaming HTTP response.

    Args:
        name: ``"sse"`` or ``"stream"`` (metrics label).
        framing: the node's :class:`Framing` for that kind.
        unmarked: the node's :class:`Framing` of that kind without per-message ids
            (a connection on several channels: :meth:`use_watermarks`).
        send / receive: the ASGI callables of the request, after the response
            started (headers and the first body bytes sent).

    Attributes:
        reader: the endpoint's task (cancelled once the close event is out).
    """

    expects_pong = False
    watermarks = True

    __slots__ = (
        "_closer",
        "_cycle",
        "_framing",
        "_framings",
        "_inflight",
        "_send",
        "framing",
        "name",
        "reader",
        "wire",
    )

    def __init__(
        self, name: str, framing: Framing, unmarked: Framing, send: ASGISend, receive: ASGIReceive
    ) -> None:
        self.name = name
        self._framing = framing
        self._framings = (framing, unmarked)
        self._send = send
        self._cycle = direct_cycle(receive)
        self.wire: asyncio.WriteTransport | None = (
            None if self._cycle is None else self._cycle.transport
        )
        self.framing = framing.chunked
        self._inflight = EagerSender()  # an ASGI body send that hit backpressure
        self._closer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None

    def use_watermarks(self, on: bool) -> None:
        """Frame messages without ids (on: several channels) or with their own (off)."""
        self._framing = self._framings[1 if on else 0]
        self.framing = self._framing.chunked

    def can_write(self) -> bool:
        """False while a write waits for the socket (backpressure) or an ASGI send is in flight."""
        if self._inflight.busy:
            return False
        cycle = self._cycle
        return cycle is None or not cycle.flow.write_paused

    def write(self, text: str) -> None:
        """Write one batch (direct chunk, else an eager ASGI body send).

        Raises:
            ConnectionResetError: the peer is gone.
        """
        cycle = self._cycle
        if cycle is not None:
            if cycle.disconnected or cycle.transport.is_closing():
                raise ConnectionResetError("peer gone")
            cycle.transport.write(self._framing.chunked(text))
            return
        body = self._framing.body(text)
        self._inflight.start(
            self._send({"type": "http.response.body", "body": body, "more_body": True})
        )

    async def drained(self) -> None:
        """Wait for the socket to take the buffered bytes (or finish the ASGI send)."""
        if self._inflight.busy:
            await self._inflight.finish()
            return
        cycle = self._cycle
        if cycle is not None:
            await cycle.flow.drain()
            if cycle.disconnected:
                raise ConnectionResetError("peer gone")

    def close(self, disconnect: Disconnect) -> None:
        """Write the ``close`` event and end the body, in the background (bounded)."""
        self._inflight.abandon()
        body = self._framing.close_event(disconnect)
        self._closer = asyncio.get_running_loop().create_task(self._finish(body))

    async def _finish(self, body: bytes) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:
            self.abort()
            return
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()

    def abort(self) -> None:
        """Drop the connection at once."""
        cycle = self._cycle
        if cycle is not None:
            cycle.transport.abort()
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
