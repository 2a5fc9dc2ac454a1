"""The WebSocket transport: RFC 6455 text frames, uvicorn's direct path, eager ASGI sends.

:class:`WebSocketTransport` is what the connection core
(:mod:`pushsvc.core.transport`) writes to. Two ways a batch reaches the socket:

- **direct** (uvicorn's websockets-sansio protocol, no extension negotiated, or
  pushsvc's shared permessage-deflate, :mod:`pushsvc.ws.deflate`): the batch is
  framed once (:func:`text_frame`, RFC 6455 5.2, built by the ``websockets``
  library; the same bytes uvicorn would write; or compressed once,
  :class:`~pushsvc.ws.deflate.DeflateFraming`, on a
  :class:`DeflateWebSocketTransport`) and written to the connection's asyncio
  transport, with no ASGI send coroutine;
- **ASGI**: any other server, or a direct connection under backpressure (uvicorn's
  ``writable`` event clear) or closing: the ASGI ``websocket.send`` coroutine is
  started *eagerly* (``coro.send(None)``); when the server writes at once (the
  usual case) it completes synchronously with no task. When it yields (waiting for
  the socket to drain) the send is in flight and :meth:`WebSocketTransport.drained`
  finishes it (:func:`resume`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import Disconnect
from ..server.eager import EagerSender
from .deflate import SERVER_WINDOW_BITS, DeflateFraming, deflate_framing, shared_deflate

try:  # the direct write path applies to uvicorn's websockets-sansio protocol only
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIOProtocol,
    )
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State

    _OPEN: Any = State.OPEN
except ImportError:  # pragma: no cover - another ASGI server
    _SansIOProtocol = None  # type: ignore[assignment,misc]
    _OPEN = None

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

CLOSE_TIMEOUT = 2.0  # seconds to get a close frame out before dropping the socket
_MAX_REASON = 120  # bytes of a close reason (RFC 6455 5.5: 125-byte control payload)

_last_text: str | None = None
_last_frame = b""


def text_frame(text: str) -> bytes:
    """The wire bytes of a server text frame carrying ``text`` (RFC 6455 5.2, unmasked).

    A fan-out hands the same ``str`` to every connection in turn, so a one-entry
    cache keyed by identity frames a message once, not once per socket.
    """
    global _last_text, _last_frame
    if text is not _last_text:
        _last_frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        _last_text = text
    return _last_frame


def abort_connection(receive: ASGIReceive) -> bool:
    """Abort the TCP connection behind ``receive``, when the server exposes it.

    ASGI has no "abort". uvicorn passes its protocol's bound ``receive`` method
    unwrapped through Starlette, and the protocol's ``transport`` is an asyncio
    transport: ``abort()`` drops its buffer and the socket at once (the reader then
    gets ``websocket.disconnect``); with ``SO_LINGER`` 0 the kernel resets the
    connection and frees its send buffer too. With another server this does
    nothing and the server's own timeouts apply. Returns True when it aborted.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # linger 0: reset, so the kernel frees its send buffer now, not after probes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except Exception:  # already closed, or a transport without a real socket
            pass
    abort()
    return True


def direct_protocol(receive: ASGIReceive) -> Any:
    """uvicorn's websockets-sansio protocol behind ``receive``, if frames can bypass ASGI.

    It needs uvicorn's sans-I/O protocol with no extension negotiated, or only
    pushsvc's shared permessage-deflate (no context kept by the server, so a
    plain or a shared compressed frame written past ``websockets`` is right,
    :func:`pushsvc.ws.deflate.shared_deflate`); any other server or extension uses
    the ASGI path.
    """
    proto = getattr(receive, "__self__", None)
    if _SansIOProtocol is None or not isinstance(proto, _SansIOProtocol):
        return None
    extensions = proto.conn.extensions
    if extensions and shared_deflate(extensions) is None:
        return None
    return proto


def can_write_direct(proto: Any) -> bool:
    """True while the connection is open and uvicorn would write at once (no backpressure)."""
    return (
        proto.writable.is_set()
        and not proto.close_sent
        and proto.conn.state is _OPEN
        and not proto.transport.is_closing()
    )


