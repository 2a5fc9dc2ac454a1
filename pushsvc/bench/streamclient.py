"""A bench client over SSE (``GET /sse``) or HTTP-streaming (``POST /stream``).

The same accounting as the WebSocket :class:`~pushsvc.bench.client.Client`
(its :meth:`_on_text` gets the frames' JSON joined by ``\\n``); only the wire
differs: one HTTP/1.1 request, then a chunked body (RFC 9112 7.1) of
``text/event-stream`` events (WHATWG HTML 9.2) or NDJSON lines. Heartbeats need
no answer. The request carries the token (``Authorization: Bearer``) and the
channel, so ``subscribed`` is the one answer to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any
from urllib.parse import quote

from .client import Client, SetupError, Tally


class StreamClient(Client):
    """One SSE / HTTP-streaming client (``kind`` ``"sse"`` or ``"stream"``)."""

    __slots__ = ("body", "closed_code", "head", "kind")

    def __init__(self, worker: Tally, gid: int, token: str, stalled: bool, kind: str) -> None:
        super().__init__(worker, gid, token, stalled)
        self.kind = kind
        self.head = b""  # response bytes until the end of the headers (None after)
        self.body = b""  # undecoded chunked bytes
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
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0]
            data, self.head = self.head[end + 4 :], None
            if b" 200 " not in status + b" ":
                self._wake(SetupError(f"stream refused: {status.decode(errors='replace')}"))
                return
        self.body += data
        payload = self._dechunk()
        if payload and not self.discard:
            self._on_payload(payload, now)

    def _dechunk(self) -> bytes:
        """Take the complete chunks off ``body``; their data, concatenated."""
        out = []
        buf = self.body
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            start = eol + 2
            if len(buf) < start + size + 2:
                break
            out.append(buf[start : start + size])
            pos = start + size + 2
            if size == 0:
                break
        self.body = buf[pos:]
        return b"".join(out)

    def _on_payload(self, payload: bytes, now: int) -> None:
        if self.kind == "sse":
            lines = [line[6:] for line in payload.split(b"\n") if line.startswith(b"data: ")]
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
