"""``pushsvc bench --vs-floor``: the floor and pushsvc with the same flags, side by side.

Every run uses the same tokens (minted or fetched once). A warm-up pushsvc run
with ``--messages 0`` comes first, not counted in the medians: it puts every
token in the server's verified-token cache, so all measured runs meet it alike,
and gives the CPU of a token's first connection (JWT verification included).
Then each of ``--rounds`` rounds runs, in alternating order (floor first in odd
rounds, pushsvc first in even ones, so a drift in the machine's load hits both
alike):

- the floor (:mod:`pushsvc.bench.floor`) with the run's flags;
- pushsvc at ``--url`` with ``--messages 0`` (handshake only: connect, auth,
  subscribe, close), to measure the server's CPU per connection;
- pushsvc at ``--url`` with the run's flags.

Server CPU comes from /proc for ``--server-pid`` or, for a loopback ``--url``,
the process listening on its port (found by :func:`system.listening_pid`). A
pushsvc frame's CPU is (CPU of the full run - CPU of the handshake-only run) /
frames, so the handshakes are taken out; the floor's is measured around its
fan-out loop only (it has no handshake).

Report (``--json``): mode ``"vs-floor"``, clients, channels, messages, size,
rate, via, rounds, server_pid; ``floor`` and ``pushsvc``, each the medians over
the rounds of latency_p50_ms, latency_p99_ms, cpu_us_per_frame,
cpu_us_per_delivery (microseconds of server CPU), deliveries_per_s (and for
pushsvc cpu_ms_per_connection, milliseconds, cpu_ms_per_first_connection
from the warm-up, and with ``--via nats --rate`` nats_hop_p50_ms and
nats_hop_p99_ms: the NATS part of its latency, which the floor does not pay,
see :class:`~pushsvc.bench.hop.HopProbe`); ``ratio``, pushsvc / floor for
each of the five; lost,
duplicated, errors, failed_runs (over every run), error_samples, ``warmup``
(its report) and ``runs``, one entry per round with the ``floor``,
``handshake`` (None without a server pid) and ``pushsvc`` reports in full.

Exit status: 0 when every run was clean (the usual bench rules: every client
subscribed, every message exactly once, no error; the floor lost nothing), else 1.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from .coordinator import run_bench
from .floor import run_floor
from .report import exit_code
from .system import listening_pid
from .tokens import mint_all

METRICS = (
    ("latency_p50_ms", "p50 ms", 2),
    ("latency_p99_ms", "p99 ms", 2),
    ("cpu_us_per_frame", "cpu us/frame", 2),
    ("cpu_us_per_delivery", "cpu us/deliv", 2),
    ("deliveries_per_s", "deliveries/s", 0),
)
LOOPBACK = ("localhost", "::1")


def server_pid(cfg: dict[str, Any]) -> int | None:
    """``--server-pid``, else the pid listening on a loopback ``--url``'s port, else None."""
    if cfg["server_pid"]:
        return cfg["server_pid"]
    host = cfg["host"]
    if host in LOOPBACK or host.startswith("127."):
        return listening_pid(cfg["port"])
    return None


def _floor_row(r: dict[str, Any]) -> dict[str, Any]:
    cpu = r["server_cpu_us_per_write"]
    return {
        "latency_p50_ms": r["latency_ms"]["p50"],
        "latency_p99_ms": r["latency_ms"]["p99"],
        "cpu_us_per_frame": cpu,
        "cpu_us_per_delivery": cpu,  # one write per delivery: nothing to coalesce
        "deliveries_per_s": r["deliveries_per_s"],
    }


def _pushsvc_row(r: dict[str, Any], handshake: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "latency_p50_ms": r["latency_ms"]["p50"],
        "latency_p99_ms": r["latency_ms"]["p99"],
        "cpu_us_per_frame": None,
        "cpu_us_per_delivery": None,
        "deliveries_per_s": r["deliveries_per_s"],
        "cpu_ms_per_connection": None,
        "nats_hop_p50_ms": (r.get("nats_hop_ms") or {}).get("p50"),
        "nats_hop_p99_ms": (r.get("nats_hop_ms") or {}).get("p99"),
    }
    if handshake is None or "server_cpu_s" not in r or "server_cpu_s" not in handshake:
        return row
    conns = handshake["subscribed"]
    if conns:
        row["cpu_ms_per_connection"] = round(handshake["server_cpu_s"] / conns * 1e3, 3)
    net = max(0.0, r["server_cpu_s"] - handshake["server_cpu_s"])
    if r["frames"]:
        row["cpu_us_per_frame"] = round(net / r["frames"] * 1e6, 2)
    if r["deliveries"]:
        row["cpu_us_per_delivery"] = round(net / r["deliveries"] * 1e6, 2)
    return row


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def _say(cfg: dict[str, Any], text: str) -> None:
    if cfg["progress"]:
        print(f"[vs-floor] {text}", file=sys.stderr, flush=True)