class WebSocketTransport:
    """The core's :class:`~pushsvc.core.transport.Transport` over an accepted ASGI WebSocket.

    Args:
        send / receive: the ASGI callables of the *accepted* WebSocket.

    Attributes:
        reader: the task reading the connection (set by the endpoint): cancelled
            when a close frame could not be written in time.
    """

    name = "ws"
    expects_pong = True
    watermarks = False  # every message carries its channel's seq; no stream-wide id
    framing = staticmethod(text_frame)

    __slots__ = ("_closer", "_direct", "_inflight", "_receive", "_send", "reader", "wire")

    def __init__(self, send: ASGISend, receive: ASGIReceive) -> None:
        self._send = send
        self._receive = receive
        self._direct = direct_protocol(receive)
        self.wire: asyncio.WriteTransport | None = (
            None if self._direct is None else self._direct.transport
        )
        self._inflight = EagerSender()  # an ASGI send that hit backpressure
        self._closer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None

    def established(self) -> None:
        """The client is authenticated: the connection's handshake is over (it frees its
        slot of the server's handshake gate, :class:`pushsvc.server.capacity.HandshakeGate`)."""
        done = getattr(self._direct, "handshake_done", None)
        if done is not None:
            done()

    def take_pongs(self, callback: Callable[[], None] | None) -> bool:
        """Hand this connection's canonical pongs to ``callback`` (None: stop).

        With pushsvc's WebSocket protocol (:mod:`pushsvc.ws.protocol`) a text
        message that is exactly ``{"op":"pong"}`` then never reaches the ASGI
        queue: no reading pause/resume, no reader task wake-up, no JSON decode:
        the inbound half of every heartbeat. Other pongs and servers take the
        command path. Returns True when the protocol took the callback.
        """
        direct = self._direct
        if direct is None or not hasattr(direct, "on_pong"):
            return False
        direct.on_pong = callback
        return True

    def use_watermarks(self, on: bool) -> None:
        """Not used: a WebSocket client resumes per channel (``subscribe`` ``since``)."""

    def can_write(self) -> bool:
        """False while an ASGI send is in flight (the server applies backpressure)."""
        return not self._inflight.busy

    def write(self, text: str) -> None:
        """Write one batch: direct when uvicorn would write at once, else an eager ASGI send.

        Raises:
            OSError: the peer is gone (the ASGI server's ``send`` raised it).
        """
        direct = self._direct
        if direct is not None and can_write_direct(direct):
            direct.transport.write(text_frame(text))
            return
        self._inflight.start(self._send({"type": "websocket.send", "text": text}))

    async def drained(self) -> None:
        """Finish the ASGI send in flight."""
        await self._inflight.finish()

    def close(self, disconnect: Disconnect) -> None:
        """Send the close frame in the background (bounded by ``CLOSE_TIMEOUT`` seconds)."""
        self._inflight.abandon()  # the blocked send: the close frame comes next
        reason = disconnect.reason.encode()[:_MAX_REASON].decode(errors="ignore")
        loop = asyncio.get_running_loop()
        self._closer = loop.create_task(self._send_close(disconnect.code, reason))

    async def wait_closed(self) -> None:
        """Wait until the close frame is out or given up on (at most ``CLOSE_TIMEOUT``)."""
        if self._closer is not None and not self._closer.done():
            await asyncio.wait([self._closer])

    async def _send_close(self, code: int, reason: str) -> None:
        """Write the close frame; if the peer does not take it in time, drop the connection.

        A peer that does not read keeps the server's buffers (the transport's and
        the kernel's, megabytes) full, and a graceful close waits for them to drain:
        so the TCP connection is aborted (uvicorn) and the reader stopped.
        """
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            return
        except Exception:
            pass
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection (uvicorn) and stop the reader."""
        abort_connection(self._receive)
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()


class DeflateWebSocketTransport(WebSocketTransport):
    """A :class:`WebSocketTransport` whose connection negotiated shared permessage-deflate.

    Its ``framing`` is the process's :class:`~pushsvc.ws.deflate.DeflateFraming`
    for the negotiated window: the fan-out compresses a batch once for every such
    connection (RFC 7692 7.1.1.1, ``server_no_context_takeover``). A separate
    class, so connections without compression keep the plain class's path and
    its module-level framing untouched.

    Args:
        send / receive: the ASGI callables of the *accepted* WebSocket.
        framing: the shared compressed framing (:func:`websocket_transport` picks it).
    """

    __slots__ = ("framing",)

    def __init__(self, send: ASGISend, receive: ASGIReceive, framing: DeflateFraming) -> None:
        super().__init__(send, receive)
        self.framing = framing  # type: ignore[misc]

    def write(self, text: str) -> None:
        """As :meth:`WebSocketTransport.write`, the direct write compressed by ``framing``.

        Raises:
            OSError: the peer is gone (the ASGI server's ``send`` raised it).
        """
        direct = self._direct
        if direct is not None and can_write_direct(direct):
            direct.transport.write(self.framing(text))
            return
        self._inflight.start(self._send({"type": "websocket.send", "text": text}))


def websocket_transport(
    send: ASGISend, receive: ASGIReceive, *, compression: str = "off", min_bytes: int = 512
) -> WebSocketTransport:
    """The transport for an accepted WebSocket: compressed when both sides agreed.

    Args:
        send / receive: the ASGI callables of the *accepted* WebSocket.
        compression: ``PUSHSVC_COMPRESSION`` (``off`` or ``deflate``).
        min_bytes: ``PUSHSVC_COMPRESSION_MIN_BYTES``: smaller batches stay uncompressed.

    Returns:
        A :class:`DeflateWebSocketTransport` when ``compression`` is ``deflate`` and
        the handshake negotiated pushsvc's shared permessage-deflate
        (:data:`pushsvc.ws.deflate.SERVER_FACTORY`) on uvicorn's sans-I/O protocol;
        else a plain :class:`WebSocketTransport` (uncompressed frames, which are
        valid on a connection that negotiated the extension too: RFC 7692 6).
    """
    if compression == "deflate":
        proto = direct_protocol(receive)
        ext = None if proto is None else shared_deflate(proto.conn.extensions)
        if ext is not None:
            bits = min(ext.local_max_window_bits, SERVER_WINDOW_BITS)
            return DeflateWebSocketTransport(send, receive, deflate_framing(bits, min_bytes))
    return WebSocketTransport(send, receive)
