"""Prometheus collectors (served at ``GET /metrics``). Labels never carry tokens or users.

One process (``serve``, ``create_app`` under your own server) exposes its own
registry. Under ``serve --workers N`` every worker is a process of its own, so
``serve`` turns on prometheus-client's *multiprocess mode*: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before the workers start (and
removes it at exit); each worker writes its values there and whichever worker
answers ``GET /metrics`` reads them all (:func:`exposition`). The rules come from
the prometheus-client docs ("Multiprocess Mode"): counters and histograms are
summed over every process that ever ran; each gauge names how it is aggregated
(``multiprocess_mode``: ``livesum`` sums the live workers, ``livemin`` takes the
lowest live value, ``max`` the highest); files of exited workers' live gauges are
removed (``mark_process_dead``), so a dead worker's sockets do not count.
"""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

CONNECTIONS = Gauge(
    "pushsvc_connections",
    "Open authenticated connections, by transport (ws, sse, stream)",
    ["transport"],
    multiprocess_mode="livesum",
)
CONNECTION_CAPACITY = Gauge(
    "pushsvc_connection_capacity",
    "Connections the node accepts: PUSHSVC_MAX_CONNECTIONS or what the open-file limit "
    "allows, whichever is less (summed over live workers)",
    multiprocess_mode="livesum",
)
SUBSCRIPTIONS = Gauge(
    "pushsvc_subscriptions",
    "Client subscriptions (one per socket and channel, live or recovering)",
    multiprocess_mode="livesum",
)
CHANNELS = Gauge(
    "pushsvc_channels",
    "Channels with at least one local subscriber: one NATS subscription each, per worker",
    multiprocess_mode="livesum",
)
NATS_CONNECTED = Gauge(
    "pushsvc_nats_connected",
    "1 while the NATS connection is up (with workers: 1 only when every worker's is)",
    multiprocess_mode="livemin",
)
NATS_RECONNECTS = Counter(
    "pushsvc_nats_reconnects_total", "Reconnections to NATS after a lost connection"
)
INFO = Gauge(
    "pushsvc_info",
    "Always 1; labels name the node (PUSHSVC_NODE_NAME) and the pushsvc version",
    ["node", "version"],
    multiprocess_mode="livemax",
)
MESSAGES_RECEIVED = Counter(
    "pushsvc_messages_received_total", "NATS messages received for channels with local subscribers"
)
DELIVERIES = Counter("pushsvc_deliveries_total", "Message frames handed to sessions (fan-out)")
REPLAYED = Counter("pushsvc_replayed_total", "Messages replayed from history on subscribe")
DELIVERY_LATENCY = Histogram(
    "pushsvc_delivery_latency_seconds",
    "From the message's stream timestamp (Nats-Time-Stamp) to its frame being handed to the "
    "local sockets; one observation per message per worker holding the channel",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CLOSES = Counter("pushsvc_closes_total", "Sessions closed by the server", ["code"])
SLOW_CONSUMERS = Counter(
    "pushsvc_slow_consumers_total", "Sessions closed because their send buffer overflowed"
)
EMITS = Counter("pushsvc_emits_total", "HTTP emits by outcome", ["status"])
COMMANDS = Counter("pushsvc_commands_total", "Client commands by op", ["op"])
RATE_LIMITED = Counter("pushsvc_rate_limited_total", "Client commands and emits refused by limits")
HANDSHAKES_REJECTED = Counter(
    "pushsvc_handshakes_rejected_total", "WebSocket handshakes refused", ["reason"]
)
PRESENCE_ENTRIES = Gauge(
    "pushsvc_presence_entries",
    "Presence entries this node owns and refreshes (present sessions x presence channels)",
    multiprocess_mode="livesum",
)
JOIN_LEAVE_PUBLISHED = Counter(
    "pushsvc_join_leave_published_total", "join/leave events published by this node", ["event"]
)
AUTH_FAILURES = Counter(
    "pushsvc_auth_failures_total",
    "Tokens and API keys refused (handshake, auth frame, refresh, emit, history) by reason",
    ["reason"],
)
RPC_CALLS = Counter(
    "pushsvc_rpc_calls_total",
    "Client RPC calls by method and outcome (ok, error: the service's Pushsvc-Error, "
    "too_large, timeout, not_found, forbidden, unavailable, limit_exceeded, bad_request); "
    "method is '-' for calls no service took (not_found, forbidden, ...)",
    ["method", "outcome"],
)
RPC_LATENCY = Histogram(
    "pushsvc_rpc_duration_seconds",
    "From a client RPC's request to its service's reply (answered calls), by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_dir() -> str | None:
    """The multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``) or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition() -> tuple[bytes, str]:
    """The metrics of the whole server in the Prometheus text format.

    Returns:
        ``(body, content_type)``. In multiprocess mode the values of every worker,
        aggregated as each metric declares (see the module docs), after removing
        the live-gauge files of workers that have exited.
    """
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess

    reap_dead_workers(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def reap_dead_workers(path: str) -> list[int]:
    """``mark_process_dead`` for every process with live-gauge files that no longer runs.

    uvicorn restarts a crashed worker without telling the application, so the
    check runs at scrape time: a pid whose process is gone (``kill(pid, 0)``
    fails with ``ProcessLookupError``) gets its ``livesum``/``livemin``/... files
    removed. Returns the pids reaped.
    """
    from prometheus_client import multiprocess

    pids = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_FILE.search(name)
        if match:
            pids.add(int(match.group(1)))
    dead = []
    for pid in sorted(pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.append(pid)
        except PermissionError:
            pass  # exists, owned by someone else
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return dead


def mark_self_dead() -> None:
    """Remove this process's live-gauge files (a worker's last act on a clean exit)."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)
