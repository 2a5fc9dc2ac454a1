"""uvicorn's httptools HTTP protocol, handing WebSocket upgrades over without a second parse.

Use it as uvicorn's ``http`` setting together with pushsvc's WebSocket protocol:
``http="pushsvc.server.httpprotocol:HttpToolsProtocol"``,
``ws="pushsvc.ws.protocol:WebSocketProtocol"`` (``pushsvc serve``,
:func:`pushsvc.server.serving.uvicorn_config` and the test fixtures do).

uvicorn's own upgrade (0.54) writes the request that ``httptools`` has already
parsed back into bytes and feeds them to the WebSocket protocol, where the
``websockets`` library parses them again, in Python, line by line: about a
tenth of the server's CPU per connection in a reconnect storm
(docs/benchmarks.md, "Reconnect storm"). Here the WebSocket protocol gets the
``websockets`` :class:`~websockets.http11.Request` built from the parsed
method, URL and headers (:meth:`WebSocketProtocol.upgrade
<pushsvc.ws.protocol.WebSocketProtocol.upgrade>`); the opening handshake is then
validated and answered by ``websockets`` exactly as before.

Only requests that ``websockets``' parser would take unchanged go this way:
HTTP/1.1 or 1.0, an ASCII request target, at most 128 headers
(``websockets.http11.MAX_NUM_HEADERS``), request and header lines under 8 KiB
(``MAX_LINE_LENGTH``), header names that are RFC 9110 5.6.2 tokens, values
``websockets`` accepts, no body (RFC 6455 4.1: a GET without one). Anything else
takes uvicorn's path, so its refusals (414, 431, a closed connection for a
malformed request) and pushsvc's fixes for them in :mod:`pushsvc.ws.protocol` stay
as they were.

It also hands uvicorn's set of live connections to the process's open-file
budget (:mod:`pushsvc.server.capacity`), which refuses handshakes near the limit,
and admits new connections through the process's handshake gate (at most
``HANDSHAKES_IN_FLIGHT`` between accept and an authenticated client; the next
ones wait with reading paused).

Also: the local and peer addresses are read with ``get_extra_info("sockname")``
/ ``("peername")``, not through the transport's ``socket`` object, which uvloop
creates on first use (~8 us per connection), and the WebSocket protocol reuses
them instead of looking them up again.
"""

from __future__ import annotations

import re
from asyncio import BaseTransport

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornHttpTools
from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request

from ..ws.protocol import WebSocketProtocol
from .capacity import fd_budget, handshake_gate

_FDS = fd_budget()  # counts this process's connections (pushsvc.server.capacity)
_GATE = handshake_gate()  # bounds the handshakes in flight (pushsvc.server.capacity)

# what websockets' parser (websockets.http11.parse_headers) requires of a header:
# the name an RFC 9110 5.6.2 token; the value HTAB, SP, VCHAR or obs-text (no CR, LF, NUL)
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
# the parser's own setter (value already checked); the checking one if a release drops it
_set_header = getattr(Headers, "set_insecure", Headers.__setitem__)
# "name: value\r\n" / "GET <target> HTTP/1.1\r\n" must stay under websockets' line limit
_LINE_MARGIN = 16


