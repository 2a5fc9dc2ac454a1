"""``pushsvc bench --floor``: the fan-out this machine's TCP stack allows, without pushsvc.

A push server's delivery cost has a floor set by the operating system, not by
the server: one ``send()`` per socket per message (a WebSocket frame cannot be
shared between connections), plus, on one host, the receiving process's
``recv()``. This mode measures that floor for the same scenario flags as a real
run (``--clients``, ``--messages``, ``--size``, ``--rate``, ``--procs``), so the
figures of a pushsvc run can be read against it:

- a *floor server* process (uvloop, one core, like one pushsvc worker) accepts
  the clients on a free 127.0.0.1 port and, per message, writes one pre-built
  record to every connection with ``transport.write`` -- exactly what pushsvc's
  direct write path does, minus everything else: no WebSocket handshake or
  framing, no JSON, no NATS, no hub, no sessions;
- each record is as long as the text frame pushsvc sends for a ``--size``
  payload (:data:`FRAME_OVERHEAD` bytes more) and starts with the
  ``time.time_ns()`` of its message (8 bytes, big-endian);
- ``--procs`` client processes (uvloop protocols, no parsing beyond the record
  boundaries) stamp each record on arrival.

Report keys: mode (``"floor"``), clients, messages, size, record_bytes, procs,
deliveries, expected, lost, deliveries_per_s, latency_ms {p50, p90, p99, max},
server_cpu_s, server_cpu_us_per_write, server_user_us_per_write (the rest is
the kernel), generator_cpu_s, elapsed_seconds; with ``--broadcast`` (one record
per round, a second apart) broadcast_ms as a pushsvc run reports it. Every
process is bounded by ``--duration-limit`` and exits by itself.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from typing import Any, NamedTuple

from .report import latency_ms
from .system import cpu_seconds, run_loop, user_seconds

FRAME_OVERHEAD = 60  # bytes a pushsvc message frame adds to the payload (envelope + header)
_STAMP = 8  # bytes of the publish timestamp at the start of each record


class ServerReport(NamedTuple):
    """What the floor server sends back after the last write (CPU in seconds)."""

    cpu_s: float
    user_s: float
    connections: int


class ClientsReport(NamedTuple):
    """What one client process sends back: records received, latencies (``array('q')``
    bytes, nanoseconds), its CPU seconds, the largest latency (ns) and, per message
    index, the latency of its latest delivery (``array('q')`` bytes, ns)."""

    got: int
    lat: bytes
    cpu_s: float
    lat_max: int
    last: bytes


def _server(conn: Any, cfg: dict[str, Any]) -> None:
    """Floor server process: accept, wait for "go", fan out, report CPU seconds."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transports: list[asyncio.Transport] = []
        everyone = asyncio.Event()

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.append(transport)  # type: ignore[arg-type]
                if len(transports) >= cfg["clients"]:
                    everyone.set()

        server = await loop.create_server(Conn, "127.0.0.1", 0, backlog=4096)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)  # "go": every client connected
        with contextlib.suppress(TimeoutError):  # accepted by the kernel, not yet by the loop
            await asyncio.wait_for(everyone.wait(), 10)
        pad = b"x" * (cfg["record"] - _STAMP)
        n, rate = cfg["messages"], cfg["rate"]
        cpu0, user0 = cpu_seconds(), user_seconds()
        start = time.monotonic()
        for i in range(n):
            record = time.time_ns().to_bytes(_STAMP, "big") + pad
            for transport in transports:
                transport.write(record)
            delay = start + (i + 1) / rate - time.monotonic() if rate else 0.0
            await asyncio.sleep(max(0.0, delay))
        conn.send(ServerReport(cpu_seconds() - cpu0, user_seconds() - user0, len(transports)))
        await loop.run_in_executor(None, conn.recv)  # "bye": clients are done
        server.close()

    run_loop(main())


