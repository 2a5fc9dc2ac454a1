"""``pushsvc bench --compression both``: uncompressed and compressed runs, side by side.

Against one server started with ``PUSHSVC_COMPRESSION=deflate``: every run uses
the same tokens; a warm-up run with ``--messages 0`` (not counted) puts them in
the server's verified-token cache. Then each of ``--rounds`` rounds runs the
same flags twice, in alternating order (``off`` first in odd rounds, ``deflate``
first in even ones, so a drift in the machine's load hits both alike): clients
that offer nothing (plain frames) and clients that offer permessage-deflate
(RFC 7692; the server compresses each batch once for all of them,
:mod:`pushsvc.ws.deflate`).

Per run: ``wire_bytes_per_delivery`` (WebSocket bytes the clients read from
their sockets after subscribing, frame headers included, TCP/IP headers not,
per delivery), ``server_cpu_us_per_delivery`` (server CPU from the first publish
to the last delivery, microseconds, per delivery; needs ``--server-pid`` or a
loopback ``--url``), latency p50/p99 (ms) and deliveries/s.

Report (``--json``): mode ``"compression"``, clients, channels, messages, size,
rate, via, rounds, server_pid; ``off`` and ``deflate``, each the medians over the
rounds; ``ratio`` (deflate / off) of each; lost, duplicated, errors,
failed_runs, error_samples, ``warmup`` and ``runs`` (per round both reports in
full). Exit status 0 when every run was clean, else 1.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from .coordinator import run_bench
from .report import exit_code
from .tokens import mint_all
from .vsfloor import server_pid

METRICS = (
    ("wire_bytes_per_delivery", "wire B/deliv", 1),
    ("server_cpu_us_per_delivery", "cpu us/deliv", 2),
    ("latency_p50_ms", "p50 ms", 2),
    ("latency_p99_ms", "p99 ms", 2),
    ("deliveries_per_s", "deliveries/s", 0),
)
KINDS = ("off", "deflate")


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "wire_bytes_per_delivery": r.get("wire_bytes_per_delivery"),
        "server_cpu_us_per_delivery": r.get("server_cpu_us_per_delivery"),
        "latency_p50_ms": r["latency_ms"]["p50"],
        "latency_p99_ms": r["latency_ms"]["p99"],
        "deliveries_per_s": r["deliveries_per_s"],
    }


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def _say(cfg: dict[str, Any], text: str) -> None:
    if cfg["progress"]:
        print(f"[compression] {text}", file=sys.stderr, flush=True)


def run_vs_compression(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg["rounds"]`` rounds of uncompressed and compressed clients (module docstring).

    Raises:
        BenchError: a run could not go on (NATS unreachable...).
    """
    pid = server_pid(cfg)
    _say(cfg, f"server pid {pid}" if pid else "server CPU unknown (give --server-pid)")
    tokens = cfg["tokens"] or mint_all(cfg)
    sub = {**cfg, "progress": False, "server_pid": pid, "tokens": tokens}
    warmup = run_bench({**sub, "messages": 0, "compression": "off"})
    runs: list[dict[str, Any]] = []
    for n in range(cfg["rounds"]):
        run: dict[str, Any] = {}
        for kind in KINDS if n % 2 == 0 else KINDS[::-1]:
            report = run_bench({**sub, "compression": kind})
            run[kind] = report
            _say(
                cfg,
                f"round {n + 1}: {kind:<7} {report.get('wire_bytes_per_delivery')} B/delivery, "
                f"{report.get('server_cpu_us_per_delivery')} us CPU/delivery",
            )
        runs.append(run)
    medians = {kind: _median([_row(r[kind]) for r in runs]) for kind in KINDS}
    ratio = {}
    for key, _, _ in METRICS:
        a, b = medians["deflate"][key], medians["off"][key]
        ratio[key] = round(a / b, 3) if a is not None and b else None
    reports = [warmup] + [r[kind] for r in runs for kind in KINDS]
    return {
        "mode": "compression",
        "clients": cfg["clients"],
        "channels": cfg["channels"],
        "messages": cfg["messages"],
        "size": cfg["size"],
        "sample": cfg.get("sample", False),
        "rate": cfg["rate"],
        "via": cfg["via"],
        "rounds": cfg["rounds"],
        "server_pid": pid,
        **medians,
        "ratio": ratio,
        "lost": sum(r["lost"] for r in reports),
        "duplicated": sum(r["duplicated"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "failed_runs": sum(exit_code(r) for r in reports),
        "error_samples": [s for r in reports for s in r["error_samples"]][:10],
        "warmup": warmup,
        "runs": runs,
    }


def vs_compression_exit_code(report: dict[str, Any]) -> int:
    """0 when every run of the report was clean, else 1."""
    return 1 if report["failed_runs"] else 0


def format_vs_compression(r: dict[str, Any]) -> str:
    """The side-by-side text report of :func:`run_vs_compression`."""

    def cell(value: float | None, digits: int, suffix: str = "") -> str:
        return "-" if value is None else f"{value:,.{digits}f}{suffix}"

    rate = f"{r['rate']:g} msg/s" if r["rate"] else "max rate"
    what = "the order-book sample" if r["sample"] else "padded payloads"
    lines = [
        f"pushsvc bench --compression both: {r['clients']} clients, {r['messages']} messages "
        f"x {r['size']} B ({what}) via {r['via']} at {rate}; medians of {r['rounds']} round(s)",
        "  " + f"{'':<9}" + "".join(f"{label:>15}" for _, label, _ in METRICS),
    ]
    for kind in KINDS:
        row = r[kind]
        lines.append(f"  {kind:<9}" + "".join(f"{cell(row[k], d):>15}" for k, _, d in METRICS))
    lines.append(
        f"  {'ratio':<9}" + "".join(f"{cell(r['ratio'][k], 2, 'x'):>15}" for k, _, _ in METRICS)
    )
    if r["server_pid"] is None:
        lines.append("  server CPU: unknown (no --server-pid, and --url is not on loopback)")
    lines.append(
        f"  lost {r['lost']}   duplicated {r['duplicated']}   errors {r['errors']}   "
        f"failed runs {r['failed_runs']}"
    )
    for text in r["error_samples"]:
        lines.append(f"  ! {text}")
    return "\n".join(lines)
