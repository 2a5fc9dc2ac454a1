"""A keep-alive HTTP/1.1 client connection for the bench: h11 over asyncio streams.

h11 (python-hyper's sans-I/O HTTP/1.1 implementation, RFC 9112) does all the
framing and parsing: request serialisation, status line, headers,
``Content-Length`` and chunked bodies, keep-alive and ``Connection: close``.
This module only moves its bytes over one asyncio connection.

Why not httpx: measured on the project's 2-core VM (2026-11-30, shared and
busy, runs interleaved), 1000 x 100 B ``POST /emit`` over 16 keep-alive
connections against ``pushsvc serve``, with
``pushsvc bench --via emit --clients 10 --messages 1000 --procs 1``:

- httpx 0.28 (one AsyncClient, pool of 16): 73 / 104 / 205 POSTs/s, generator
  CPU 3.1-4.7 s (cProfile: httpcore's pool re-scanning every queued request
  and anyio's ``get_extra_info`` running import lookups on every request);
- h11 over asyncio streams (this module): 624 / 917 / 617 POSTs/s, 0.78-0.82 s;
- the former hand-written parser: 641 / 890 / 667 POSTs/s, 0.69-0.77 s.

With httpx the emit scenarios would measure the generator, not the server.
"""

from __future__ import annotations

import asyncio
import ssl

import h11

READ_SIZE = 65536  # bytes per socket read


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to ``host:port``, opened on first use.

    Requests on one connection are sequential (HTTP/1.1 without pipelining);
    run several connections for concurrency. After an error, or when either
    side asks to close, the connection is dropped and the next request opens a
    new one.
    """

    def __init__(
        self, host: str, port: int, netloc: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.netloc = netloc  # the Host header (RFC 9110 section 7.2)
        self.tls = tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11: h11.Connection | None = None

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read its whole answer.

        Args:
            method: "GET", "POST"...
            target: the request target (path and query, already percent-encoded).
            headers: extra request headers; Host and Content-Length are added.
            body: the request body (bytes; sent with Content-Length when not empty
                or when the method is POST).

        Returns:
            (status code, lower-cased response headers, response body).

        Raises:
            OSError, ConnectionError: the connection failed or closed mid-answer.
            h11.ProtocolError: the server's answer is not valid HTTP/1.1.
        """
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            )
            self.h11 = h11.Connection(h11.CLIENT)
        conn, reader, writer = self.h11, self.reader, self.writer
        assert conn is not None and reader is not None
        try:
            fields = [("Host", self.netloc), *headers]
            if body or method == "POST":
                fields.append(("Content-Length", str(len(body))))
            out = conn.send(h11.Request(method=method, target=target, headers=fields))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            writer.write(out)
            status = 0
            answer: dict[str, str] = {}
            chunks: list[bytes] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(READ_SIZE))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    answer = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("the server closed the connection mid-answer")
        except BaseException:
            self.close()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # either side said Connection: close
            self.close()
        return status, answer, b"".join(chunks)

    def close(self) -> None:
        """Drop the connection; the next request opens a new one."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.h11 = None
