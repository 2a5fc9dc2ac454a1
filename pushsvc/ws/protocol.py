"""uvicorn's ``websockets-sansio`` protocol with three handshake-refusal fixes.

Use it as uvicorn's ``ws`` setting: ``ws="pushsvc.ws.protocol:WebSocketProtocol"``
(``pushsvc serve`` and the test fixtures do). Found by tests/test_hostile.py
against uvicorn 0.54 / websockets 17:

1. A handshake the ``websockets`` parser rejects before it is a request -- a
   request line or header line over 8192 bytes (e.g. a 9 KB ``?token=`` or
   ``Authorization`` header), more than 128 headers, or garbage after the
   ``Upgrade`` -- gets its answer (414/431) queued but never written, and the
   connection is never closed: one such request holds a socket forever, and
   uvicorn's graceful shutdown then crashes on it (``AssertionError`` in
   ``send_eof``), so the remaining sessions are not closed with 1012. Here the
   answer is written and the connection closed at once.
2. A handshake refused by the app with the ASGI "websocket.http.response"
   extension (pushsvc's 403/429/503 before accept) is logged by uvicorn as an
   ERROR "ASGI callable returned without completing handshake.": hostile clients
   could flood the error log. The refusal is complete once its body is sent.
3. A handshake asking for a ``Sec-WebSocket-Version`` other than 13 got ``400``;
   RFC 6455 4.2.2 (and 4.4) asks for ``426 Upgrade Required`` with
   ``Sec-WebSocket-Version: 13`` so that the client can retry with a version the
   server speaks.

And two memory/CPU fixes. First, the HTTP protocol object that read the upgrade request
(uvicorn's ``HttpToolsProtocol``) stays in a reference cycle with its
``httptools`` parser after the upgrade (uvicorn breaks it only in
``connection_lost``, which an upgraded connection never calls on it), so every
WebSocket left ~5 KiB of garbage for the cyclic collector; in a reconnect storm
those objects reach the oldest generation and full collections were most of
the server's CPU per connection. The cycle is broken right after the upgrade.
Second, the ``websockets`` frame parser (a generator) and its protocol object
stay in a cycle after the TCP connection is gone; it is closed in
``connection_lost`` (:func:`_close_frame_parser`).

With :class:`pushsvc.server.httpprotocol.HttpToolsProtocol` as uvicorn's ``http``
protocol, :meth:`WebSocketProtocol.upgrade` takes the request ``httptools``
already parsed instead of parsing it a second time. Protocol pings are armed on
the loop's shared coarse timer (:mod:`pushsvc.core.deadlines`), and the handshake's
request and response are dropped once the 101 is written.
"""

from __future__ import annotations

import asyncio
from asyncio import BaseTransport, Transport
from collections.abc import Coroutine
from http import HTTPStatus
from operator import methodcaller
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import Protocol

from ..core.deadlines import deadlines
from ..server.capacity import handshake_gate
from .deflate import SERVER_FACTORY

