"""``pushsvc bench`` flags and their validation into one picklable config dict.

:func:`add_arguments` declares the flags (argparse); :func:`build_config` checks
them and returns the plain dict every other bench module reads (it crosses
process boundaries, so it holds only picklable values). Durations are seconds,
sizes bytes, rates per second.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from importlib import resources
from typing import Any

from ..config import nats as natsconn
from ..config.settings import split_servers
from ..serverurl import parse_server_url

DEFAULT_URL = "http://127.0.0.1:8000"  # `pushsvc serve`'s default address
EMIT_CONCURRENCY = 16  # default parallel emit POSTs (one HTTP connection and emit user each)
MESSAGES = 1000  # default --messages
BROADCAST_ROUNDS = 5  # --broadcast without a number
BROADCAST_INTERVAL = 1.0  # seconds between two --broadcast rounds
COMPRESSION_CHOICES = ("off", "deflate", "both")
SAMPLE = "samples/orderbook.json"  # --sample, in this package


class BenchError(Exception):
    """The run cannot start or go on (bad flags, no NATS, workers died...): text for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser`` (an argparse subparser).

    Durations are seconds, sizes bytes, rates per second; :mod:`pushsvc.bench`
    describes what a run does with them.
    """
    env = os.environ.get
    add = parser.add_argument
    add(
        "--url",
        default=env("PUSHSVC_URL") or DEFAULT_URL,
        help=f"pushsvc base URL, ws URL <url>/ws (default: $PUSHSVC_URL or {DEFAULT_URL})",
    )
    add(
        "--nats-url",
        default=env("PUSHSVC_NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS server for --via nats (default: $PUSHSVC_NATS_URL or nats://127.0.0.1:4222)",
    )
    add(
        "--secret",
        default=env("PUSHSVC_JWT_SECRET"),
        help="HS256 secret to mint client tokens (default: $PUSHSVC_JWT_SECRET; without one, "
        "tokens come from the server's GET /dev/token, which `pushsvc serve --dev` enables)",
    )
    add(
        "--prefix",
        default=env("PUSHSVC_SUBJECT_PREFIX") or "push",
        help="NATS subject prefix (default: $PUSHSVC_SUBJECT_PREFIX or push)",
    )
    add("--clients", type=int, default=1000, help="clients (default 1000)")
    add(
        "--transport",
        choices=("ws", "sse", "stream"),
        default="ws",
        help="how the clients connect: WebSocket /ws, SSE GET /sse, HTTP-streaming "
        "POST /stream (default ws)",
    )
    add("--channels", type=int, default=1, help="channels bench.0..bench.N-1 (default 1)")
    add(
        "--messages",
        type=int,
        default=None,
        help=f"messages published in total (default {MESSAGES}; with --broadcast, one per round)",
    )
    add("--size", type=int, default=100, help="payload size in bytes (default 100)")
    add(
        "--sample",
        action="store_true",
        help="publish the shipped ~2 KiB order book (pushsvc/bench/samples/orderbook.json, "
        "a realistic JSON market-data message) instead of padding to --size",
    )
    add(
        "--compression",
        choices=COMPRESSION_CHOICES,
        default="off",
        help="WebSocket clients offer permessage-deflate (deflate) or not (off, default); "
        "'both' alternates off and deflate runs --rounds times against the same server "
        "(PUSHSVC_COMPRESSION=deflate) and prints wire bytes and server CPU per delivery "
        "side by side with their ratios",
    )
    add("--rate", type=float, default=0.0, help="publish rate, messages/s (0 = max; default)")
    add("--via", choices=("nats", "emit"), default="nats", help="publish path (default nats)")
    add(
        "--emit-concurrency",
        type=int,
        default=EMIT_CONCURRENCY,
        metavar="N",
        help=f"--via emit: POSTs in flight at once, each on its own keep-alive connection "
        f"(default {EMIT_CONCURRENCY}); 1 = one POST at a time, the next after the 202",
    )
    add(
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="client processes (default: CPU count)",
    )
    add(
        "--source-addresses",
        type=int,
        default=1,
        metavar="N",
        help="spread the clients over N loopback source addresses 127.0.0.1, 127.0.0.2, ... "
        "(each gives ~28,000 ephemeral ports towards one server port; a loopback --url only; "
        "default 1: the kernel picks)",
    )
    add(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="once every client is subscribed, publish nothing for SECONDS and report the "
        "server's CPU (%% of one core, per heartbeat) and RSS meanwhile (needs --server-pid, "
        "or --vs-floor's own lookup; default 0: no idle phase)",
    )
    add(
        "--broadcast",
        type=int,
        nargs="?",
        const=BROADCAST_ROUNDS,
        default=0,
        metavar="ROUNDS",
        help=f"publish ROUNDS messages (default {BROADCAST_ROUNDS}) to the one channel every "
        f"client is on, {BROADCAST_INTERVAL:g} s apart (--via nats, --channels 1), and report "
        "per round the time from the publish to the last delivery, and p50/p99 across connections",
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
        help="hard cap on the whole run (each run of --vs-floor), seconds (default 120); "
        "a run it cuts short reports cut and exits 1",
    )
    add(
        "--reconnect",
        action="store_true",
        help="after the run, close all clients and reconnect them at once (same tokens)",
    )
    add(
        "--churn",
        type=float,
        default=0.0,
        metavar="PCT",
        help="while publishing, reconnect PCT%% of the clients per minute (a tenth every "
        "6 s), each resuming with subscribe since its last seq: a soak with churn; with "
        "--server-pid, server RSS and open files are sampled every 30 s",
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
        help="server process to sample (CPU seconds and RSS from /proc) before and after; "
        "--vs-floor finds the process listening on a loopback --url by itself",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--floor",
        action="store_true",
        help="measure this machine's raw TCP fan-out instead of a pushsvc server: the same "
        "--clients/--messages/--size/--rate/--procs against a built-in server that only writes "
        "pre-built bytes to every socket (no WebSocket, JSON or NATS); the latency floor that "
        "no push server on this machine can beat",
    )
    mode.add_argument(
        "--vs-floor",
        action="store_true",
        help="run the floor and the server at --url with the same flags, alternating, "
        "--rounds times, and print both side by side with their ratios (medians)",
    )
    add("--rounds", type=int, default=3, help="--vs-floor rounds (default 3)")
    add("--json", action="store_true", help="print one JSON object instead of the text report")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    natsconn.add_arguments(parser)  # --nats-creds ... --nats-tls-key for --via nats


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate ``args`` (from :func:`add_arguments`) into a plain, picklable dict.

    Raises:
        ValueError: a flag is out of range or malformed; the message names it
            (a SettingsError for the NATS security flags).
    """
    for name in ("clients", "channels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    messages = _messages(args)
    if not 0 <= args.churn <= 100:
        raise ValueError("--churn must be a percentage, 0 to 100")
    if args.churn and (args.rate <= 0 or args.transport != "ws" or args.vs_floor or args.floor):
        raise ValueError("--churn needs --rate > 0 (a steady publish) and --transport ws")
    for name in ("stall", "size"):
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
    if args.emit_concurrency < 1:
        raise ValueError("--emit-concurrency must be >= 1")
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    if args.compression != "off" and args.transport != "ws":
        raise ValueError("--compression applies to WebSocket clients: use --transport ws")
    if args.compression == "both" and (args.vs_floor or args.floor or args.reconnect):
        raise ValueError(
            "--compression both compares plain runs: no --floor/--vs-floor/--reconnect"
        )
    if args.vs_floor and (args.reconnect or args.stall):
        raise ValueError("--vs-floor compares plain runs: --reconnect and --stall do not apply")
    if not args.prefix or any(c in args.prefix for c in " .*>\t\r\n"):
        raise ValueError("--prefix must be one NATS token, e.g. 'push'")
    if args.idle < 0:
        raise ValueError("--idle must be >= 0 seconds")
    server = parse_server_url(args.url, "--url")
    sources = source_addresses(args.source_addresses, server.host)
    total = args.clients + args.stall
    security = natsconn.NatsSecurity.from_args(args)
    security.check(split_servers(args.nats_url))  # SettingsError is a ValueError
    return {
        "host": server.host,
        "port": server.port,
        "tls": server.tls,
        "netloc": server.netloc,
        "base": server.base,
        "http_url": server.http_url,
        "ws_url": server.ws_url,
        "nats_url": args.nats_url,
        "nats_security": security,
        "secret": args.secret or None,
        "tokens": None,  # {"clients": [...], "emit": [...]} from /dev/token when no secret
        "audience": os.environ.get("PUSHSVC_JWT_AUDIENCE") or None,
        "emit_audience": os.environ.get("PUSHSVC_EMIT_AUDIENCE")
        or os.environ.get("PUSHSVC_JWT_AUDIENCE")
        or None,
        "issuer": os.environ.get("PUSHSVC_JWT_ISSUER") or None,
        "typ": os.environ.get("PUSHSVC_JWT_TYPE") or None,
        "emit_typ": os.environ.get("PUSHSVC_EMIT_TYPE") or None,
        "prefix": args.prefix,
        "clients": args.clients,
        "transport": args.transport,
        "channels": args.channels,
        "messages": messages,
        "size": sample_size() if args.sample else args.size,
        "sample": bool(args.sample),
        "compression": args.compression,
        "rate": 1.0 / BROADCAST_INTERVAL if args.broadcast else float(args.rate),
        "via": args.via,
        "emit_concurrency": args.emit_concurrency,
        "procs": max(1, min(args.procs, total)),
        "connect_rate": float(args.connect_rate),
        "source_addresses": sources,
        "idle": float(args.idle),
        "broadcast": args.broadcast,
        "broadcast_interval": BROADCAST_INTERVAL,
        "timeout": float(args.timeout),
        "duration_limit": float(args.duration_limit),
        "reconnect": bool(args.reconnect),
        "stall": args.stall,
        "churn": args.churn,
        "server_pid": args.server_pid,
        "json": bool(args.json),
        "floor": bool(args.floor),
        "vs_floor": bool(args.vs_floor),
        "rounds": args.rounds,
        "progress": not (args.quiet or args.json),
    }


def sample_payload() -> bytes:
    """The shipped sample message: a ~2 KiB order-book update (JSON object, one line)."""
    return (resources.files(__package__) / SAMPLE).read_bytes().strip()


def sample_size() -> int:
    """Bytes of a ``--sample`` payload as published: the sample plus the bench's stamps."""
    return len(sample_payload()) + len(b'"i":0000,"t":1796609444318512000,')


def _messages(args: argparse.Namespace) -> int:
    """``--messages`` checked against ``--broadcast`` (which sets it: one per round)."""
    if args.broadcast < 0:
        raise ValueError("--broadcast must be >= 0 rounds (0: none)")
    if args.broadcast:
        if args.messages is not None:
            raise ValueError("--broadcast publishes one message per round: drop --messages")
        if args.channels != 1 or args.via != "nats":
            raise ValueError("--broadcast needs --channels 1 and --via nats")
        if args.rate:
            raise ValueError(
                f"--broadcast paces itself (a round every {BROADCAST_INTERVAL:g} s): drop --rate"
            )
        return int(args.broadcast)
    if args.messages is None:
        return MESSAGES
    if args.messages < 0:
        raise ValueError("--messages must be >= 0")
    return int(args.messages)


def source_addresses(n: int, host: str) -> list[str]:
    """The ``--source-addresses`` list: ``n`` consecutive addresses from 127.0.0.1.

    Towards one server address and port, a client address has one ephemeral port
    per connection (``net.ipv4.ip_local_port_range``, 28,232 by default), so more
    connections than that need more source addresses; every address of
    127.0.0.0/8 is local on Linux (RFC 1122 3.2.1.3: loopback). With ``n`` = 1 the
    list is empty: the kernel picks the address.

    Raises:
        ValueError: ``n`` < 1 or > 65,536, or ``n`` > 1 with a ``host`` that is not
            an IPv4 loopback address.
    """
    if n < 1 or n > 65_536:
        raise ValueError("--source-addresses must be 1..65536")
    if n == 1:
        return []
    try:
        loopback = ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError("--source-addresses needs a 127.x.y.z --url (loopback sources)")
    first = ipaddress.ip_address("127.0.0.1")
    return [str(first + k) for k in range(n)]
