"""``pushsvc bench``: a load generator that measures pushsvc end to end.

A coordinator process forks ``--procs`` worker processes. Each worker runs one
uvloop event loop and owns its share of the ``--clients`` WebSocket clients (plus
the ``--stall`` slow clients). Every client connects to ``ws://host:port/ws``,
authenticates with its own JWT (``sub`` = ``bench-<n>``), subscribes to one
channel (``bench.0``, ``bench.1``... round-robin) and then only counts and
timestamps deliveries; statistics are computed once, at the end. Tokens are
minted with ``--secret`` (or ``PUSHSVC_JWT_SECRET``); without one they come from
the server's ``GET /dev/token`` (``pushsvc serve --dev``).

When every client is subscribed, the coordinator publishes ``--messages``
payloads (round-robin over the channels) to NATS subject ``<prefix>.<channel>``
(``--via nats``) or through ``POST /emit/<channel>`` (``--via emit``, with
``--emit-concurrency`` POSTs in flight). Each payload is a JSON object padded to
``--size`` bytes::

    {"i": <message index>, "t": <time.time_ns() at publish>, "p": "xxxx..."}

so latency is receive time minus ``t`` (publisher and clients share a host and
its clock). The run ends when every subscribed client has every message of its
channel, ``--timeout`` seconds after the last publish, or at ``--duration-limit``,
whichever comes first; every process exits by itself.

Capacity runs: ``--source-addresses N`` spreads the clients over 127.0.0.1..N
(one source address has ~28,000 ephemeral ports towards one server port),
``--connect-rate`` paces the connects, and every client answers the server's
heartbeats (``ping`` frames and RFC 6455 pings) all along. ``--idle SECONDS``
publishes nothing for that long once everyone is subscribed and reports the
heartbeats and the server's CPU and RSS meanwhile; ``--broadcast [ROUNDS]``
publishes one message per round (a second apart) to the one channel every
client is on and reports, per round, publish to last delivery::

    pushsvc bench --clients 19000 --procs 2 --connect-rate 2000 --idle 60 --broadcast 5 \
        --server-pid "$(pgrep -of 'pushsvc serve')"

Modes: the default run against ``--url``; ``--floor`` (:mod:`.floor`), the
machine's raw TCP fan-out; ``--vs-floor`` (:mod:`.vsfloor`), both alternately
for ``--rounds`` rounds, side by side with their ratios; ``--compression both``
(:mod:`.vscompression`), clients without and with permessage-deflate
alternately against one ``PUSHSVC_COMPRESSION=deflate`` server, side by side.
``--compression deflate`` alone makes every client offer permessage-deflate
(RFC 7692) and inflate what it gets; ``--sample`` publishes the shipped ~2 KiB
order book instead of padding.

Example (server on 127.0.0.1:8000 with the same secret)::

    export PUSHSVC_JWT_SECRET=change-me
    pushsvc bench --clients 1000 --channels 10 --messages 2000 --size 200
    pushsvc bench --clients 200 --stall 5 --rate 500 --messages 20000 --reconnect \\
        --server-pid "$(pgrep -f 'pushsvc serve' | head -1)" --json

Report keys (text and ``--json``): clients, channels, messages, size, via,
connect_seconds, connect_rate (connections/s), publish_seconds, deliveries,
deliveries_per_s (deliveries / seconds from first publish to last delivery),
latency_ms {p50, p90, p99, max}, lost, duplicated, errors, cut (None, or what
``--duration-limit`` cut short: "publish" or "deliveries"; then deliveries still in
flight count as lost and the exit code is 1), closes (close code ->
count, for closes the bench did not start), generator_cpu_s, tokens ("secret" or
"dev" for /dev/token); with ``--via nats`` at a ``--rate``: nats_hop_ms {subject,
messages, p50, p99} (publish to a plain NATS subscriber of the subject pushsvc
reads: the part of the latency that is NATS's, see
:class:`~pushsvc.bench.hop.HopProbe`); with ``--via emit``: emit_concurrency; with
``--server-pid``: server_cpu_s, server_rss_mib_before, server_rss_mib_after,
server_rss_per_conn_kib, server_cpu_ms_per_connection (connect phase:
handshake + auth + subscribe), server_cpu_us_per_frame (first publish to last
delivery, per frame); with ``--reconnect``: reconnect_seconds, reconnect_errors
(and with ``--server-pid`` server_cpu_ms_per_reconnect); with ``--stall``:
stalled_closed_codes (and stalled_open); with ``--idle``: idle_seconds,
idle_heartbeats {app (pushsvc ``ping`` frames), protocol (RFC 6455 pings),
per_connection} and with ``--server-pid`` server_idle_cpu_pct (of one core),
server_idle_us_per_heartbeat, server_idle_rss_mib, server_idle_rss_per_conn_kib;
with ``--broadcast``: broadcast_ms {rounds, last_p50, last_max, last (per
round: publish to the last delivery), p50, p99 (across connections)} and with
``--server-pid`` server_cpu_ms_per_broadcast (and ``_net``: less the idle rate).
A few more keys help diagnosis: procs, subscribed, failed_clients, published,
publish_errors, publish_throttled (emits retried after 429), expected, unique, frames
(WebSocket frames that carried deliveries: deliveries / frames is the server's
batching), compression, wire_bytes and wire_bytes_per_delivery (bytes the clients
read from their sockets after subscribing), with ``--server-pid``
server_cpu_us_per_delivery, error_samples, elapsed_seconds.

Exit code: 0 when every client subscribed and got every message exactly once
with no error, 1 otherwise, 2 for bad arguments (or no way to get tokens).

Modules, each importing only ones listed before it (no cycle): ``system``
(processes, /proc), ``options`` (flags), ``httpclient`` (HTTP/1.1 over h11),
``tokens``, ``client`` (the WebSocket client protocol), ``worker`` (client
processes), ``report``, ``hop`` (the NATS hop), ``publishers``, ``coordinator``,
``floor``, ``vsfloor``, ``vscompression``; this one ties them up. ``heap``
(``python -m pushsvc.bench.heap``, live heap per idle connection with and
without compression) imports none of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .coordinator import run_bench
from .floor import format_floor, run_floor
from .options import BenchError, add_arguments, build_config
from .report import exit_code, format_report
from .system import raise_nofile_limit
from .tokens import fetch_dev_tokens
from .vscompression import format_vs_compression, run_vs_compression, vs_compression_exit_code
from .vsfloor import format_vs_floor, run_vs_floor, vs_floor_exit_code

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and print the report on stdout.

    Returns:
        0 when every client subscribed and received every message exactly once
        without errors, 1 when something was lost, duplicated or failed or the
        duration limit cut the run short, 2 when
        the arguments are invalid or no tokens can be had (the reason is printed
        on stderr), 130 when interrupted.
    """
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"pushsvc bench: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    if cfg["floor"]:
        return _main_floor(cfg)
    if not cfg["secret"]:
        if cfg["progress"]:
            print(f"[bench] no secret: tokens from {cfg['http_url']}/dev/token", file=sys.stderr)
        try:
            cfg["tokens"] = fetch_dev_tokens(cfg)
        except BenchError as exc:
            print(f"pushsvc bench: {exc}", file=sys.stderr)
            return 2
    try:
        if cfg["compression"] == "both":
            report = run_vs_compression(cfg)
            code = vs_compression_exit_code(report)
            text = format_vs_compression
        elif cfg["vs_floor"]:
            report = run_vs_floor(cfg)
            code = vs_floor_exit_code(report)
            text = format_vs_floor
        else:
            report = run_bench(cfg)
            code = exit_code(report)
            text = format_report
    except KeyboardInterrupt:
        print("pushsvc bench: interrupted", file=sys.stderr)
        return 130
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"pushsvc bench: {exc}", file=sys.stderr)
        return 1
    _print(cfg, report, text)
    return code


def _main_floor(cfg: dict[str, Any]) -> int:
    """``--floor``: the raw TCP fan-out of this machine (see :mod:`pushsvc.bench.floor`)."""
    try:
        report = run_floor(cfg)
    except (RuntimeError, OSError) as exc:
        print(f"pushsvc bench --floor: {exc}", file=sys.stderr)
        return 1
    _print(cfg, report, format_floor)
    return 0 if report["lost"] == 0 else 1


def _print(cfg: dict[str, Any], report: dict[str, Any], text: Any) -> None:
    print(json.dumps(report) if cfg["json"] else text(report), flush=True)