WEBSOCKET_VERSION = "13"  # RFC 6455 4.1 (the only version)
#: the canonical heartbeat answer (docs/protocol.md, "Heartbeat"), as clients send it
PONG = b'{"op":"pong"}'
_SEND_KEEPALIVE_PING = methodcaller("send_keepalive_ping")  # uvicorn's, or an override


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """:class:`WebSocketsSansIOProtocol` that answers and closes rejected handshakes.

    Attributes:
        on_pong: set by the connection's transport
            (:meth:`pushsvc.ws.transport.WebSocketTransport.take_pongs`):
            called for a text message that is exactly :data:`PONG`, which then
            skips uvicorn's ASGI queue, its pause/resume of reading and the
            session's reader task (the heartbeat's inbound half, once per
            connection per ``PUSHSVC_PING_INTERVAL``). None: every message goes
            to the application.
    """

    on_pong: Any = None
    gate_held = False  # holds a handshake-gate slot (pushsvc.server.capacity)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """uvicorn's, with a lighter receive queue and ``writable`` event (same behaviour).

        uvicorn gives every connection an ``asyncio.Queue`` (three deques and an
        Event with a fourth) and an ``asyncio.Event`` (a fifth deque): ~4 KiB per
        idle connection, for a queue that holds one message at a time (uvicorn
        pauses reading while one waits) and an event nobody waits on unless the
        socket is backed up. :class:`Mailbox` and :class:`Flag` do the same with
        a list and waiters made on demand (docs/capacity.md, "Where the memory
        per connection goes").
        """
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:  # PUSHSVC_COMPRESSION=deflate (uvicorn_config)
            # shared frames (pushsvc.ws.deflate): no context on either side, RFC 7692 7.1.1
            self.conn.available_extensions = [SERVER_FACTORY]
        self.queue = Mailbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()

    def connection_made(self, transport: BaseTransport) -> None:
        """Take the connection from the HTTP protocol, then release that protocol's parser.

        uvicorn calls this during the upgrade, while the transport still points at the
        HTTP protocol; once the upgrade has returned (next loop turn), the HTTP
        protocol's ``parser`` is dropped as uvicorn's own ``connection_lost`` does.
        """
        super().connection_made(transport)
        http = transport.get_protocol()
        if http is not self and hasattr(http, "parser"):
            self.loop.call_soon(_release_parser, http)

    def upgrade(
        self,
        transport: Transport,
        request: Request,
        server: tuple[str, int | None] | None,
        client: tuple[str, int] | None,
    ) -> None:
        """Take over ``transport`` with its opening handshake already parsed.

        What ``connection_made`` then ``data_received(<the request's bytes>)`` do,
        without the bytes: called by :class:`pushsvc.server.httpprotocol.HttpToolsProtocol`,
        which read the request with ``httptools`` and built ``request``. The
        ``websockets`` connection skips its HTTP request parser and starts on
        frames, as it does after parsing a request itself; the request is then
        validated and answered (101 on accept, or the refusal) by
        :meth:`handle_connect`, as on uvicorn's path.

        Args:
            transport: the connection (still pointing at the HTTP protocol).
            request: the opening handshake (path with query, headers).
            server / client: local and peer address as the HTTP protocol found them.
        """
        self.connections.add(self)
        self.transport = transport
        self.server = server
        self.client = client
        self.scheme = "wss" if transport.get_extra_info("sslcontext") else "ws"
        conn = self.conn
        conn.parser = Protocol.parse(conn)  # the frame parser ServerProtocol.parse ends in
        next(conn.parser)
        self.handle_connect(request)

    def schedule_ping(self) -> None:
        """Arm the next protocol ping (RFC 6455 5.5.2) on the loop's shared coarse timer.

        uvicorn gives every connection its own ``call_later`` timer for it, held
        for the connection's life; here it is an entry in
        :func:`pushsvc.core.deadlines.deadlines` (0.1 s ticks: the ping interval is
        20 s). The pong deadline after each ping stays uvicorn's own timer.
        """
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        deadlines(self.loop, "ws-ping", _SEND_KEEPALIVE_PING).set(self, delay)

    def stop_keepalive(self) -> None:
        """Disarm the protocol ping, then uvicorn's own cleanup (the pong timer)."""
        deadlines(self.loop, "ws-ping", _SEND_KEEPALIVE_PING).clear(self)
        super().stop_keepalive()

    def handshake_done(self) -> None:
        """The application has an authenticated client: free the handshake-gate slot."""
        handshake_gate().release(self)

    def gate_expired(self) -> None:
        """Still no authenticated client after ``HANDSHAKE_TIMEOUT``: give the slot back
        (``PUSHSVC_AUTH_TIMEOUT`` closes a socket that never authenticates)."""
        handshake_gate().release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's; the handshake-gate slot (if still held) is freed and the
        ``websockets`` frame parser is closed (:func:`_close_frame_parser`)."""
        handshake_gate().release(self)
        super().connection_lost(exc)
        _close_frame_parser(self.conn)

    def handle_text(self, event: Frame) -> None:
        """A text frame: a whole ``{"op":"pong"}`` goes to :attr:`on_pong`, the rest to uvicorn."""
        if event.fin and self.on_pong is not None and event.data == PONG and not self.close_sent:
            self.on_pong()
            return
        super().handle_text(event)

    def data_received(self, data: bytes) -> None:
        """Feed bytes; if the opening handshake was rejected by the parser, answer and close."""
        super().data_received(data)
        if (
            not self.handshake_initiated
            and not self.close_sent
            and self.conn.handshake_exc is not None
        ):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_complete = True
            self.close_sent = True
            self.transport.close()

    def handle_connect(self, event: Request) -> None:
        """An opening handshake: 426 for an unsupported version, else as uvicorn does."""
        versions = event.headers.get_all("Sec-WebSocket-Version")
        if len(versions) != 1 or versions[0].strip() == WEBSOCKET_VERSION:
            super().handle_connect(event)
            return
        response = self.conn.reject(
            HTTPStatus.UPGRADE_REQUIRED,
            f"Failed to open a WebSocket connection: unsupported Sec-WebSocket-Version "
            f"(this server speaks {WEBSOCKET_VERSION}).\n",
        )
        response.headers["Upgrade"] = "websocket"
        response.headers["Sec-WebSocket-Version"] = WEBSOCKET_VERSION
        self.request = event
        self.response = response
        self.handshake_initiated = True
        self.handshake_complete = True
        self.close_sent = True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def send(self, message: Any) -> Coroutine[Any, Any, None]:
        """ASGI send; a finished denial response completes the handshake (no ERROR log).

        A plain method returning the coroutine to await: every delivery goes
        through here, so it adds no coroutine frame of its own.
        """
        kind = message["type"]
        if kind == "websocket.accept":
            return self._send_accept(message)
        if kind == "websocket.http.response.body" and not message.get("more_body", False):
            return self._send_denial_body(message)
        return super().send(message)

    async def _send_accept(self, message: Any) -> None:
        """uvicorn's accept (the 101 response), then forget the opening handshake.

        uvicorn keeps the ``websockets`` request and response (each with its
        headers: ~20 container objects and their strings) for the life of the
        connection but never reads them after the 101 is written: dropped here,
        they cost neither idle memory nor garbage-collector passes. So do the
        request headers of the ASGI scope (~0.7 KiB): a WebSocket application
        reads them before it accepts.
        """
        try:
            await super().send(message)
        finally:
            if self.handshake_complete:
                self.request = self.response = None  # type: ignore[assignment]
                # the scope's copy of the request headers (list of byte pairs) too: the
                # application read them before accepting (pushsvc.ws.endpoint)
                self.scope["headers"] = []

    async def _send_denial_body(self, message: Any) -> None:
        await super().send(message)
        self.handshake_complete = True


class Mailbox:
    """What uvicorn needs of its per-connection receive queue: ``put_nowait``,
    ``get`` (a coroutine), ``empty``; FIFO, unbounded, several getters served in order.

    An ``asyncio.Queue`` costs ~3 KiB per connection (three deques of 64 slots
    and an Event with another); this is a list and, while someone waits, a list
    of futures.
    """

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiters: list[asyncio.Future[None]] | None = None

    def empty(self) -> bool:
        """True when no message is waiting."""
        return not self._items

    def qsize(self) -> int:
        """Messages waiting."""
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        """Append ``item`` and wake the first waiting getter."""
        self._items.append(item)
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> Any:
        """The oldest message, waiting for one if there is none."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if self._waiters and waiter in self._waiters:
                    self._waiters.remove(waiter)
                if self._items and not waiter.cancelled():
                    self._wake_next()
                raise
        return self._items.pop(0)

    def _wake_next(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class Flag:
    """What uvicorn needs of its ``writable`` event: ``is_set``, ``set``, ``clear`` and
    ``wait`` (a coroutine awaiting one future, as ``asyncio.Event.wait`` does, so
    :func:`pushsvc.ws.transport.resume` can drive a send blocked on it).

    No deque until someone waits (an ``asyncio.Event`` allocates one at once:
    ~0.8 KiB per connection).
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        """True while set."""
        return self._set

    def set(self) -> None:
        """Set it and wake every waiter."""
        if not self._set:
            self._set = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        """Clear it (waiters wait for the next :meth:`set`)."""
        self._set = False

    async def wait(self) -> bool:
        """Return True once set (at once if it is)."""
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)


def _close_frame_parser(conn: Protocol) -> None:
    """Close the ``websockets`` frame parser of a connection whose TCP is gone.

    ``Protocol.parse`` (or ``discard`` after a closing handshake) is a generator
    that holds the protocol object, which holds it back: a cycle that ends only
    when EOF is fed to the parser, and uvicorn never feeds it (its
    ``eof_received`` does nothing). Each closed connection then left its
    ``ServerProtocol``, reader, parser generators and close frames (~1.7 KiB) for
    a full collection, which ``pushsvc serve``'s collector settings make rare:
    RSS grew with every reconnect (docs/capacity.md, "Soak"). Closing the
    generator ends it now (``GeneratorExit`` is no ``Exception``: ``parse``
    catches none of it), and reference counting frees the rest. A frame the
    parser refused (e.g. over ``ws_max_size``: 1009) left its exception in
    ``parser_exc``, whose traceback holds the ``parse`` frame and so the
    protocol: the traceback is dropped, the exception kept.
    """
    conn.parser.close()
    if conn.parser_exc is not None:
        conn.parser_exc.__traceback__ = None


def _release_parser(http: Any) -> None:
    """Break the HTTP protocol <-> ``httptools`` parser cycle of an upgraded connection."""
    http.parser = None
