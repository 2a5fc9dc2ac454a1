"""``python -m pushsvc.bench.heap``: live heap per idle WebSocket connection, deflate or not.

RSS per connection moves by a couple of KiB between two fresh servers (the
allocator's arenas), more than the difference permessage-deflate makes when no
context is kept (RFC 7692 7.1.1; :mod:`pushsvc.ws.deflate`). ``tracemalloc``
counts live allocations exactly, zlib's included (CPython's zlib allocates
through the traced raw allocator), and they go back down when the connections
close, so one process can measure both kinds in turn:

- a pushsvc server runs in this process (``PUSHSVC_COMPRESSION=deflate``,
  uvicorn with :func:`pushsvc.uvicorn_config`, a bundled nats-server);
- each round runs ``pushsvc bench --clients N --messages 1 --sample --idle S``
  as a child process, with ``--compression off`` and ``--compression deflate``
  in alternating order;
- a warm-up run (``off``, not counted) comes first: first-use costs (caches,
  the handshake path's objects) land in it;
- traced memory is sampled every 0.25 s; the run's figure is the plateau (the
  median of the highest third of the samples, i.e. the idle phase) less the
  traced memory before the run, divided by N: bytes per idle connection. The
  difference deflate - off is also given per round (the two runs of a round
  are next to each other in time).

Tracing slows the server down; the figures are memory, not speed.

Example::

    python -m pushsvc.bench.heap --clients 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tracemalloc
from typing import Any

import uvicorn

from ..app import create_app
from ..config.settings import Settings
from ..server.embedded import EmbeddedNats, free_port
from ..server.serving import uvicorn_config

SECRET = "heap-bench-secret-0123456789abcdef-0123"
SAMPLE_EVERY = 0.25  # seconds between two traced-memory samples
KINDS = ("off", "deflate")


async def _one_run(kind: str, port: int, nats_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``pushsvc bench`` child with ``--compression kind``; its heap per connection (bytes)."""
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushsvc",
        "bench",
        "--compression",
        kind,
        "--sample",
        "--clients",
        str(args.clients),
        "--messages",
        "1",
        "--idle",
        str(args.idle),
        "--procs",
        "1",
        "--url",
        f"http://127.0.0.1:{port}",
        "--nats-url",
        nats_url,
        "--secret",
        SECRET,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    samples: list[int] = []
    reading = asyncio.ensure_future(child.stdout.read())  # type: ignore[union-attr]
    while not reading.done():
        await asyncio.wait([reading], timeout=SAMPLE_EVERY)
        samples.append(tracemalloc.get_traced_memory()[0] - base)
    await child.wait()
    report = json.loads(reading.result() or b"{}")
    top = sorted(samples)[-max(1, len(samples) // 3) :]
    return {
        "kind": kind,
        "bytes_per_connection": round(statistics.median(top) / args.clients),
        "subscribed": report.get("subscribed"),
        "wire_bytes_per_delivery": report.get("wire_bytes_per_delivery"),
        "clean": child.returncode == 0,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rounds (module docstring).

    Returns:
        Per-kind medians (bytes per connection), their difference, every run.
    """
    with EmbeddedNats() as nats:
        port = free_port()
        settings = Settings.load(
            env={},
            jwt_secret=SECRET,
            nats_url=nats.url,
            port=port,
            compression="deflate",
            log_level="warning",
        )
        app = create_app(settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_config(settings))
        server = uvicorn.Server(config)
        serving = asyncio.ensure_future(server.serve())
        for _ in range(200):  # uvicorn has no "started" event to wait on
            if server.started or serving.done():
                break
            await asyncio.sleep(0.05)
        tracemalloc.start()
        runs = []
        try:
            await _one_run("off", port, nats.url, args)  # the warm-up
            for n in range(args.rounds):
                for kind in KINDS if n % 2 == 0 else KINDS[::-1]:
                    run = await _one_run(kind, port, nats.url, args)
                    runs.append(run)
                    print(f"[heap] round {n + 1}: {json.dumps(run)}", file=sys.stderr, flush=True)
        finally:
            tracemalloc.stop()
            server.should_exit = True
            await serving
    medians = {
        kind: statistics.median(r["bytes_per_connection"] for r in runs if r["kind"] == kind)
        for kind in KINDS
    }
    by_round = [runs[k : k + 2] for k in range(0, len(runs), 2)]
    differences = [
        next(r["bytes_per_connection"] for r in pair if r["kind"] == "deflate")
        - next(r["bytes_per_connection"] for r in pair if r["kind"] == "off")
        for pair in by_round
    ]
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "bytes_per_connection": medians,
        "deflate_extra_bytes": medians["deflate"] - medians["off"],
        "deflate_extra_bytes_per_round": differences,
        "clean": all(r["clean"] and r["subscribed"] == args.clients for r in runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print the result (``--json``: one object). Exit 0 when every
    bench child was clean, else 1."""
    parser = argparse.ArgumentParser(prog="python -m pushsvc.bench.heap", description=__doc__)
    parser.add_argument("--clients", type=int, default=2000, help="idle connections (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of off + deflate (default 3)")
    parser.add_argument("--idle", type=float, default=5.0, help="idle seconds per run (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(result))
    else:
        per = result["bytes_per_connection"]
        print(
            f"live heap per idle connection ({args.clients} connections, medians of "
            f"{args.rounds} rounds): off {per['off']:.0f} B, deflate {per['deflate']:.0f} B, "
            f"deflate extra {result['deflate_extra_bytes']:+.0f} B (per round: "
            + ", ".join(f"{d:+.0f} B" for d in result["deflate_extra_bytes_per_round"])
            + ")"
        )
    return 0 if result["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
