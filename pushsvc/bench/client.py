"""One bench WebSocket client: connect, authenticate, subscribe, then count deliveries.

:class:`Client` runs websockets' sans-I/O ``ClientProtocol`` (the handshake,
control frames, closes) over an asyncio transport, and splits the server's
text frames itself once the connection is open (:meth:`Client._raw_received`,
RFC 6455 section 5.2), and counts the common read (one whole frame holding
the next message in order) inline in :meth:`Client.data_received`: measured in
docs/benchmarks.md ("The steady p50"), the clients share the server's cores,
so every microsecond they spend per frame is latency they add to the figures.
:class:`Tally` holds the counters and latency samples the clients of one
process share.

Each payload is ``{"i": <message index>, "t": <time.time_ns() at publish>, ...}``
(see :mod:`pushsvc.bench.publishers`); latency is receive time minus ``t``.

With ``--compression deflate`` a client offers permessage-deflate (RFC 7692,
negotiated by the ``websockets`` library) and inflates the server's compressed
frames (RSV1) itself on the fast path: each is a whole message compressed with
no context carried over (the server imposes ``server_no_context_takeover``), so a
fresh raw inflater per frame decodes it (RFC 7692 7.2.2). Every client counts the
bytes it reads from its socket (:attr:`Tally.wire_bytes`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import time
import zlib
from collections import Counter
from typing import Any

import msgspec
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import WebSocketURI

MAX_WS_MESSAGE = 64 * 1024 * 1024  # bytes; server frames may batch many messages
SAMPLE_CAP = 2_000_000  # latency samples kept over all workers
ERROR_SAMPLES = 10  # error messages kept for the report

_PONG = b'{"op":"pong"}'
_FIN_TEXT = 0x81  # FIN + text (RFC 6455 5.2)
_FIN_RSV1_TEXT = 0xC1  # FIN + RSV1 (compressed, RFC 7692 6) + text
_TAIL = b"\x00\x00\xff\xff"  # removed by the sender after its sync flush (RFC 7692 7.2.2)
_TEXT = Opcode.TEXT
_PING = Opcode.PING
_OPEN = State.OPEN


class Tally:
    """Counters and latency samples of the clients of one process.

    Latencies are nanoseconds. Up to ``SAMPLE_CAP / procs`` are kept; past that the
    kept ones are halved and only every ``stride``-th delivery is sampled, so
    memory stays bounded on long runs while the percentiles stay unbiased.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, uri: WebSocketURI, cfg: dict[str, Any]
    ) -> None:
        self.loop = loop
        self.uri = uri
        self.n_channels: int = cfg["channels"]
        self.n_messages: int = cfg["messages"]
        #: offer permessage-deflate and inflate RSV1 frames (``--compression deflate``)
        self.deflate: bool = cfg.get("compression") == "deflate"
        self.wire_bytes = 0  # bytes read from the sockets (WebSocket frames, handshakes)
        self.subscribed = 0  # clients currently subscribed (progress display)
        self.last_ready_ns = 0  # when the latest client got its "subscribed" (time_ns)
        self.failed = 0
        self.delivered = 0
        self.frames = 0  # text frames that carried deliveries
        self.unique = 0
        self.dups = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.closes: Counter[int] = Counter()
        self.stall_codes: Counter[int] = Counter()
        # latency samples (ns): lat_done holds computed ones; lat_t/lat_now/lat_n are raw
        # publish stamps, and per frame the receive stamp and how many stamps it added
        self.lat_done = array.array("q")
        self.lat_t = array.array("q")
        self.lat_now = array.array("q")
        self.lat_n = array.array("q")
        self.lat_cap = max(10_000, SAMPLE_CAP // cfg["procs"])
        self.lat_room = self.lat_cap
        self.stride = 1  # every stride-th delivery is sampled
        self.lat_off = 0
        self.lat_max = 0
        self.last_ns = 0
        self.expected = 0
        self.armed = False
        # heartbeats received: pushsvc `ping` frames, RFC 6455 ping frames (websockets pongs)
        self.app_pings = 0
        self.ws_pings = 0
        # --broadcast: per message index, the latency (ns) of its latest delivery here
        self.msg_lat: array.array[int] | None = (
            array.array("q", bytes(8 * cfg["messages"])) if cfg.get("broadcast") else None
        )

    def error(self, text: str) -> None:
        """Count one error; keep its text (300 chars) among the first ERROR_SAMPLES."""
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(text[:300])

    def fold(self) -> None:
        """Turn the raw stamps into latencies (ns) appended to ``lat_done``."""
        done, stamps, pos = self.lat_done, self.lat_t, 0
        for now, k in zip(self.lat_now, self.lat_n, strict=True):
            done.fromlist([now - t for t in stamps[pos : pos + k]])
            pos += k
        self.lat_t = array.array("q")
        self.lat_now = array.array("q")
        self.lat_n = array.array("q")

    def decimate(self) -> None:
        """Halve the kept latency samples and double the sampling stride."""
        self.fold()
        self.lat_done = self.lat_done[::2]
        self.lat_room = self.lat_cap - len(self.lat_done)
        self.stride *= 2
        self.lat_off = 0

    def notify_done(self) -> None:
        """Called once ``armed`` and ``unique >= expected``; the worker reports it."""


class _Payload(msgspec.Struct, gc=False):
    i: int
    t: int


class _Line(msgspec.Struct, gc=False):
    """One server object; only the fields the bench looks at."""

    type: str = ""
    data: _Payload | None = None
    seq: int | None = None
    code: Any = None
    message: Any = None


_decode_lines = msgspec.json.Decoder(_Line).decode_lines
_decode_line = msgspec.json.Decoder(_Line).decode
_encode = msgspec.json.Encoder().encode


class SetupError(Exception):
    """A client could not connect, authenticate or subscribe."""


class Client(asyncio.Protocol):
    """One WebSocket client: websockets' sans-I/O ClientProtocol over an asyncio transport.

    Deliveries are only counted: the client tracks the next message index it
    expects on its channel (in-order fast path) plus a set of indices that came
    early, so unique and duplicate counts cost no per-message Python work when
    messages arrive in order.
    """

    # slots keep each client small (hundreds share a process); CPython sorts the
    # names, so the order below is for the reader (the common read's fields first)
    __slots__ = (  # noqa: RUF023
        "raw",
        "counting",
        "partial",
        "next_i",
        "early",
        "w",
        "unique",
        "unflushed",
        "discard",
        "gid",
        "chan",
        "channel",
        "token",
        "stalled",
        "closing",
        "transport",
        "proto",
        "lost",
        "waiting",
        "waiter",
        "last_seq",
        "since",
    )

    def __init__(self, worker: Tally, gid: int, token: str, stalled: bool) -> None:
        self.w = worker
        self.gid = gid
        self.chan = gid % worker.n_channels
        self.channel = f"bench.{self.chan}"
        self.token = token
        self.stalled = stalled
        self.counting = not stalled
        self.discard = False  # drop text frames (stalled clients while draining)
        self.closing = False  # the bench started the close
        self.transport: asyncio.Transport | None = None
        self.proto: ClientProtocol | None = None
        loop = worker.loop
        self.lost = loop.create_future()
        self.waiting = "open"
        self.waiter: asyncio.Future[None] = loop.create_future()
        self.last_seq: int | None = None  # stream seq of the last message (a resume's since)
        self.since: int | None = None  # subscribe from this seq (a churned client's resume)
        self.next_i = self.chan  # next in-order global message index on this channel
        self.early: set[int] | None = None  # indices that came early; None while none
        self.unique = 0
        self.raw = False  # frames split by _raw_received (after the handshake)
        self.partial = b""  # an incomplete frame's first bytes, in raw mode
        self.unflushed = False  # the protocol holds bytes to send (a pong)

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        extensions = [ClientPerMessageDeflateFactory()] if self.w.deflate else None
        proto = ClientProtocol(self.w.uri, extensions=extensions, max_size=MAX_WS_MESSAGE)
        self.proto = proto
        proto.send_request(proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.w.wire_bytes += len(data)
        if self.raw:
            first = data[0]
            if (
                self.counting
                and not self.partial
                and len(data) > 4
                and (first == _FIN_TEXT or (first == _FIN_RSV1_TEXT and self.w.deflate))
            ):
                # the common read: one whole final text frame (RFC 6455 section 5.2)
                # holding the next message in order. Its accounting is done inline,
                # with no list or call per message, so the clients of one process
                # keep up with the server and the run measures the server.
                head, length = 2, data[1]
                if length == 126:
                    head, length = 4, (data[2] << 8) | data[3]
                elif length == 127:
                    head = 0  # a 64-bit length: large, left to the general path
                if head and head + length == len(data):
                    payload = data[head:]
                    try:
                        if first == _FIN_RSV1_TEXT:  # compressed (RFC 7692 7.2.2)
                            payload = zlib.decompressobj(-15).decompress(payload + _TAIL)
                        line = _decode_line(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError, zlib.error):
                        line = None
                    if (
                        line is not None
                        and (d := line.data) is not None
                        and d.i == self.next_i
                        and line.type == "message"
                        and not self.early
                    ):
                        self.last_seq = line.seq
                        w = self.w
                        if w.stride == 1 and w.lat_room > 1:
                            lat = now - d.t
                            w.lat_done.append(lat)
                            w.lat_room -= 1
                            if lat > w.lat_max:
                                w.lat_max = lat
                            if w.msg_lat is not None and d.i < len(w.msg_lat):
                                w.msg_lat[d.i] = lat
                            self.next_i += w.n_channels
                            self.unique += 1
                            w.unique += 1
                            w.delivered += 1
                            w.frames += 1
                            w.last_ns = now
                            if w.armed and w.unique >= w.expected:
                                w.notify_done()
                            return
            self._raw_received(data, now)
            return
        self._proto_received(data, now)

    def _raw_received(self, data: bytes, now: int) -> None:
        """Split server frames without the sans-I/O parser (the hot path of a run).

        Server-to-client frames are unmasked (RFC 6455 section 5.1), so a complete
        final text frame is a 2-, 4- or 10-byte header (section 5.2) and its payload
        (inflated first when RSV1 says it is compressed, with permessage-deflate
        negotiated). Those are handled here; at the first frame of any other kind (close,
        control, fragment) everything from that frame on goes to the websockets
        protocol, which is at a frame boundary because it has been fed nothing
        since the handshake. This keeps the generator's CPU per delivery a fraction
        of the server's, so it measures the server rather than itself.
        """
        if self.partial:
            data = self.partial + data
            self.partial = b""
        end = len(data)
        pos = 0
        inflate = self.w.deflate
        while end - pos >= 2:
            length = data[pos + 1]
            first = data[pos]
            if length > 127 or not (
                first == _FIN_TEXT or (first == _FIN_RSV1_TEXT and inflate)
            ):  # masked, or not a final text frame
                self.raw = False
                self._proto_received(data[pos:], now)
                return
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            stop = pos + head + length
            if stop > end:
                break
            if not self.discard:
                payload = data[pos + head : stop]
                if first == _FIN_RSV1_TEXT:
                    payload = zlib.decompressobj(-15).decompress(payload + _TAIL)
                self._on_text(payload, now)
            pos = stop
        if pos < end:
            self.partial = data[pos:]
        if self.unflushed:
            self._flush()

    def _proto_received(self, data: bytes, now: int) -> None:
        proto = self.proto
        proto.receive_data(data)
        for ev in proto.events_received():
            if ev.__class__ is Frame:
                if ev.opcode is _TEXT:
                    if not self.discard:
                        self._on_text(ev.data, now)
                elif ev.opcode is _PING:  # answered by the websockets protocol
                    self.w.ws_pings += 1
            elif self.waiting == "open":  # the handshake response
                if proto.handshake_exc is not None:
                    self._wake(SetupError(f"handshake: {proto.handshake_exc}"))
                else:
                    self.raw = not proto.reader.buffer and proto.state is _OPEN
                    self._wake(None)
        self._flush()

    def eof_received(self) -> bool:
        if self.proto is not None:
            self.proto.receive_eof()
            self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        proto = self.proto
        code = 1006
        if proto is not None and proto.close_rcvd is not None:
            code = proto.close_rcvd.code
        if not self.closing:
            if self.stalled:
                self.w.stall_codes[code] += 1
            else:
                self.w.closes[code] += 1
        self._wake(SetupError(f"connection closed (code {code})"))
        if not self.lost.done():
            self.lost.set_result(code)

    # sending -----------------------------------------------------------------
    def _flush(self) -> None:
        self.unflushed = False
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        for chunk in self.proto.data_to_send():
            if chunk:
                tr.write(chunk)
            elif tr.can_write_eof():
                tr.write_eof()

    def send_obj(self, obj: dict[str, Any]) -> None:
        """Send one JSON command as a text frame."""
        self.proto.send_text(_encode(obj))
        self._flush()

    def close(self) -> None:
        """Start a normal close (1000); ``lost`` resolves when the server closes TCP."""
        self.closing = True
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        with contextlib.suppress(Exception):
            self.proto.send_close(1000)
            self._flush()
        tr.resume_reading()

    def abort(self) -> None:
        """Drop the connection without a close handshake."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # waiting for answers ------------------------------------------------------
    def expect(self, kind: str) -> asyncio.Future[None]:
        """A future resolved when the next ``kind`` answer ("welcome", "subscribed") arrives."""
        if self.waiter.done():
            self.waiter = self.w.loop.create_future()
        self.waiting = kind
        return self.waiter

    def _wake(self, exc: Exception | None) -> None:
        fut = self.waiter
        if not fut.done():
            self.waiting = ""
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    # receiving -----------------------------------------------------------------
    def _on_text(self, data: bytes, now: int) -> None:
        try:
            lines = _decode_lines(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._on_text_slow(data, now)
            return
        ids: list[int] | None = None
        for line in lines:
            if line.type == "message":
                d = line.data
                if d is None:
                    self.w.error(f"client {self.gid}: message without data")
                    continue
                if ids is None:
                    ids = [d.i]
                    ts = [d.t]
                else:
                    ids.append(d.i)
                    ts.append(d.t)
                seq = line.seq
            else:
                self._on_control(line.type, line.code, line.message)
        if ids is not None and self.counting:
            self.last_seq = seq
            self._on_messages(ids, ts, now)

    def _on_text_slow(self, data: bytes, now: int) -> None:
        """Generic decoding, line by line: foreign payloads, odd frames."""
        ids: list[int] = []
        ts: list[int] = []
        for raw in bytes(data).split(b"\n"):
            if not raw.strip():
                continue
            try:
                obj = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                self.w.error(f"client {self.gid}: undecodable frame {raw[:80]!r}")
                continue
            if not isinstance(obj, dict):
                self.w.error(f"client {self.gid}: frame is not an object: {raw[:80]!r}")
                continue
            kind = obj.get("type")
            if kind == "message":
                d = obj.get("data")
                if isinstance(d, dict) and type(d.get("i")) is int and type(d.get("t")) is int:
                    ids.append(d["i"])
                    ts.append(d["t"])
                    if type(obj.get("seq")) is int:
                        self.last_seq = obj["seq"]
                else:
                    self.w.error(f"client {self.gid}: foreign message {raw[:80]!r}")
            else:
                self._on_control(kind, obj.get("code"), obj.get("message"))
        if ids and self.counting:
            self._on_messages(ids, ts, now)

    def _on_control(self, kind: Any, code: Any, message: Any) -> None:
        if kind == "ping":
            self.w.app_pings += 1
            if self.proto.state is _OPEN:
                self.proto.send_text(_PONG)
                self.unflushed = True  # data_received flushes
        elif kind == "error":
            text = f"error {code}: {message}"
            if self.waiting in ("welcome", "subscribed"):
                self._wake(SetupError(text))
            else:
                self.w.error(f"client {self.gid}: {text}")
        elif kind == self.waiting:
            self._wake(None)
        elif kind == "unsubscribed":
            self.w.error(f"client {self.gid}: unsubscribed by the server ({message or code})")
        # welcome/subscribed duplicates and unknown types are ignored

    def _on_messages(self, ids: list[int], ts: list[int], now: int) -> None:
        w = self.w
        n = len(ids)
        w.delivered += n
        w.frames += 1
        w.last_ns = now
        # latency samples: publish stamps + one receive stamp per frame, subtracted later
        stride = w.stride
        if stride == 1:
            w.lat_t.fromlist(ts)
            w.lat_now.append(now)
            w.lat_n.append(n)
        else:
            off = w.lat_off
            kept = ts[off::stride]
            w.lat_off = (off - n) % stride
            if kept:
                w.lat_t.fromlist(kept)
                w.lat_now.append(now)
                w.lat_n.append(len(kept))
        oldest = now - min(ts)
        if oldest > w.lat_max:
            w.lat_max = oldest
        if (per_msg := w.msg_lat) is not None:
            for i, t in zip(ids, ts, strict=True):
                if 0 <= i < len(per_msg):
                    per_msg[i] = now - t
        if len(w.lat_t) >= w.lat_room:
            w.decimate()
        # unique / duplicate accounting
        step = w.n_channels
        nxt = self.next_i
        if (
            not self.early
            and ids[0] == nxt
            and (n == 1 or ids == list(range(nxt, nxt + n * step, step)))
        ):
            self.next_i = nxt + n * step
            new = n
        else:
            new = self._out_of_order(ids)
        self.unique += new
        w.unique += new
        if w.armed and w.unique >= w.expected:
            w.notify_done()

    def _out_of_order(self, ids: list[int]) -> int:
        w = self.w
        step = w.n_channels
        early = self.early if self.early is not None else set()
        new = 0
        for i in ids:
            if i < 0 or i >= w.n_messages or (i - self.chan) % step:
                w.error(f"client {self.gid}: message {i} does not belong to {self.channel}")
            elif i < self.next_i or i in early:
                w.dups += 1
            elif i == self.next_i:
                new += 1
                nxt = i + step
                while nxt in early:
                    early.discard(nxt)
                    nxt += step
                self.next_i = nxt
            else:
                early.add(i)
                new += 1
        self.early = early or None  # the common read only looks at it when set
        return new
