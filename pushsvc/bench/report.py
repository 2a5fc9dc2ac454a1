"""The bench's reports: latency percentiles, the exit status and the text forms.

Report keys of a pushsvc run (text and ``--json``) are listed in
:mod:`pushsvc.bench`; the floor's in :mod:`pushsvc.bench.floor`; the
side-by-side ``--vs-floor`` report's in :mod:`pushsvc.bench.vsfloor`.
"""

from __future__ import annotations

import array
from typing import Any


def latency_ms(stats: list[dict[str, Any]]) -> dict[str, float | None]:
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


def exit_code(report: dict[str, Any]) -> int:
    """0 when every client subscribed and got every message exactly once without errors
    and ``--duration-limit`` cut nothing short, else 1."""
    bad = (
        report["failed_clients"]
        or report["lost"]
        or report["duplicated"]
        or report["errors"]
        or report.get("reconnect_errors")
        or report.get("cut")
    )
    return 1 if bad else 0


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report (same values as the JSON one)."""
    lat = r["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"pushsvc bench: {r['clients']} clients on {r['channels']} channel(s), "
        f"{r['messages']} messages x {r['size']} B via {r['via']}"
        + (f", {_posts(r['emit_concurrency'])} in flight" if "emit_concurrency" in r else "")
        + f", {r['procs']} procs, tokens from {'/dev/token' if r['tokens'] == 'dev' else 'secret'}",
        f"  connect       {r['connect_seconds']:.3f} s  ({r['connect_rate']:.0f} conn/s, "
        f"{r['subscribed']}/{r['clients']} subscribed)",
        f"  publish       {r['publish_seconds']:.3f} s  ({r['published']} published, "
        f"{r['publish_errors']} errors"
        + (f", {r['publish_throttled']} retried after 429" if r["publish_throttled"] else "")
        + ")",
        f"  deliveries    {r['deliveries']} of {r['expected']} expected  "
        f"({r['deliveries_per_s']:,.0f}/s, {r['frames']} frames)",
        f"  wire          {r.get('wire_bytes', 0):,} B read after subscribing, "
        f"{r.get('wire_bytes_per_delivery') or 0:,.1f} B per delivery "
        f"(compression {r.get('compression', 'off')})",
        f"  latency ms    p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
        f"max {ms(lat['max'])}",
        *_hop_line(r.get("nats_hop_ms")),
        f"  lost          {r['lost']}   duplicated {r['duplicated']}   errors {r['errors']}"
        + (f"   (run cut by --duration-limit: {r['cut']})" if r.get("cut") else ""),
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
        per = []
        if "server_cpu_ms_per_connection" in r:
            per.append(f"{r['server_cpu_ms_per_connection']:.3f} ms per connection")
        if "server_cpu_us_per_frame" in r:
            per.append(f"{r['server_cpu_us_per_frame']:.2f} us per frame delivering")
        if "server_cpu_us_per_delivery" in r:
            per.append(f"{r['server_cpu_us_per_delivery']:.2f} us per delivery")
        if "server_cpu_ms_per_reconnect" in r:
            per.append(f"{r['server_cpu_ms_per_reconnect']:.3f} ms per reconnect")
        if per:
            lines.append(f"  server cpu    {', '.join(per)}")
    lines.extend(_idle_lines(r))
    if "broadcast_ms" in r:
        b = r["broadcast_ms"]
        cpu = ""
        if "server_cpu_ms_per_broadcast" in r:
            cpu = f"; server cpu {r['server_cpu_ms_per_broadcast']:.1f} ms per round"
            if "server_cpu_ms_per_broadcast_net" in r:
                cpu += f" ({r['server_cpu_ms_per_broadcast_net']:.1f} ms less idle)"
        lines.append(
            f"  broadcast     {b['rounds']} round(s): last delivery ms p50 {ms(b['last_p50'])}  "
            f"max {ms(b['last_max'])}; across connections p50 {ms(b['p50'])}  "
            f"p99 {ms(b['p99'])}{cpu}"
        )
    if "reconnect_seconds" in r:
        lines.append(
            f"  reconnect     {_secs(r['reconnect_seconds'])}  ({r['reconnected']} ok, "
            f"{r['reconnect_errors']} errors)"
        )
    if "churned" in r:
        samples = r["soak_samples"]
        line = f"  churn         {r['churned']} reconnected and resumed, {r['churn_failed']} failed"
        if samples:
            rss = [x["rss_mib"] for x in samples]
            fds = [x["fds"] for x in samples]
            line += (
                f"; server RSS MiB {rss[0]} -> {rss[-1]} (min {min(rss)}, max {max(rss)}), "
                f"open files {fds[0]} -> {fds[-1]} (max {max(fds)}), {len(samples)} samples"
            )
        lines.append(line)
    if "stalled_closed_codes" in r:
        lines.append(
            f"  stalled       closed {_codes(r['stalled_closed_codes'])}, "
            f"still open {r['stalled_open']}"
        )
    for text in r["error_samples"] + r.get("reconnect_error_samples", []):
        lines.append(f"  ! {text}")
    return "\n".join(lines)


def _idle_lines(r: dict[str, Any]) -> list[str]:
    if "idle_seconds" not in r:
        return []
    beats = r["idle_heartbeats"]
    line = (
        f"  idle          {r['idle_seconds']:.1f} s: heartbeats {beats['app']} ping frames + "
        f"{beats['protocol']} protocol pings ({beats['per_connection']:.2f} per connection)"
    )
    if "server_idle_cpu_pct" in r:
        line += f"; server cpu {r['server_idle_cpu_pct']:.2f}% of a core"
        if "server_idle_us_per_heartbeat" in r:
            line += f" ({r['server_idle_us_per_heartbeat']:.1f} us per heartbeat)"
        line += f", rss {r['server_idle_rss_mib']:.1f} MiB"
        if "server_idle_rss_per_conn_kib" in r:
            line += f" ({r['server_idle_rss_per_conn_kib']:.2f} KiB/conn)"
    return [line]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in codes.items()) or "none"


def _posts(n: int) -> str:
    return "1 POST" if n == 1 else f"{n} POSTs"


def _hop_line(hop: dict[str, Any] | None) -> list[str]:
    if not hop:
        return []
    return [
        f"  nats hop ms   p50 {hop['p50']:.2f}  p99 {hop['p99']:.2f}  (publish -> a NATS "
        f"subscriber of {hop['subject']}: included in the latency above)"
    ]