def run_vs_floor(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg["rounds"]`` rounds of floor and pushsvc; returns the report (module docstring).

    Raises:
        BenchError: a pushsvc run could not go on (NATS unreachable...).
        RuntimeError: a floor process did not start or answer in time.
    """
    pid = server_pid(cfg)
    _say(cfg, f"server pid {pid}" if pid else "server CPU unknown (give --server-pid)")
    tokens = cfg["tokens"] or mint_all(cfg)  # the same tokens in every run
    sub = {**cfg, "progress": False, "server_pid": pid, "vs_floor": False, "tokens": tokens}
    # warm-up, not counted: every measured run then finds its tokens in the server's
    # verified-token cache, and this run gives the CPU of first connections
    warmup = run_bench({**sub, "messages": 0})
    first = None
    if "server_cpu_s" in warmup and warmup["subscribed"]:
        first = round(warmup["server_cpu_s"] / warmup["subscribed"] * 1e3, 3)
    runs: list[dict[str, Any]] = []
    for n in range(cfg["rounds"]):
        run: dict[str, Any] = {}
        order = ("floor", "pushsvc") if n % 2 == 0 else ("pushsvc", "floor")
        for kind in order:
            if kind == "floor":
                run["floor"] = run_floor(sub)
                lat = run["floor"]["latency_ms"]
                _say(cfg, f"round {n + 1}: floor   p50 {lat['p50']} p99 {lat['p99']} ms")
                continue
            run["handshake"] = run_bench({**sub, "messages": 0}) if pid else None
            run["pushsvc"] = run_bench(sub)
            lat = run["pushsvc"]["latency_ms"]
            _say(cfg, f"round {n + 1}: pushsvc p50 {lat['p50']} p99 {lat['p99']} ms")
        runs.append(run)
    floor = _median([_floor_row(r["floor"]) for r in runs])
    pushsvc = _median([_pushsvc_row(r["pushsvc"], r["handshake"]) for r in runs])
    pushsvc["cpu_ms_per_first_connection"] = first
    ratio = {}
    for key, _, _ in METRICS:
        a, b = pushsvc[key], floor[key]
        ratio[key] = round(a / b, 2) if a is not None and b else None
    reports = [warmup] + [r["pushsvc"] for r in runs]
    reports += [r["handshake"] for r in runs if r["handshake"]]
    return {
        "mode": "vs-floor",
        "clients": cfg["clients"],
        "channels": cfg["channels"],
        "messages": cfg["messages"],
        "size": cfg["size"],
        "rate": cfg["rate"],
        "via": cfg["via"],
        "rounds": cfg["rounds"],
        "server_pid": pid,
        "floor": floor,
        "pushsvc": pushsvc,
        "ratio": ratio,
        "lost": sum(r["lost"] for r in reports) + sum(r["floor"]["lost"] for r in runs),
        "duplicated": sum(r["duplicated"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "failed_runs": sum(exit_code(r) for r in reports)
        + sum(1 for r in runs if r["floor"]["lost"]),
        "error_samples": [s for r in reports for s in r["error_samples"]][:10],
        "warmup": warmup,
        "runs": runs,
    }


def vs_floor_exit_code(report: dict[str, Any]) -> int:
    """0 when every floor and pushsvc run of the report was clean, else 1."""
    return 1 if report["failed_runs"] else 0


def format_vs_floor(r: dict[str, Any]) -> str:
    """The side-by-side text report of :func:`run_vs_floor`."""

    def cell(value: float | None, digits: int, suffix: str = "") -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}{suffix}"

    rate = f"{r['rate']:g} msg/s" if r["rate"] else "max rate"
    lines = [
        f"pushsvc bench --vs-floor: {r['clients']} clients, {r['messages']} messages x "
        f"{r['size']} B via {r['via']} at {rate}; medians of {r['rounds']} round(s)",
        "  " + f"{'':<9}" + "".join(f"{label:>15}" for _, label, _ in METRICS),
    ]
    for name in ("floor", "pushsvc"):
        row = r[name]
        lines.append(f"  {name:<9}" + "".join(f"{cell(row[k], d):>15}" for k, _, d in METRICS))
    lines.append(
        f"  {'ratio':<9}" + "".join(f"{cell(r['ratio'][k], 2, 'x'):>15}" for k, _, _ in METRICS)
    )
    conn = r["pushsvc"]["cpu_ms_per_connection"]
    if r["server_pid"] is None:
        lines.append("  server CPU: unknown (no --server-pid, and --url is not on loopback)")
    else:
        first = r["pushsvc"]["cpu_ms_per_first_connection"]
        lines.append(
            f"  server pid {r['server_pid']}: {cell(conn, 3)} ms CPU per connection "
            f"({cell(first, 3)} ms for a token's first), handshake + auth + subscribe + close,"
        )
        lines.append("    from --messages 0 runs; taken out of the cpu columns above")
    hop = r["pushsvc"].get("nats_hop_p50_ms")
    if hop is not None and r["floor"]["latency_p50_ms"]:
        net = r["pushsvc"]["latency_p50_ms"] - hop
        lines.append(
            f"  nats hop: p50 {hop:.2f} ms, p99 {r['pushsvc']['nats_hop_p99_ms']:.2f} ms "
            "(publish -> a plain NATS subscriber; the floor has no NATS); pushsvc p50 less "
            f"the hop: {net:.2f} ms, {net / r['floor']['latency_p50_ms']:.2f}x the floor's"
        )
    lines.append(
        f"  lost {r['lost']}   duplicated {r['duplicated']}   errors {r['errors']}   "
        f"failed runs {r['failed_runs']}"
    )
    for text in r["error_samples"]:
        lines.append(f"  ! {text}")
    return "\n".join(lines)