def _clients(conn: Any, cfg: dict[str, Any], count: int, port: int) -> None:
    """One client process: ``count`` connections; stamps records until all arrived."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        record = cfg["record"]
        expected = cfg["messages"] * count
        lat = array.array("q")
        last = array.array("q", bytes(8 * cfg["messages"]))  # per message: latest delivery
        got = [0]
        done = loop.create_future()

        class Client(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = b""
                self.n = 0  # records so far: the next one is message n (TCP keeps the order)

            def data_received(self, data: bytes) -> None:
                now = time.time_ns()
                if self.buf:
                    data = self.buf + data
                usable = len(data) - len(data) % record
                for off in range(0, usable, record):
                    v = now - int.from_bytes(data[off : off + _STAMP], "big")
                    lat.append(v)
                    if self.n < len(last) and v > last[self.n]:
                        last[self.n] = v
                    self.n += 1
                self.buf = data[usable:]
                got[0] += usable // record
                if got[0] >= expected and not done.done():
                    done.set_result(None)

        transports = []
        for _ in range(count):
            transport, _ = await loop.create_connection(Client, "127.0.0.1", port)
            transports.append(transport)
        conn.send("ready")
        if got[0] >= expected:
            done.set_result(None)
        cpu0 = cpu_seconds()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, cfg["duration_limit"])
        conn.send(
            ClientsReport(
                got[0], lat.tobytes(), cpu_seconds() - cpu0, max(lat, default=0), last.tobytes()
            )
        )
        for transport in transports:
            transport.close()

    run_loop(main())


def run_floor(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the floor scenario described by ``cfg`` (the bench's parsed flags).

    Uses ``clients``, ``messages``, ``size`` (payload bytes), ``rate``
    (messages/s, 0 = back to back), ``procs`` and ``duration_limit`` (seconds).

    Returns:
        The report (keys in the module docstring).

    Raises:
        RuntimeError: a process did not start or answer within the time limit.
    """
    ctx = multiprocessing.get_context("fork")
    cfg = {**cfg, "record": max(_STAMP + 1, cfg["size"] + FRAME_OVERHEAD)}
    limit = cfg["duration_limit"]
    server_end, server_conn = ctx.Pipe()
    procs = [ctx.Process(target=_server, args=(server_conn, cfg), daemon=True)]
    procs[0].start()
    try:
        if not server_end.poll(10):
            raise RuntimeError("the floor server did not start")
        port = server_end.recv()
        shares = [len(range(w, cfg["clients"], cfg["procs"])) for w in range(cfg["procs"])]
        ends = []
        for share in shares:
            end, child = ctx.Pipe()
            proc = ctx.Process(target=_clients, args=(child, cfg, share, port), daemon=True)
            proc.start()
            procs.append(proc)
            ends.append(end)
        for end in ends:
            if not end.poll(limit) or end.recv() != "ready":
                raise RuntimeError("floor clients did not connect")
        start = time.monotonic()
        server_end.send("go")
        if not server_end.poll(limit):
            raise RuntimeError("the floor server did not finish")
        server: ServerReport = server_end.recv()
        results: list[ClientsReport] = []
        for end in ends:
            if not end.poll(limit + 5):
                raise RuntimeError("floor clients did not report")
            results.append(end.recv())
        elapsed = time.monotonic() - start
        server_end.send("bye")
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    deliveries = sum(r.got for r in results)
    expected = cfg["messages"] * cfg["clients"]
    writes = cfg["messages"] * server.connections
    latency = latency_ms([{"lat": r.lat, "stride": 1, "lat_max": r.lat_max} for r in results])
    report = {
        "mode": "floor",
        "clients": cfg["clients"],
        "messages": cfg["messages"],
        "size": cfg["size"],
        "record_bytes": cfg["record"],
        "procs": cfg["procs"],
        "deliveries": deliveries,
        "expected": expected,
        "lost": expected - deliveries,
        "deliveries_per_s": round(deliveries / elapsed) if elapsed > 0 else None,
        "latency_ms": latency,
        "server_cpu_s": round(server.cpu_s, 3),
        "server_cpu_us_per_write": round(server.cpu_s / writes * 1e6, 2) if writes else None,
        "server_user_us_per_write": round(server.user_s / writes * 1e6, 2) if writes else None,
        "generator_cpu_s": round(sum(r.cpu_s for r in results), 3),
        "elapsed_seconds": round(elapsed, 3),
    }
    if cfg.get("broadcast"):
        report["broadcast_ms"] = _broadcast_ms([r.last for r in results], latency)
    return report


def _broadcast_ms(lasts: list[bytes], latency: dict[str, float | None]) -> dict[str, Any]:
    """``--broadcast``'s keys, as a pushsvc run reports them (publish -> last delivery)."""
    worst: list[int] = []
    for raw in lasts:
        per = array.array("q")
        per.frombytes(raw)
        worst = [max(a, b) for a, b in zip(worst, per, strict=True)] if worst else list(per)
    ms = [round(v / 1e6, 3) for v in worst if v]
    return {
        "rounds": len(worst),
        "last_p50": round(statistics.median(ms), 3) if ms else None,
        "last_max": max(ms) if ms else None,
        "last": ms,
        "p50": latency["p50"],
        "p99": latency["p99"],
    }


def format_floor(r: dict[str, Any]) -> str:
    """The text report of :func:`run_floor`."""
    lat = r["latency_ms"]
    return "\n".join(
        [
            f"pushsvc bench --floor: raw TCP fan-out on 127.0.0.1, {r['clients']} clients, "
            f"{r['messages']} messages x {r['record_bytes']} B records, {r['procs']} procs",
            f"  deliveries    {r['deliveries']} of {r['expected']}  "
            f"({r['deliveries_per_s'] or 0:,}/s)   lost {r['lost']}",
            f"  latency ms    p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
            f"max {lat['max']}",
            f"  server        cpu {r['server_cpu_s']} s  "
            f"({r['server_cpu_us_per_write']} us per write, {r['server_user_us_per_write']} us "
            "of it in user space; one process)",
            f"  generator cpu {r['generator_cpu_s']} s",
            *_broadcast_line(r.get("broadcast_ms")),
        ]
    )


def _broadcast_line(b: dict[str, Any] | None) -> list[str]:
    if not b:
        return []
    return [
        f"  broadcast     {b['rounds']} round(s): last delivery ms p50 {b['last_p50']}  "
        f"max {b['last_max']}; across connections p50 {b['p50']}  p99 {b['p99']}"
    ]
