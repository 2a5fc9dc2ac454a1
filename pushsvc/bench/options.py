"""``pushsvc bench`` flags and their validation into one picklable config dict.

:func:`add_arguments` declares the flags (argparse); :func:`build_config` checks
them and returns the plain dict every other bench module reads (it crosses
process boundaries, so it holds only picklable values). Durations are seconds,
sizes bytes, rates per second.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..config import nats as natsconn
from ..config.settings import split_servers
from ..serverurl import parse_server_url

DEFAULT_URL = "http://127.0.0.1:8000"  # `pushsvc serve`'s default address
EMIT_CONCURRENCY = 16  # default parallel emit POSTs (one HTTP connection and emit user each)


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
    add("--clients", type=int, default=1000, help="WebSocket clients (default 1000)")
    add("--channels", type=int, default=1, help="channels bench.0..bench.N-1 (default 1)")
    add("--messages", type=int, default=1000, help="messages published in total (default 1000)")
    add("--size", type=int, default=100, help="payload size in bytes (default 100)")
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
        help="hard cap on the whole run (each run of --vs-floor), seconds (default 120)",
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
    if args.emit_concurrency < 1:
        raise ValueError("--emit-concurrency must be >= 1")
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    if args.vs_floor and (args.reconnect or args.stall):
        raise ValueError("--vs-floor compares plain runs: --reconnect and --stall do not apply")
    if not args.prefix or any(c in args.prefix for c in " .*>\t\r\n"):
        raise ValueError("--prefix must be one NATS token, e.g. 'push'")
    server = parse_server_url(args.url, "--url")
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
        "channels": args.channels,
        "messages": args.messages,
        "size": args.size,
        "rate": float(args.rate),
        "via": args.via,
        "emit_concurrency": args.emit_concurrency,
        "procs": max(1, min(args.procs, total)),
        "connect_rate": float(args.connect_rate),
        "timeout": float(args.timeout),
        "duration_limit": float(args.duration_limit),
        "reconnect": bool(args.reconnect),
        "stall": args.stall,
        "server_pid": args.server_pid,
        "json": bool(args.json),
        "floor": bool(args.floor),
        "vs_floor": bool(args.vs_floor),
        "rounds": args.rounds,
        "progress": not (args.quiet or args.json),
    }
