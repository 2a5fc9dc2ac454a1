"""``pushsvc bench``: a load generator that measures pushsvc end to end.

A coordinator process forks ``--procs`` worker processes. Each worker runs one
uvloop event loop and owns its share of the ``--clients`` WebSocket clients (plus
the ``--stall`` slow clients). Every client connects to ``ws://host:port/ws``,
authenticates with its own HS256 JWT (``sub`` = ``bench-<n>``), subscribes to
one channel (``bench.0``, ``bench.1``... round-robin) and then only counts and
timestamps deliveries; statistics are computed once, at the end.

When every client is subscribed, the coordinator publishes ``--messages``
payloads (round-robin over the channels) to NATS subject ``<prefix>.<channel>``
(``--via nats``) or through ``POST /emit/<channel>`` (``--via emit``). Each
payload is a JSON object padded to ``--size`` bytes::

    {"i": <message index>, "t": <time.time_ns() at publish>, "p": "xxxx..."}

so latency is receive time minus ``t`` (publisher and clients share a host and
its clock). The run ends when every subscribed client has every message of its
channel, ``--timeout`` seconds after the last publish, or at ``--duration-limit``,
whichever comes first; every process exits by itself.

Example (server on 127.0.0.1:8000 with the same secret)::

    export PUSHSVC_JWT_SECRET=change-me
    pushsvc bench --clients 1000 --channels 10 --messages 2000 --size 200
    pushsvc bench --clients 200 --stall 5 --rate 500 --messages 20000 --reconnect \\
        --server-pid "$(pgrep -f 'pushsvc serve' | head -1)" --json

Report keys (text and ``--json``): clients, channels, messages, size, via,
connect_seconds, connect_rate (connections/s), publish_seconds, deliveries,
deliveries_per_s (deliveries / seconds from first publish to last delivery),
latency_ms {p50, p90, p99, max}, lost, duplicated, errors, closes (close code ->
count, for closes the bench did not start), generator_cpu_s; with
``--server-pid``: server_cpu_s, server_rss_mib_before, server_rss_mib_after,
server_rss_per_conn_kib; with ``--reconnect``: reconnect_seconds,
reconnect_errors; with ``--stall``: stalled_closed_codes (and stalled_open). A
few more keys help diagnosis: procs, subscribed, failed_clients, published,
publish_errors, publish_throttled (emits retried after 429), expected, unique,
frames (WebSocket frames that carried deliveries: deliveries / frames is the
server's batching), error_samples, elapsed_seconds.

Exit code: 0 when every client subscribed and got every message exactly once
with no error, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
import msgspec
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from . import natsconn

try:  # pragma: no cover - uvloop is a Linux/macOS dependency
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

MAX_WS_MESSAGE = 64 * 1024 * 1024  # bytes; server frames may batch many messages
SAMPLE_CAP = 2_000_000  # latency samples kept over all workers
ERROR_SAMPLES = 10  # error messages kept for the report
SETUP_TIMEOUT = 30.0  # seconds for connect + auth + subscribe of one client
PROGRESS_INTERVAL = 0.5  # seconds between worker progress messages
EMIT_CONNECTIONS = 16  # parallel HTTP connections (and emit users) for --via emit
EMIT_RETRIES = 3  # retries of one emit answered 429
PUBLISH_BATCH = 100  # messages between event-loop yields (as fast as possible)
PUBLISH_FLUSH = 10_000  # messages between NATS flushes (PING/PONG round trips)

_PONG = b'{"op":"pong"}'
_TEXT = Opcode.TEXT
_OPEN = State.OPEN


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser`` (an argparse subparser).

    Durations are seconds, sizes bytes, rates per second; see the module
    docstring for what the run does with them.
    """
    env = os.environ.get
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8000", help="pushsvc base URL (ws URL: <url>/ws)")
    add(
        "--nats-url",
        default=env("PUSHSVC_NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS server for --via nats (default: $PUSHSVC_NATS_URL or nats://127.0.0.1:4222)",
    )
    add(
        "--secret",
        default=env("PUSHSVC_JWT_SECRET"),
        help="HS256 secret to mint client tokens (default: $PUSHSVC_JWT_SECRET; required)",
    )
    add(
        "--prefix",
        default=env("PUSHSVC_SUBJECT_PREFIX") or "push",
        help="NATS subject prefix (default: $PUSHSVC_SUBJECT_PREFIX or push)",
    )
    add("--clients", type=int, default=1000, help="WebSocket clients (default 1000)")
    add("--channels", type=int, default=1, help="channels bench.0..bench.N-1 (default 1)")
    add("--messages", type=int, default=1000, help="messages published in total (default 1000)")
    add("--size", type=int, default=100, help="payload size in bytes (default 100)")
    add("--rate", type=float, default=0.0, help="publish rate, messages/s (0 = max; default)")
    add("--via", choices=("nats", "emit"), default="nats", help="publish path (default nats)")
    add(
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="client processes (default: CPU count)",
    )
    add(
        "--connect-rate",
        type=float,
        default=0.0,
        help="new connections/s over the whole run (0 = unlimited; default)",
    )
    add(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for deliveries after the last publish (default 10)",
    )
    add(
        "--duration-limit",
        type=float,
        default=120.0,
        help="hard cap on the whole run, seconds (default 120)",
    )
    add(
        "--reconnect",
        action="store_true",
        help="after the run, close all clients and reconnect them at once (same tokens)",
    )
    add(
        "--stall",
        type=int,
        default=0,
        metavar="N",
        help="N extra clients that subscribe then stop reading; report how they get closed",
    )
    add(
        "--server-pid",
        type=int,
        default=None,
        metavar="PID",
        help="server process to sample (CPU seconds and RSS from /proc) before and after",
    )
    add(
        "--floor",
        action="store_true",
        help="measure this machine's raw TCP fan-out instead of a pushsvc server: the same "
        "--clients/--messages/--size/--rate/--procs against a built-in server that only writes "
        "pre-built bytes to every socket (no WebSocket, JSON or NATS); the latency floor that "
        "no push server on this machine can beat",
    )
    add("--json", action="store_true", help="print one JSON object instead of the text report")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    natsconn.add_arguments(parser)  # --nats-creds ... --nats-tls-key for --via nats


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and print the report on stdout.

    Returns:
        0 when every client subscribed and received every message exactly once
        without errors, 1 when something was lost, duplicated or failed, 2 when
        the arguments are invalid (the reason is printed on stderr).
    """
    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"pushsvc bench: {exc}", file=sys.stderr)
        return 2
    _raise_nofile_limit()
    if cfg["floor"]:
        return _main_floor(cfg)
    coordinator = _Coordinator(cfg)
    try:
        report = coordinator.run()
    except KeyboardInterrupt:
        coordinator.kill_workers()
        print("pushsvc bench: interrupted", file=sys.stderr)
        return 130
    except _BenchFailed as exc:
        coordinator.kill_workers()
        print(f"pushsvc bench: {exc}", file=sys.stderr)
        return 1
    finally:
        coordinator.reap_workers()
    if cfg["json"]:
        print(json.dumps(report))
    else:
        print(_format_report(report))
    return _exit_code(report)


def _main_floor(cfg: dict[str, Any]) -> int:
    """``--floor``: the raw TCP fan-out of this machine (see :mod:`pushsvc.floor`)."""
    from .floor import format_floor, run_floor  # floor builds on this module's helpers

    try:
        report = run_floor(cfg)
    except (RuntimeError, OSError) as exc:
        print(f"pushsvc bench --floor: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report) if cfg["json"] else format_floor(report))
    return 0 if report["lost"] == 0 else 1


class _BenchFailed(Exception):
    """The run could not go on (no NATS, workers died...): message for the user."""


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate ``args`` into a plain (picklable) dict; raise ValueError with a reason."""
    if not args.secret and not args.floor:
        raise ValueError("--secret (or PUSHSVC_JWT_SECRET) is required to mint tokens")
    for name in ("clients", "channels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    for name in ("messages", "stall", "size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0")
    if args.size > 1024 * 1024:
        raise ValueError("--size must be <= 1048576 bytes (NATS max payload)")
    for name in ("rate", "connect_rate"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.timeout <= 0 or args.duration_limit <= 0:
        raise ValueError("--timeout and --duration-limit must be > 0")
    if args.procs < 1:
        raise ValueError("--procs must be >= 1")
    if not args.prefix or any(c in args.prefix for c in " .*>\t\r\n"):
        raise ValueError("--prefix must be one NATS token, e.g. 'push'")
    parts = urlsplit(args.url if "://" in args.url else "http://" + args.url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"--url must be http(s)://host:port, got {args.url!r}")
    tls = parts.scheme in ("https", "wss")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ValueError(f"bad port in --url {args.url!r}") from None
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = parts.path.rstrip("/")
    total = args.clients + args.stall
    security = natsconn.NatsSecurity.from_args(args)
    security.check(args.nats_url.split(","))  # SettingsError is a ValueError
    return {
        "host": host,
        "port": port,
        "tls": tls,
        "netloc": netloc,
        "base": base,
        "ws_url": f"{'wss' if tls else 'ws'}://{netloc}{base}/ws",
        "nats_url": args.nats_url,
        "nats_security": security,
        "secret": args.secret,
        "audience": os.environ.get("PUSHSVC_JWT_AUDIENCE") or None,
        "emit_audience": os.environ.get("PUSHSVC_EMIT_AUDIENCE")
        or os.environ.get("PUSHSVC_JWT_AUDIENCE")
        or None,
        "issuer": os.environ.get("PUSHSVC_JWT_ISSUER") or None,
        "prefix": args.prefix,
        "clients": args.clients,
        "channels": args.channels,
        "messages": args.messages,
        "size": args.size,
        "rate": float(args.rate),
        "via": args.via,
        "procs": max(1, min(args.procs, total)),
        "connect_rate": float(args.connect_rate),
        "timeout": float(args.timeout),
        "duration_limit": float(args.duration_limit),
        "reconnect": bool(args.reconnect),
        "stall": args.stall,
        "server_pid": args.server_pid,
        "json": bool(args.json),
        "floor": bool(args.floor),
        "progress": not (args.quiet or args.json),
    }


def _raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard one (every client is a socket)."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _mint(cfg: dict[str, Any], sub: str, audience: str | None) -> str:
    """An HS256 token for ``sub`` valid one hour, granting bench.> to read and publish."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "exp": now + 3600,
        "channels": ["bench.>"],
        "publish": ["bench.>"],
    }
    if audience:
        claims["aud"] = audience
    if cfg["issuer"]:
        claims["iss"] = cfg["issuer"]
    return jwt.encode(claims, cfg["secret"], algorithm="HS256")


def _new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def _ssl_context(cfg: dict[str, Any]) -> ssl.SSLContext | None:
    return ssl.create_default_context() if cfg["tls"] else None


# ------------------------------------------------------------------------ worker


class _Payload(msgspec.Struct, gc=False):
    i: int
    t: int


class _Line(msgspec.Struct, gc=False):
    """One server object; only the fields the bench looks at."""

    type: str = ""
    data: _Payload | None = None
    code: Any = None
    message: Any = None


_decode_lines = msgspec.json.Decoder(_Line).decode_lines
_encode = msgspec.json.Encoder().encode


class _SetupError(Exception):
    """A client could not connect, authenticate or subscribe."""


class _Client(asyncio.Protocol):
    """One WebSocket client: websockets' sans-I/O ClientProtocol over an asyncio transport.

    Deliveries are only counted: the client tracks the next message index it
    expects on its channel (in-order fast path) plus a set of indices that came
    early, so unique and duplicate counts cost no per-message Python work when
    messages arrive in order.
    """

    def __init__(self, worker: _Worker, gid: int, token: str, stalled: bool) -> None:
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
        self.next_i = self.chan  # next in-order global message index on this channel
        self.early: set[int] = set()
        self.unique = 0
        self.raw = False  # frames split by _raw_received (after the handshake)
        self.partial = b""  # an incomplete frame's first bytes, in raw mode
        self.unflushed = False  # the protocol holds bytes to send (a pong)

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proto = ClientProtocol(self.w.uri, max_size=MAX_WS_MESSAGE)
        self.proto = proto
        proto.send_request(proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self.raw:
            self._raw_received(data, now)
            return
        self._proto_received(data, now)

    def _raw_received(self, data: bytes, now: int) -> None:
        """Split server frames without the sans-I/O parser (the hot path of a run).

        Server-to-client frames are unmasked (RFC 6455 section 5.1), so a complete
        final text frame is a 2-, 4- or 10-byte header (section 5.2) and its payload.
        Those are handled here; at the first frame of any other kind (close,
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
        while end - pos >= 2:
            length = data[pos + 1]
            if length > 127 or data[pos] != 0x81:  # masked, or not a final text frame
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
                self._on_text(data[pos + head : stop], now)
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
            elif self.waiting == "open":  # the handshake response
                if proto.handshake_exc is not None:
                    self._wake(_SetupError(f"handshake: {proto.handshake_exc}"))
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
        self._wake(_SetupError(f"connection closed (code {code})"))
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
            else:
                self._on_control(line.type, line.code, line.message)
        if ids is not None and self.counting:
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
                else:
                    self.w.error(f"client {self.gid}: foreign message {raw[:80]!r}")
            else:
                self._on_control(kind, obj.get("code"), obj.get("message"))
        if ids and self.counting:
            self._on_messages(ids, ts, now)

    def _on_control(self, kind: Any, code: Any, message: Any) -> None:
        if kind == "ping":
            if self.proto.state is _OPEN:
                self.proto.send_text(_PONG)
                self.unflushed = True  # data_received flushes
        elif kind == "error":
            text = f"error {code}: {message}"
            if self.waiting in ("welcome", "subscribed"):
                self._wake(_SetupError(text))
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
        early = self.early
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
        return new


class _Worker:
    """One worker process: its clients, counters and the command loop with the coordinator."""

    def __init__(self, conn: Any, cfg: dict[str, Any], wid: int) -> None:
        self.conn = conn
        self.cfg = cfg
        self.wid = wid
        self.loop = asyncio.get_running_loop()
        self.uri = parse_uri(cfg["ws_url"])
        self.ssl = _ssl_context(cfg)
        self.n_channels = cfg["channels"]
        self.n_messages = cfg["messages"]
        self.cmds: asyncio.Queue[Any] = asyncio.Queue()
        self.clients: list[_Client] = []
        self.stalled: list[_Client] = []
        # counters
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
        self.done_sent = False

    # plumbing ------------------------------------------------------------------
    def send(self, msg: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(msg)

    def _on_pipe(self) -> None:
        try:
            while self.conn.poll():
                self.cmds.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.cmds.put_nowait(("exit",))

    def error(self, text: str) -> None:
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
        if not self.done_sent:
            self.done_sent = True
            self.send(("done", self.last_ns))

    # run -----------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        _add_pipe_reader(self.loop, self.conn, self._on_pipe)
        watchdog = asyncio.ensure_future(self._watchdog())
        procs = cfg["procs"]
        gids = range(self.wid, cfg["clients"] + cfg["stall"], procs)
        for gid in gids:
            token = _mint(cfg, f"bench-{gid}", cfg["audience"])
            client = _Client(self, gid, token, stalled=gid >= cfg["clients"])
            (self.stalled if client.stalled else self.clients).append(client)
        self.send(("up",))
        progress = asyncio.ensure_future(self._progress())
        close_s = 0.5
        try:
            while True:
                cmd = await self.cmds.get()
                op = cmd[0]
                if op == "connect":
                    await self._connect_all(until=cmd[1])
                elif op == "published":
                    self._arm(cmd[1])
                elif op == "stop":
                    await self._stop(drain_s=cmd[1])
                elif op == "close":
                    await self._close(self.clients, cmd[1])
                    self.send(("closed",))
                elif op == "reconnect":
                    await self._reconnect(until=cmd[1])
                elif op == "exit":
                    close_s = cmd[1] if len(cmd) > 1 else 0.5
                    break
        finally:
            progress.cancel()
            closes_before = sum(self.closes.values())
            await self._close(self.clients + self.stalled, close_s)
            extra = sum(self.closes.values()) - closes_before
            self.send(("bye", _cpu_seconds(), extra))
            watchdog.cancel()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.conn.fileno())

    async def _watchdog(self) -> None:
        """Exit by ourselves at the hard deadline or when the coordinator is gone."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(0.5)
            if time.monotonic() >= self.cfg["hard_deadline"] or os.getppid() != parent:
                os._exit(3)

    async def _progress(self) -> None:
        while True:
            self.send(
                ("progress", self.subscribed, self.failed, self.delivered, self.unique, self.errors)
            )
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _setup(self, client: _Client, start_at: float, until: float) -> bool:
        """Connect, authenticate and subscribe ``client`` no sooner than ``start_at``.

        Times are monotonic seconds; one client gets at most SETUP_TIMEOUT s, and
        nothing goes on past ``until``.
        """
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cfg = self.cfg
        loop = self.loop
        try:
            async with asyncio.timeout(max(0.01, min(SETUP_TIMEOUT, until - time.monotonic()))):
                await loop.create_connection(
                    lambda: client,
                    cfg["host"],
                    cfg["port"],
                    ssl=self.ssl,
                    server_hostname=cfg["host"] if self.ssl else None,
                )
                await client.waiter  # handshake response
                welcome = client.expect("welcome")
                client.send_obj({"op": "auth", "token": client.token})
                await welcome
                subscribed = client.expect("subscribed")
                client.send_obj({"op": "subscribe", "channel": client.channel})
                await subscribed
        except Exception as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            self.error(f"client {client.gid}: setup failed: {reason}")
            self.failed += 1
            client.abort()
            return False
        self.subscribed += 1
        self.last_ready_ns = time.time_ns()
        if client.stalled and client.transport is not None:
            client.transport.pause_reading()
        return True

    async def _connect_all(self, until: float) -> None:
        cfg = self.cfg
        everyone = [c for pair in zip(self.clients, self.stalled, strict=False) for c in pair]
        everyone += self.clients[len(self.stalled) :] + self.stalled[len(self.clients) :]
        rate = cfg["connect_rate"] / cfg["procs"] if cfg["connect_rate"] > 0 else 0.0
        start = time.monotonic()
        oks = await asyncio.gather(
            *(
                self._setup(c, start + (k / rate if rate else 0.0), until)
                for k, c in enumerate(everyone)
            )
        )
        ready = [c for c, ok in zip(everyone, oks, strict=True) if ok]
        self.clients = [c for c in ready if not c.stalled]
        self.stalled = [c for c in ready if c.stalled]
        per_channel = [0] * self.n_channels
        for c in self.clients:
            per_channel[c.chan] += 1
        gc.collect()
        gc.freeze()  # the clients live until the end: keep them out of GC passes
        self.send(
            (
                "ready",
                len(self.clients),
                len(self.stalled),
                self.failed,
                self.last_ready_ns,
                per_channel,
            )
        )

    def _arm(self, per_channel: list[int]) -> None:
        self.expected = sum(per_channel[c.chan] for c in self.clients)
        self.armed = True
        if self.unique >= self.expected:
            self.notify_done()

    async def _stop(self, drain_s: float) -> None:
        """Freeze the counters, drain stalled clients, send the results."""
        for c in self.clients:
            c.counting = False
        self.fold()
        stats = {
            "delivered": self.delivered,
            "frames": self.frames,
            "unique": self.unique,
            "expected": self.expected,
            "dups": self.dups,
            "last_ns": self.last_ns,
            "lat": self.lat_done.tobytes(),
            "stride": self.stride,
            "lat_max": self.lat_max,
            "closes": dict(self.closes),
        }
        self.lat_done = array.array("q")
        if self.stalled:
            for c in self.stalled:
                c.discard = True
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.resume_reading()
            await _wait_lost(self.stalled, drain_s)
        stats["stall_codes"] = dict(self.stall_codes)
        stats["stalled_open"] = sum(1 for c in self.stalled if not c.lost.done())
        stats["errors"] = self.errors
        stats["error_samples"] = self.error_samples
        self.send(("result", stats))

    async def _close(self, clients: list[_Client], wait_s: float) -> None:
        live = [c for c in clients if not c.lost.done()]
        for c in live:
            c.close()
        await _wait_lost(live, wait_s)
        for c in live:
            if not c.lost.done():
                c.abort()

    async def _reconnect(self, until: float) -> None:
        """Reconnect every (normal) client at once with its token, report errors and end time."""
        errors_before, failed_before = self.errors, self.failed
        self.error_samples = []  # the run's samples went out with the results
        self.subscribed -= len(self.clients)
        self.last_ready_ns = 0
        fresh = [_Client(self, c.gid, c.token, stalled=False) for c in self.clients]
        for c in fresh:
            c.counting = False
        start = time.monotonic()
        oks = await asyncio.gather(*(self._setup(c, start, until) for c in fresh))
        self.clients = fresh
        self.send(
            (
                "reconnected",
                sum(oks),
                self.failed - failed_before,
                self.errors - errors_before,
                self.last_ready_ns,
                self.error_samples,
            )
        )


async def _wait_lost(clients: Iterable[_Client], wait_s: float) -> None:
    """Wait up to ``wait_s`` seconds for the connections of ``clients`` to be gone."""
    futs = [c.lost for c in clients if not c.lost.done()]
    if futs:
        await asyncio.wait(futs, timeout=wait_s)


def _add_pipe_reader(
    loop: asyncio.AbstractEventLoop, conn: Any, callback: Callable[..., None], *args: Any
) -> None:
    """Watch a multiprocessing pipe end from the loop, keeping it in blocking mode.

    Event loops make the descriptors they watch non-blocking; Connection.send and
    recv of a message larger than the socket buffer would then fail with EAGAIN.
    The callback only runs when data is ready, so blocking reads never stall long.
    """
    loop.add_reader(conn.fileno(), callback, *args)
    os.set_blocking(conn.fileno(), True)


def _worker_entry(conn: Any, cfg: dict[str, Any], wid: int, close_fds: list[int]) -> None:
    """Process entry point of one worker (fork or spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:  # the coordinator's pipe ends inherited through fork
        with contextlib.suppress(OSError):
            os.close(fd)
    _raise_nofile_limit()

    async def run() -> None:
        await _Worker(conn, cfg, wid).run()

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(run())


# ------------------------------------------------------------------- coordinator


class _Coordinator:
    """Spawns the workers, publishes, gathers the results and builds the report."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg["duration_limit"]
        # connecting, publishing and waiting for deliveries end at work_deadline; the
        # reserve is for results, stalled clients, the reconnect storm and closing
        self.reserve = min(8.0, 0.25 * cfg["duration_limit"])
        self.work_deadline = self.deadline - self.reserve
        cfg["hard_deadline"] = self.deadline + 3.0  # workers exit by themselves then
        self.progress: dict[int, tuple[int, ...]] = {}
        self.done: dict[int, int] = {}
        self.dead: set[int] = set()
        self.expected_total = 0
        self.phase = "starting"
        self.server_before: dict[str, float] | None = None
        # set by _run, inside the event loop
        self.loop: asyncio.AbstractEventLoop
        self.inbox: list[asyncio.Queue[Any]] = []
        self.all_done: asyncio.Event

    # processes ------------------------------------------------------------------
    def _spawn(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        method = "fork" if "fork" in methods else "spawn"
        ctx = multiprocessing.get_context(method)
        for wid in range(self.cfg["procs"]):
            parent_end, child_end = ctx.Pipe(duplex=True)
            self.conns.append(parent_end)
            close_fds = [c.fileno() for c in self.conns] if method == "fork" else []
            proc = ctx.Process(
                target=_worker_entry,
                args=(child_end, self.cfg, wid, close_fds),
                name=f"pushsvc-bench-{wid}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self.procs.append(proc)

    def kill_workers(self) -> None:
        """Kill the workers this coordinator started (by their process objects)."""
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    proc.kill()

    def reap_workers(self) -> None:
        """Wait briefly for the workers to exit, kill the stragglers, close the pipes."""
        end = time.monotonic() + 3.0
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))
        self.kill_workers()
        for proc in self.procs:
            proc.join(1.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()

    # messages ---------------------------------------------------------------------
    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for wid, conn in enumerate(self.conns):
            if wid not in self.dead:
                try:
                    conn.send(msg)
                except (OSError, ValueError):
                    self._mark_dead(wid)

    def _mark_dead(self, wid: int) -> None:
        if wid not in self.dead:
            self.dead.add(wid)
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.conns[wid].fileno())
            self.inbox[wid].put_nowait(("dead",))
            self._check_done()

    def _on_pipe(self, wid: int) -> None:
        conn = self.conns[wid]
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "progress":
                    self.progress[wid] = msg[1:]
                elif msg[0] == "done":
                    self.done[wid] = msg[1]
                    self._check_done()
                else:
                    self.inbox[wid].put_nowait(msg)
        except (EOFError, OSError):
            self._mark_dead(wid)

    def _check_done(self) -> None:
        if self.phase == "delivering" and all(
            w in self.done or w in self.dead for w in range(len(self.conns))
        ):
            self.all_done.set()

    async def _collect(self, kind: str, wait_s: float) -> dict[int, tuple[Any, ...]]:
        """Wait until every live worker sent a ``kind`` message (at most ``wait_s`` seconds)."""
        end = self.loop.time() + max(0.0, wait_s)
        out: dict[int, tuple[Any, ...]] = {}
        for wid in range(len(self.conns)):
            queue = self.inbox[wid]
            while True:
                if queue.empty():  # a dead worker's last messages are still read
                    left = end - self.loop.time()
                    if wid in self.dead or left <= 0:
                        break
                    try:
                        msg = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    msg = queue.get_nowait()
                if msg[0] == kind:
                    out[wid] = msg
                    break
        return out

    def _left(self, deadline: float, minimum: float = 0.0) -> float:
        """Seconds until the monotonic ``deadline``, at least ``minimum``."""
        return max(minimum, deadline - time.monotonic())

    async def _show_progress(self) -> None:
        cfg = self.cfg
        total = cfg["clients"] + cfg["stall"]
        while True:
            await asyncio.sleep(1.0)
            rows = list(self.progress.values())
            sub = sum(r[0] for r in rows)
            failed = sum(r[1] for r in rows)
            delivered = sum(r[2] for r in rows)
            errors = sum(r[4] for r in rows)
            expected = self.expected_total
            print(
                f"[bench {time.monotonic() - self.t0:6.1f}s] {self.phase:<11} "
                f"connected {sub}/{total} failed {failed}  "
                f"delivered {delivered}/{expected}  errors {errors}",
                file=sys.stderr,
                flush=True,
            )

    # run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the whole benchmark; returns the report dict."""
        pid = self.cfg["server_pid"]
        self.server_before = _server_sample(pid) if pid else None
        if pid and self.server_before is None:
            raise _BenchFailed(f"cannot read /proc/{pid}: no such process?")
        self._spawn()
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            return runner.run(self._run())

    async def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.loop = asyncio.get_running_loop()
        self.inbox = [asyncio.Queue() for _ in self.conns]
        self.all_done = asyncio.Event()
        for wid, conn in enumerate(self.conns):
            _add_pipe_reader(self.loop, conn, self._on_pipe, wid)
        progress = asyncio.ensure_future(self._show_progress()) if cfg["progress"] else None
        publisher: _Publisher | None = None
        try:
            ups = await self._collect("up", self._left(self.work_deadline))
            if len(ups) < len(self.conns):
                raise _BenchFailed("workers did not start in time")
            publisher = _Publisher(cfg)
            await publisher.open(self._left(self.work_deadline))
            return await self._phases(publisher)
        finally:
            if progress is not None:
                progress.cancel()
            if publisher is not None:
                await publisher.close()
            self._broadcast(("exit",))

    async def _phases(self, publisher: _Publisher) -> dict[str, Any]:
        cfg = self.cfg
        # 1. connect + auth + subscribe
        self.phase = "connecting"
        t_connect = time.time_ns()
        self._broadcast(("connect", self.work_deadline))
        ready = await self._collect("ready", self._left(self.work_deadline))
        subscribed = sum(m[1] for m in ready.values())
        stalled_ready = sum(m[2] for m in ready.values())
        last_ready = max((m[4] for m in ready.values()), default=0)
        connect_seconds = max(0.0, (last_ready - t_connect) / 1e9)
        chan_clients = [0] * cfg["channels"]
        for m in ready.values():
            for c, k in enumerate(m[5]):
                chan_clients[c] += k
        planned = [len(range(c, cfg["messages"], cfg["channels"])) for c in range(cfg["channels"])]
        self.expected_total = sum(map(int.__mul__, chan_clients, planned))
        # 2. publish
        self.phase = "publishing"
        pub_start = time.time_ns()
        if subscribed:
            pub = await publisher.publish(self.work_deadline)
        else:
            pub = _PublishResult(cfg["channels"])
            pub.error("no client subscribed: nothing published")
        pub_end = time.time_ns()
        # 3. wait for deliveries
        self.phase = "delivering"
        self.expected_total = sum(map(int.__mul__, chan_clients, pub.per_channel))
        self._broadcast(("published", pub.per_channel))
        wait = min(self._left(self.work_deadline), cfg["timeout"])
        self._check_done()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), wait)
        server_mid = _server_sample(cfg["server_pid"]) if cfg["server_pid"] else None
        # 4. results
        self.phase = "stopping"
        drain_s = max(0.1, min(2.0, 0.25 * self.reserve))
        self._broadcast(("stop", drain_s))
        results = await self._collect(
            "result", self._left(self.deadline - 0.5 * self.reserve, drain_s + 1.0)
        )
        report = self._report_base(connect_seconds, subscribed, pub, pub_start, pub_end, results)
        if cfg["stall"]:
            codes: Counter[str] = Counter()
            for m in results.values():
                codes.update({str(k): v for k, v in m[1]["stall_codes"].items()})
            report["stalled_closed_codes"] = dict(sorted(codes.items()))
            report["stalled_open"] = sum(m[1]["stalled_open"] for m in results.values())
            report["stalled_subscribed"] = stalled_ready
        # 5. reconnect storm
        if cfg["reconnect"]:
            self.phase = "reconnect"
            await self._reconnect_phase(report)
        # 6. server after, generator CPU
        self.phase = "exiting"
        close_s = min(2.0, self._left(self.deadline, 0.2))
        self._broadcast(("exit", close_s))
        byes = await self._collect("bye", close_s + 1.0)
        extra_closes = sum(m[2] for m in byes.values())
        if extra_closes:
            report["closes_after_stop"] = extra_closes
        cpu = _cpu_seconds() + sum(m[1] for m in byes.values())
        missing = [w for w in range(len(self.conns)) if w not in byes]
        report["generator_cpu_s"] = round(cpu, 3)
        if missing:
            report["generator_cpu_incomplete"] = len(missing)
        if cfg["server_pid"]:
            self._server_report(report, server_mid, subscribed + stalled_ready)
        report["elapsed_seconds"] = round(time.monotonic() - self.t0, 3)
        return report

    def _report_base(
        self,
        connect_seconds: float,
        subscribed: int,
        pub: _PublishResult,
        pub_start: int,
        pub_end: int,
        results: dict[int, tuple[Any, ...]],
    ) -> dict[str, Any]:
        cfg = self.cfg
        stats = [m[1] for m in results.values()]
        delivered = sum(s["delivered"] for s in stats)
        unique = sum(s["unique"] for s in stats)
        expected = self.expected_total  # from the clients that subscribed and what was published
        lost = max(0, expected - unique)
        missing_workers = len(self.conns) - len(results)
        errors = sum(s["errors"] for s in stats) + pub.errors + missing_workers
        failed_clients = cfg["clients"] - subscribed
        samples: list[str] = []
        for s in stats:
            samples.extend(s["error_samples"])
        samples.extend(pub.error_samples)
        if missing_workers:
            samples.append(f"{missing_workers} worker(s) sent no results")
        last_ns = max((s["last_ns"] for s in stats), default=0)
        first_ns = pub.first_ns or pub_start
        span = (last_ns - first_ns) / 1e9 if last_ns > first_ns else 0.0
        closes: Counter[str] = Counter()
        for s in stats:
            closes.update({str(k): v for k, v in s["closes"].items()})
        publish_seconds = ((pub.last_ns or pub_end) - first_ns) / 1e9 if pub.sent else 0.0
        return {
            "clients": cfg["clients"],
            "channels": cfg["channels"],
            "messages": cfg["messages"],
            "size": cfg["size"],
            "via": cfg["via"],
            "procs": cfg["procs"],
            "subscribed": subscribed,
            "failed_clients": failed_clients,
            "connect_seconds": round(connect_seconds, 3),
            "connect_rate": round(subscribed / connect_seconds, 1) if connect_seconds > 0 else 0.0,
            "published": pub.sent,
            "publish_seconds": round(publish_seconds, 3),
            "publish_errors": pub.errors,
            "publish_throttled": pub.throttled,
            "expected": expected,
            "deliveries": delivered,
            "frames": sum(s["frames"] for s in stats),
            "unique": unique,
            "deliveries_per_s": round(delivered / span, 1) if span > 0 else 0.0,
            "latency_ms": _latency_ms(stats),
            "lost": lost,
            "duplicated": sum(s["dups"] for s in stats),
            "errors": errors,
            "error_samples": samples[:ERROR_SAMPLES],
            "closes": dict(sorted(closes.items())),
        }

    async def _reconnect_phase(self, report: dict[str, Any]) -> None:
        close_s = min(5.0, self._left(self.deadline - 0.5 * self.reserve, 0.2))
        self._broadcast(("close", close_s))
        closed = await self._collect("closed", close_s + 1.0)
        until = max(time.monotonic() + 1.0, self.deadline - 0.3 * self.reserve)
        self._broadcast(("reconnect", until))
        t = time.time_ns()
        done = await self._collect("reconnected", self._left(until) + 1.0)
        ok = sum(m[1] for m in done.values())
        errors = sum(m[3] for m in done.values())
        errors += len(self.conns) - len(done) + len(self.conns) - len(closed)
        end = max((m[4] for m in done.values()), default=0)
        # from the reconnect order to the last client re-authenticated and resubscribed
        report["reconnect_seconds"] = round((end - t) / 1e9, 3) if ok and end > t else None
        report["reconnect_errors"] = errors
        report["reconnected"] = ok
        if errors:
            tail: list[str] = []
            for m in done.values():
                tail.extend(m[5])
            report["reconnect_error_samples"] = tail[:ERROR_SAMPLES]

    def _server_report(
        self, report: dict[str, Any], mid: dict[str, float] | None, conns: int
    ) -> None:
        before = self.server_before
        after = _server_sample(self.cfg["server_pid"])
        if before is None:
            return
        end = after or mid
        if end is not None:
            report["server_cpu_s"] = round(end["cpu"] - before["cpu"], 3)
        report["server_rss_mib_before"] = round(before["rss"] / 1024, 1)
        report["server_hwm_mib_before"] = round(before["hwm"] / 1024, 1)
        if mid is not None:
            report["server_rss_mib_after"] = round(mid["rss"] / 1024, 1)
            report["server_hwm_mib_after"] = round(mid["hwm"] / 1024, 1)
            report["server_rss_per_conn_kib"] = (
                round((mid["rss"] - before["rss"]) / conns, 2) if conns else 0.0
            )
        report["server_procs"] = int(before["procs"])
        if after is None:
            report["server_exited"] = True


# --------------------------------------------------------------------- publishing


class _PublishResult:
    """What the publisher did: counts per channel, error count, first/last send (ns)."""

    def __init__(self, channels: int = 0) -> None:
        self.per_channel = [0] * channels
        self.sent = 0
        self.errors = 0
        self.throttled = 0  # emits answered 429 and retried
        self.error_samples: list[str] = []
        self.first_ns = 0
        self.last_ns = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(text[:300])


def _payload_factory(size: int) -> Callable[[int], bytes]:
    """Return ``make(i)``: the padded JSON payload of message ``i``, stamped now (ns)."""
    pad = b"x" * (size + 64)

    def make(i: int) -> bytes:
        head = b'{"i":%d,"t":%d,"p":"' % (i, time.time_ns())
        return head + pad[: max(0, size - len(head) - 2)] + b'"}'

    return make


class _Pacer:
    """Hands out message indices 0..n-1, no faster than ``rate`` per second (0 = no limit)."""

    def __init__(self, n: int, rate: float, deadline: float) -> None:
        self.n = n
        self.rate = rate
        self.deadline = deadline
        self.next = 0
        self.start = time.monotonic()

    async def take(self) -> int | None:
        """The next index (sleeping until it is due), or None when done or out of time."""
        if self.next >= self.n or time.monotonic() >= self.deadline:
            return None
        i = self.next
        self.next += 1
        if self.rate > 0:
            delay = self.start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return i


class _Publisher:
    """Publishes the bench messages through NATS or pushsvc's HTTP emit endpoint."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.nc: Any = None
        self.http: list[_HttpConnection] = []

    async def open(self, wait_s: float) -> None:
        """Connect to NATS (``--via nats``) or prepare the emit connections, within wait_s s."""
        cfg = self.cfg
        if cfg["via"] == "nats":
            seen: list[Exception] = []

            async def on_error(exc: Exception) -> None:  # instead of nats-py's tracebacks
                seen.append(exc)

            try:
                self.nc = await natsconn.connect(
                    [u.strip() for u in cfg["nats_url"].split(",") if u.strip()],
                    cfg["nats_security"],
                    timeout=max(0.5, wait_s),
                    connect_timeout=min(5.0, max(0.5, wait_s)),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # one try per server (0 would mean forever)
                    reconnect_time_wait=0.1,
                    error_cb=on_error,
                    name="pushsvc-bench",
                )
            except natsconn.NatsRefused as exc:
                raise _BenchFailed(str(exc)) from None
            except Exception as exc:
                reason = seen[-1] if seen else exc
                raise _BenchFailed(
                    f"cannot connect to NATS at {natsconn.display_url(cfg['nats_url'])}: {reason!r}"
                ) from None
        else:
            n = max(1, min(EMIT_CONNECTIONS, cfg["messages"]))
            aud = cfg["emit_audience"]
            self.http = [_HttpConnection(cfg, _mint(cfg, f"bench-emit-{k}", aud)) for k in range(n)]

    async def close(self) -> None:
        """Close the NATS connection / HTTP connections."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2.0)
            self.nc = None
        for conn in self.http:
            conn.close()

    async def publish(self, deadline: float) -> _PublishResult:
        """Publish every message (or until the monotonic ``deadline``); returns the counts."""
        if self.cfg["via"] == "nats":
            return await self._publish_nats(deadline)
        return await self._publish_emit(deadline)

    async def _publish_nats(self, deadline: float) -> _PublishResult:
        cfg = self.cfg
        nc = self.nc
        channels = cfg["channels"]
        res = _PublishResult(channels)
        subjects = [f"{cfg['prefix']}.bench.{c}" for c in range(channels)]
        make = _payload_factory(cfg["size"])
        pacer = _Pacer(cfg["messages"], cfg["rate"], deadline)
        publish = nc.publish
        res.first_ns = time.time_ns()
        try:
            if cfg["rate"] > 0:
                while (i := await pacer.take()) is not None:
                    await publish(subjects[i % channels], make(i))
                    res.per_channel[i % channels] += 1
            else:
                n = cfg["messages"]
                for i in range(n):
                    await publish(subjects[i % channels], make(i))
                    res.per_channel[i % channels] += 1
                    if i % PUBLISH_BATCH == PUBLISH_BATCH - 1:
                        if i % PUBLISH_FLUSH == PUBLISH_FLUSH - 1:
                            await nc.flush(timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                        else:
                            await asyncio.sleep(0)
                        if time.monotonic() >= deadline:
                            res.error("publishing stopped at the duration limit")
                            break
            await nc.flush(timeout=5)
        except Exception as exc:
            res.error(f"NATS publish failed: {exc!r}")
        res.last_ns = time.time_ns()
        res.sent = sum(res.per_channel)
        return res

    async def _publish_emit(self, deadline: float) -> _PublishResult:
        cfg = self.cfg
        channels = cfg["channels"]
        res = _PublishResult(channels)
        make = _payload_factory(cfg["size"])
        pacer = _Pacer(cfg["messages"], cfg["rate"], deadline)
        paths = [f"{cfg['base']}/emit/{quote(f'bench.{c}')}" for c in range(channels)]
        res.first_ns = time.time_ns()

        async def sender(conn: _HttpConnection) -> None:
            while (i := await pacer.take()) is not None:
                c = i % channels
                for attempt in range(EMIT_RETRIES + 1):
                    try:
                        status, headers, body = await asyncio.wait_for(
                            conn.post(paths[c], make(i)), max(0.1, deadline - time.monotonic())
                        )
                    except Exception as exc:
                        conn.close()
                        res.error(f"emit {i}: {exc!r}")
                        break
                    if 200 <= status < 300:
                        res.per_channel[c] += 1
                        break
                    if status == 429 and attempt < EMIT_RETRIES:
                        res.throttled += 1
                        try:
                            delay = float(headers.get("retry-after", "0.1"))
                        except ValueError:
                            delay = 0.1
                        await asyncio.sleep(min(1.0, max(0.01, delay)))
                        continue
                    res.error(f"emit {i}: HTTP {status} {body[:120]!r}")
                    break

        await asyncio.gather(*(sender(conn) for conn in self.http))
        res.last_ns = time.time_ns()
        res.sent = sum(res.per_channel)
        if time.monotonic() >= deadline and res.sent + res.errors < cfg["messages"]:
            res.error("publishing stopped at the duration limit")
        return res


class _HttpConnection:
    """A minimal keep-alive HTTP/1.1 client over asyncio streams (POST only)."""

    def __init__(self, cfg: dict[str, Any], token: str) -> None:
        self.cfg = cfg
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` (JSON) to ``path``; returns (status, lower-cased headers, body)."""
        cfg = self.cfg
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                cfg["host"], cfg["port"], ssl=_ssl_context(cfg)
            )
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {cfg['netloc']}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        reader = self.reader
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(c[:-2] for c in chunks)
            with contextlib.suppress(Exception):  # trailers end with an empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
        else:
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, data

    def close(self) -> None:
        """Drop the connection; the next post reconnects."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# ------------------------------------------------------------------ measurements


def _server_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds and RSS/HWM (KiB) of ``pid`` and its descendants (nats-server excluded).

    Returns None when ``pid`` does not exist (or /proc is unreadable).
    """
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        names[int(entry)] = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    if pid not in names:
        return None
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p != pid and names.get(p) == "nats-server":
            continue
        tree.append(p)
        todo.extend(parents.get(p, []))
    cpu = rss = hwm = 0.0
    for p in tree:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
            fields = stat[stat.rfind(")") + 2 :].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return {"cpu": cpu, "rss": rss, "hwm": hwm, "procs": len(tree)}


def _latency_ms(stats: list[dict[str, Any]]) -> dict[str, float | None]:
    """p50/p90/p99 of the pooled samples and the exact max, in milliseconds."""
    top = max((s["stride"] for s in stats), default=1)
    pooled: list[int] = []
    for s in stats:
        lat = array.array("q")
        lat.frombytes(s["lat"])
        # equalise the weights: a worker that kept every k-th sample is thinned to the max stride
        pooled.extend(lat[:: top // s["stride"]] if s["stride"] < top else lat)
    lat_max = max((s["lat_max"] for s in stats), default=0)
    if not pooled:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    pooled.sort()
    n = len(pooled)

    def pct(q: float) -> float:
        return round(pooled[min(n - 1, int(q * n))] / 1e6, 3)

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": round(lat_max / 1e6, 3)}


def _exit_code(report: dict[str, Any]) -> int:
    bad = (
        report["failed_clients"]
        or report["lost"]
        or report["duplicated"]
        or report["errors"]
        or report.get("reconnect_errors")
    )
    return 1 if bad else 0


def _format_report(r: dict[str, Any]) -> str:
    """The human-readable report (same values as the JSON one)."""
    lat = r["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"pushsvc bench: {r['clients']} clients on {r['channels']} channel(s), "
        f"{r['messages']} messages x {r['size']} B via {r['via']}, {r['procs']} procs",
        f"  connect       {r['connect_seconds']:.3f} s  ({r['connect_rate']:.0f} conn/s, "
        f"{r['subscribed']}/{r['clients']} subscribed)",
        f"  publish       {r['publish_seconds']:.3f} s  ({r['published']} published, "
        f"{r['publish_errors']} errors"
        + (f", {r['publish_throttled']} retried after 429" if r["publish_throttled"] else "")
        + ")",
        f"  deliveries    {r['deliveries']} of {r['expected']} expected  "
        f"({r['deliveries_per_s']:,.0f}/s, {r['frames']} frames)",
        f"  latency ms    p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
        f"max {ms(lat['max'])}",
        f"  lost          {r['lost']}   duplicated {r['duplicated']}   errors {r['errors']}",
        f"  closes        {_codes(r['closes'])}",
        f"  generator cpu {r['generator_cpu_s']:.2f} s",
    ]
    if "server_rss_mib_before" in r:
        rss = f"rss {r['server_rss_mib_before']:.1f}"
        if "server_rss_mib_after" in r:
            rss += (
                f" -> {r['server_rss_mib_after']:.1f} MiB "
                f"({r['server_rss_per_conn_kib']:.1f} KiB/conn)"
            )
        cpu = f"cpu {r['server_cpu_s']:.2f} s  " if "server_cpu_s" in r else ""
        lines.append(f"  server        {cpu}{rss}, {r['server_procs']} process(es)")
    if "reconnect_seconds" in r:
        lines.append(
            f"  reconnect     {_secs(r['reconnect_seconds'])}  ({r['reconnected']} ok, "
            f"{r['reconnect_errors']} errors)"
        )
    if "stalled_closed_codes" in r:
        lines.append(
            f"  stalled       closed {_codes(r['stalled_closed_codes'])}, "
            f"still open {r['stalled_open']}"
        )
    for text in r["error_samples"] + r.get("reconnect_error_samples", []):
        lines.append(f"  ! {text}")
    return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in codes.items()) or "none"
