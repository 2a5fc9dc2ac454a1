"""A bench client over SSE (``GET /sse``) or HTTP-streaming (``POST /stream``).

The same accounting as the WebSocket :class:`~pushsvc.bench.client.Client`
(its :meth:`_on_text` gets the frames' JSON joined by ``\\n``); only the wire
differs: one HTTP/1.1 request, then a chunked body (RFC 9112 7.1, decoded by
httptools, uvicorn's own parser) of ``text/event-stream`` events (WHATWG HTML
9.2) or NDJSON lines, taken a complete line at a time. Heartbeats need
no answer. The request carries the token (``Authorization: Bearer``) and the
channel, so ``subscribed`` is the one answer to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any
from urllib.parse import quote

import httptools

from .client import Client, SetupError, Tally

_DATA = re.compile(rb"^data: (.*)$", re.MULTILINE)  # an event's data lines (one per frame)


class StreamClient(Client):
    """One SSE / HTTP-streaming client (``kind`` ``"sse"`` or ``"stream"``)."""

    __slots__ = ("closed_code", "kind", "parser", "pieces", "refused", "rest")

    def __init__(self, worker: Tally, gid: int, token: str, stalled: bool, kind: str) -> None:
        super().__init__(worker, gid, token, stalled)
        self.kind = kind
        self.parser = httptools.HttpResponseParser(self)
        self.pieces: list[bytes] = []  # body bytes of the current read
        self.rest = b""  # the body's last line so far, not ended by \n yet
        self.refused = False
        self.closed_code = 1006
        self.waiting = "subscribed"

    def request(self) -> bytes:
        """The HTTP request that opens the stream."""
        cfg = self.w.cfg  # type: ignore[attr-defined]  # the worker (a Tally) holds it
        host = cfg["netloc"]
        auth = f"Authorization: Bearer {self.token}\r\n"
        if self.kind == "sse":
            path = f"{cfg['base']}/sse?channel={quote(self.channel)}"
            return (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Accept: text/event-stream\r\n\r\n"
            ).encode()
        body = json.dumps({"channels": [self.channel]}).encode()
        return (
            f"POST {cfg['base']}/stream HTTP/1.1\r\nHost: {host}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._wake(SetupError(f"stream: not an HTTP/1.1 response ({exc})"))
            self.close()
            return
        if not self.pieces:
            return
        payload = self.rest + b"".join(self.pieces)
        self.pieces.clear()
        cut = payload.rfind(b"\n") + 1
        self.rest = payload[cut:]
        if cut and not self.discard:
            self._on_payload(payload[:cut], now)

    # httptools callbacks -------------------------------------------------------
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 200:
            self.refused = True
            self._wake(SetupError(f"stream refused: HTTP {status}"))

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            self.pieces.append(body)

    def _on_payload(self, payload: bytes, now: int) -> None:
        if self.kind == "sse":
            lines = _DATA.findall(payload)  # in C: about half the cost of a split and filter
        else:
            lines = [line for line in payload.split(b"\n") if line]
        if lines:
            self._on_text(b"\n".join(lines), now)

    def _on_control(self, kind: Any, code: Any, message: Any) -> None:
        if kind == "ping":
            return  # no answer needed on a stream
        if kind == "close":
            self.closed_code = code if isinstance(code, int) else 1006
            return
        super()._on_control(kind, code, message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        code = self.closed_code
        if not self.closing:
            if self.stalled:
                self.w.stall_codes[code] += 1
            else:
                self.w.closes[code] += 1
        self._wake(SetupError(f"stream closed (code {code})"))
        if not self.lost.done():
            self.lost.set_result(code)

    # sending -----------------------------------------------------------------
    def send_obj(self, obj: dict[str, Any]) -> None:
        """Streams take no commands from the bench (everything is in the request)."""

    def close(self) -> None:
        """Close the connection (the server sees the stream end)."""
        self.closing = True
        tr = self.transport
        if tr is not None and not tr.is_closing():
            with contextlib.suppress(Exception):
                tr.close()