class HttpToolsProtocol(_UvicornHttpTools):
    """uvicorn's :class:`~uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`
    with a parse-once WebSocket upgrade and cheaper address lookups."""

    _upgrade_checked: list[tuple[bytes, bytes]] | None = None  # headers last asked about
    _upgrade_answer = False
    gate_held = False  # holds a slot of the handshake gate (pushsvc.server.capacity)
    gate_waiting = False  # queued for a slot: what arrives meanwhile is held unread
    _held: list[bytes] | None = None  # bytes received while waiting

    def _should_upgrade(self) -> bool:
        """uvicorn's answer (``Connection: upgrade`` + ``Upgrade: websocket``), once per request.

        uvicorn asks three times per upgrade request (headers complete, message
        complete, the parser's upgrade signal), each a scan of every header.
        """
        if self._upgrade_checked is not self.headers:
            self._upgrade_checked = self.headers
            self._upgrade_answer = super()._should_upgrade()
        return self._upgrade_answer

    def connection_made(self, transport: BaseTransport) -> None:  # type: ignore[override]
        """As uvicorn's, with addresses from the transport's extras (no ``socket`` object);
        the open-file budget counts uvicorn's connection set."""
        self.connections.add(self)
        _FDS.watch(self.connections)
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        self.server = local_address(transport)
        self.client = peer_address(transport)
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        _GATE.enter(self)

    def on_headers_complete(self) -> None:
        """As uvicorn's; a plain HTTP request ends the connection's handshake (gate slot)."""
        super().on_headers_complete()
        if self.gate_held and not (self.parser.should_upgrade() and self._should_upgrade()):
            _GATE.release(self)

    def data_received(self, data: bytes) -> None:
        """As uvicorn's, except while waiting for a handshake-gate slot: the bytes are
        held (and reading paused again) until :meth:`gate_admitted`."""
        if self.gate_waiting:
            if self._held is None:
                self._held = []
            self._held.append(data)
            self.transport.pause_reading()
            return
        super().data_received(data)

    def gate_admitted(self) -> None:
        """The gate gave this connection a slot: read on, starting with what was held."""
        held, self._held = self._held, None
        self.transport.resume_reading()
        if held:
            self.data_received(b"".join(held))

    def gate_expired(self) -> None:
        """No complete request headers within ``HANDSHAKE_TIMEOUT``: close (frees the slot)."""
        if self.gate_held:
            _GATE.release(self)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's, and the gate slot (if held) goes to the next connection."""
        _GATE.release(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown of this connection; a stream is ended first.

        uvicorn waits for a response in progress to complete, and a stream
        (``GET /sse``, ``POST /stream``) never completes by itself: the stream
        endpoint leaves ``pushsvc_shutdown`` on the request cycle, which ends it
        with a ``close`` event (1012) before uvicorn's own shutdown.
        """
        closer = getattr(self.cycle, "pushsvc_shutdown", None)
        if closer is not None:
            closer()
        super().shutdown()

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to pushsvc's WebSocket protocol with the parsed request.

        Falls back to uvicorn's upgrade (serialise, parse again) when the WebSocket
        protocol is not pushsvc's or the request is not one :func:`parsed_request`
        builds.
        """
        request = None
        if issubclass(self.ws_protocol_class, WebSocketProtocol):  # type: ignore[arg-type]
            request = parsed_request(
                self.scope["method"], self.scope.get("http_version", "1.1"), self.url, self.headers
            )
        if request is None:
            _GATE.release(self)  # uvicorn's own upgrade: not followed to the end
            super().handle_websocket_upgrade()
            return
        self.connections.discard(self)
        protocol = self.ws_protocol_class(  # type: ignore[call-arg,misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        # the slot goes with the connection: released when its client is authenticated
        _GATE.hand_over(self, protocol)
        protocol.upgrade(self.transport, request, self.server, self.client)
        self.transport.set_protocol(protocol)
        # uvicorn drops the parser only in connection_lost, which an upgraded
        # connection never calls here: the parser <-> protocol cycle would be left
        # to the cyclic GC (see pushsvc.ws.protocol). httptools is done with it.
        self.parser = None  # type: ignore[assignment]


def parsed_request(
    method: str, http_version: str, url: bytes, headers: list[tuple[bytes, bytes]]
) -> Request | None:
    """The ``websockets`` request for an upgrade ``httptools`` parsed, or None.

    Args:
        method: request method, e.g. ``"GET"``.
        http_version: ``"1.1"`` or ``"1.0"`` (others: None).
        url: the raw request target (path and query), bytes.
        headers: ``(lower-case name, value)`` pairs as uvicorn collected them.

    Returns:
        A :class:`~websockets.http11.Request` equal to what ``websockets``' own
        parser makes of the same request as uvicorn serialises it (protocol
        ``HTTP/1.1``, values stripped of spaces and tabs and decoded ISO-8859-1),
        or None when that parser would refuse it or see it differently: then the
        caller takes the serialise-and-parse path, whose answers (414, 431, a
        closed connection) are the reference.
    """
    if http_version not in ("1.1", "1.0") or len(headers) > MAX_NUM_HEADERS:
        return None
    if len(url) + len(method) + 12 + _LINE_MARGIN > MAX_LINE_LENGTH or not url.isascii():
        return None
    parsed = Headers()
    limit = MAX_LINE_LENGTH - _LINE_MARGIN
    for name, value in headers:
        if len(name) + len(value) > limit or not _TOKEN.fullmatch(name):
            return None
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return None  # websockets refuses a request body
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            return None
        _set_header(parsed, name.decode("ascii"), value.decode("latin-1"))
    return Request(url.decode("ascii"), parsed, method)


def local_address(transport: BaseTransport) -> tuple[str, int | None] | None:
    """The local address as uvicorn reports it: ``(host, port)``, a Unix socket ``(path, None)``."""
    info = transport.get_extra_info("sockname")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    if isinstance(info, str):
        return (info, None)
    return None


def peer_address(transport: BaseTransport) -> tuple[str, int] | None:
    """The peer address as uvicorn reports it (``(host, port)``; a Unix socket: None)."""
    info = transport.get_extra_info("peername")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None
