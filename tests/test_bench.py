"""``pushsvc bench`` end to end: the load generator against a real server and NATS.

Most tests run ``python -m pushsvc bench --json`` as a subprocess (the server under
test runs in the test's event loop, so the bench must not block it) and check
what a user reads in the report and the exit status:

- every delivery counted exactly once: a small burst, two worker processes,
  frames with 16- and 64-bit WebSocket length headers;
- the same through :class:`SplittingProxy`, which cuts the server's byte stream
  inside every frame header and payload, so the bench's own frame splitter
  (``pushsvc.bench.client.Client._raw_received``) sees headers and payloads across TCP reads;
- per-channel expectations (each client only gets its channel's messages);
- clients answer the server's heartbeat pings during a run (else it closes them);
- ``--reconnect`` brings every client back, and ``--server-pid`` splits the
  server's CPU by phase (connect, delivery, reconnect);
- rejected arguments exit 2 with the reason on stderr (two through the real command,
  the full list in process through :func:`pushsvc.cli.main`, to save start-ups);
- clients that cannot authenticate (wrong secret) exit 1 with a report saying so;
- ``--via emit --emit-concurrency N``: N POST connections, at most N POSTs in flight
  (1: one at a time), seen by :class:`CountingProxy`;
- without a secret, tokens come from a dev server's ``/dev/token``; a server not in
  dev mode, or none at all, is a clear exit 2;
- ``--vs-floor`` prints the floor, pushsvc and ratio rows, and exits 1 when a run fails;
- README's "Measure it" commands run as written against ``pushsvc serve --dev``;
- the client's accounting, fed frames directly: early, duplicate and batched
  messages each count once, whether the inline common read or the general path saw them.

No assertions on timing or on how much the server batches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import SECRET
from helpers import node_env
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from pushsvc import Settings
from pushsvc.bench import add_arguments
from pushsvc.bench.client import Client, Tally
from pushsvc.cli import main as cli_main
from pushsvc.server.embedded import free_port

PUSHSVC = [sys.executable, "-m", "pushsvc"]
RUN_TIMEOUT = 60  # seconds; the bench caps itself at --duration-limit (30) + a few


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}


async def bench(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``pushsvc bench *args`` (``env``: extra variables); returns (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *PUSHSVC,
        "bench",
        *args,
        env={**clean_env(), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_bench(
    srv: Any,
    nats_url: str,
    *args: str,
    secret: str | None = SECRET,
    procs: int = 1,
    url: str | None = None,
) -> tuple[int, dict[str, Any], str]:
    """Run the bench against ``srv`` with ``--json``; returns (status, report, stderr).

    ``secret=None`` gives no ``--secret`` (tokens then come from ``/dev/token``).
    """
    code, out, err = await bench(
        "--url",
        url or srv.base,
        "--nats-url",
        nats_url,
        "--prefix",
        srv.settings.subject_prefix,
        *(["--secret", secret] if secret is not None else []),
        "--json",
        "--procs",
        str(procs),
        "--timeout",
        "5",
        "--duration-limit",
        "30",
        *args,
    )
    assert out.strip(), f"no report on stdout (status {code}); stderr:\n{err}"
    return code, json.loads(out), err


def assert_clean(code: int, report: dict[str, Any], err: str, expected: int) -> None:
    """Every client subscribed and got each of its messages exactly once, without errors."""
    context = f"status {code}, report {report}, stderr {err}"
    assert report["failed_clients"] == 0, context
    assert report["cut"] is None, context
    assert report["subscribed"] == report["clients"], context
    assert report["published"] == report["messages"], context
    assert report["expected"] == expected, context
    assert report["unique"] == expected, context
    assert report["deliveries"] == expected, context
    assert report["lost"] == 0, context
    assert report["duplicated"] == 0, context
    assert report["errors"] == 0, context
    assert report["error_samples"] == [], context
    assert report["closes"] == {}, context
    assert 1 <= report["frames"] <= report["deliveries"], context
    assert code == 0, context


class _Proxy:
    """A loopback TCP proxy to ``target_port``: each accepted connection is piped by
    :meth:`_relay` (subclasses), tracked so ``async with`` exit cancels it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.peers: set[str] = set()  # client addresses seen

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.peers.add(c_writer.get_extra_info("peername")[0])
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await self._relay(c_reader, c_writer, s_reader, s_writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            c_writer.close()

    async def _relay(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        s_reader: asyncio.StreamReader,
        s_writer: asyncio.StreamWriter,
    ) -> None:
        raise NotImplementedError


class SplittingProxy(_Proxy):
    """A TCP proxy to the server that cuts the server-to-client stream in awkward places.

    The HTTP handshake response goes through whole. After it, the proxy reads the
    server's WebSocket frame headers and cuts the stream 1, 3 and 7 bytes into
    every frame (inside 2-, 4- and 10-byte headers) and halfway through its
    payload, the last piece of a frame also carrying the start of the next one when
    the server already sent it. Pieces are written a few milliseconds apart, so the
    client reads them separately. Client-to-server bytes pass unchanged.
    """

    GAP = 0.003  # seconds between pieces

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.pieces = 0  # server-to-client writes

    async def _relay(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        s_reader: asyncio.StreamReader,
        s_writer: asyncio.StreamWriter,
    ) -> None:
        await asyncio.gather(self._forward(c_reader, s_writer), self._split(s_reader, c_writer))

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _split(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        sent = 0  # bytes of buf written to the client
        frame_at = -1  # offset of the next frame header in buf (-1: still in the handshake)
        cuts: list[int] = []
        try:
            while data := await reader.read(65536):
                buf += data
                if frame_at < 0:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    frame_at = end + 4
                    cuts.append(frame_at)
                while (parsed := _frame_header(buf, frame_at)) is not None:
                    head, length = parsed
                    cuts += [frame_at + k for k in (1, 3, 7, head + length // 2)]
                    frame_at += head + length
                cuts = sorted({c for c in cuts if c > sent})
                for cut in [c for c in cuts if c <= len(buf)] + [len(buf)]:
                    if cut > sent:
                        writer.write(bytes(buf[sent:cut]))
                        await writer.drain()
                        self.pieces += 1
                        sent = cut
                        await asyncio.sleep(self.GAP)
        except OSError:
            pass
        finally:
            writer.close()


def _frame_header(buf: bytearray, at: int) -> tuple[int, int] | None:
    """(header length, payload length) of the unmasked frame at ``at``, None if incomplete."""
    if len(buf) - at < 2:
        return None
    length = buf[at + 1] & 0x7F
    if length == 126:
        if len(buf) - at < 4:
            return None
        return 4, int.from_bytes(buf[at + 2 : at + 4], "big")
    if length == 127:
        if len(buf) - at < 10:
            return None
        return 10, int.from_bytes(buf[at + 2 : at + 10], "big")
    return 2, length


# ------------------------------------------------------------------------ deliveries


async def test_small_burst_every_delivery_once(start_server, nats_url):
    srv = await start_server()
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "20", "--messages", "200", "--size", "100"
    )
    assert_clean(code, report, err, expected=20 * 200)
    assert report["clients"] == 20
    assert report["channels"] == 1
    assert report["via"] == "nats"
    assert report["procs"] == 1
    lat = report["latency_ms"]
    assert lat["p50"] is not None
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


async def test_two_worker_processes(start_server, nats_url):
    srv = await start_server()
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "10", "--messages", "50", procs=2
    )
    assert report["procs"] == 2
    assert_clean(code, report, err, expected=10 * 50)


LARGE = pytest.mark.parametrize(
    ("clients", "messages", "size"),
    [
        (4, 50, 300),  # frames of 126..65535 bytes: 16-bit length headers
        (3, 5, 70_000),  # one message per frame, over 65535 bytes: 64-bit length headers
    ],
    ids=["16-bit-length", "64-bit-length"],
)


@LARGE
async def test_large_frames_counted_once(start_server, nats_url, clients, messages, size):
    srv = await start_server()
    code, report, err = await run_bench(
        srv, nats_url, "--clients", str(clients), "--messages", str(messages), "--size", str(size)
    )
    assert report["size"] == size
    assert_clean(code, report, err, expected=clients * messages)


@LARGE
async def test_frames_split_across_reads(start_server, nats_url, clients, messages, size):
    srv = await start_server()
    async with SplittingProxy(srv.settings.port) as proxy:
        code, report, err = await run_bench(
            srv,
            nats_url,
            "--clients",
            str(clients),
            "--messages",
            str(messages),
            "--size",
            str(size),
            url=f"http://127.0.0.1:{proxy.port}{srv.settings.base_path}",
        )
    assert_clean(code, report, err, expected=clients * messages)
    # per client at least: welcome and subscribed (4 pieces each), one data frame (4)
    assert proxy.pieces >= clients * 12


async def test_channels_each_client_gets_its_own(start_server, nats_url):
    srv = await start_server()
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "12", "--channels", "3", "--messages", "30"
    )
    assert report["channels"] == 3
    # 4 clients per channel, 10 messages per channel; a message of another channel
    # would be an error ("does not belong to bench.N")
    assert_clean(code, report, err, expected=12 * 10)


async def test_uneven_channels(start_server, nats_url):
    srv = await start_server()
    # channels 0, 1, 2 get messages 4, 3, 3; clients 0..6 sit on channels 0,1,2,0,1,2,0
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "7", "--channels", "3", "--messages", "10"
    )
    assert_clean(code, report, err, expected=3 * 4 + 2 * 3 + 2 * 3)


async def test_clients_answer_heartbeats(start_server, nats_url):
    # the server pings every 0.1 s and closes a client that has not answered in 0.3 s;
    # --rate keeps the run going ~1.5 s, so every client must pong many times mid-run
    srv = await start_server(ping_interval=0.1, pong_timeout=0.3)
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "4", "--messages", "15", "--rate", "10"
    )
    assert_clean(code, report, err, expected=4 * 15)
    # a paced --via nats run also reports the NATS hop, from every message, on the
    # subject the server reads (history on: the stream's RePublish destination)
    hop = report["nats_hop_ms"]
    assert hop["subject"] == f"{srv.settings.subject_prefix}-live.bench.>", hop
    assert hop["messages"] == 15 and 0 < hop["p50"] <= hop["p99"], hop


async def test_reconnect_and_server_cpu_figures(start_server, nats_url):
    # the server runs in this process: --server-pid is ours (the bench leaves itself out)
    srv = await start_server()
    code, report, err = await run_bench(
        srv,
        nats_url,
        "--clients",
        "20",
        "--messages",
        "20",
        "--reconnect",
        "--server-pid",
        str(os.getpid()),
    )
    assert_clean(code, report, err, expected=20 * 20)
    assert report["reconnected"] == 20 and report["reconnect_errors"] == 0, report
    # CPU split by phase: connect, delivery window, reconnect (10 ms /proc ticks: >= 0)
    for key in ("server_cpu_ms_per_connection", "server_cpu_us_per_frame"):
        assert report[key] >= 0, report
    assert report["server_cpu_ms_per_reconnect"] >= 0, report
    assert report["server_cpu_s"] >= report["server_cpu_ms_per_connection"] * 20 / 1e3, report


async def test_churn_reconnects_clients_that_resume_with_nothing_lost(start_server, nats_url):
    # the soak's churn on a small scale: 100 % per minute is 10 % every 6 s; each
    # churned client subscribes with since = its last seq and the replay fills the gap
    srv = await start_server()
    code, report, err = await run_bench(
        srv,
        nats_url,
        "--clients",
        "20",
        "--rate",
        "50",
        "--messages",
        "350",
        "--churn",
        "100",
        "--server-pid",
        str(os.getpid()),
    )
    assert_clean(code, report, err, expected=20 * 350)  # none lost, none twice
    assert report["churned"] >= 2 and report["churn_failed"] == 0, report  # 2 per 6 s tick
    assert [set(x) for x in report["soak_samples"]] == [{"t", "rss_mib", "fds"}], report


async def test_a_run_the_duration_limit_cuts_is_reported_cut_not_lost(start_server, nats_url):
    # 1000 messages at 10/s cannot be published in 4 s: the report says the limit cut
    # the publish, and what was published still arrived (a short wait for it)
    srv = await start_server()
    code, report, err = await run_bench(
        srv,
        nats_url,
        "--clients",
        "5",
        "--rate",
        "10",
        "--messages",
        "1000",
        "--duration-limit",
        "4",
    )
    assert code == 1, err
    assert report["cut"] == "publish", report
    assert 0 < report["published"] < 1000, report
    assert report["expected"] == 5 * report["published"], report
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["errors"] == 0, report


async def test_source_addresses_idle_and_broadcast(start_server, nats_url):
    # the capacity run's flags on a small scale: clients from three loopback addresses,
    # a quiet second in which only heartbeats flow, then two broadcast rounds
    srv = await start_server(ping_interval=0.2)
    async with CountingProxy(srv.settings.port) as proxy:
        code, report, err = await run_bench(
            srv,
            nats_url,
            "--clients",
            "6",
            "--source-addresses",
            "3",
            "--idle",
            "1",
            "--broadcast",
            "2",
            "--server-pid",
            str(os.getpid()),
            procs=2,
            url=f"http://127.0.0.1:{proxy.port}{srv.settings.base_path}",
        )
    assert_clean(code, report, err, expected=6 * 2)
    assert proxy.peers == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}, proxy.peers
    # idle: every connection answered its pushsvc pings (one per 0.2 s), nothing lost
    assert 0.9 <= report["idle_seconds"] < 3, report
    beats = report["idle_heartbeats"]
    assert beats["app"] >= 6 * 2 and beats["per_connection"] >= 2, report
    assert report["server_idle_cpu_pct"] >= 0 and report["server_idle_rss_mib"] > 0, report
    # broadcast: one message per round to all six, publish -> last delivery per round
    b = report["broadcast_ms"]
    assert b["rounds"] == 2 and len(b["last"]) == 2, report
    assert 0 < b["p50"] <= b["p99"] <= b["last_max"], report
    assert report["messages"] == 2 and report["nats_hop_ms"]["messages"] == 2, report


# ---------------------------------------------------------------------------- errors


BAD_ARGUMENTS = [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--compression", "deflate", "--transport", "sse"], "--compression applies to WebSocket"),
    (["--compression", "both", "--vs-floor"], "--compression both compares plain runs"),
    (["--channels", "0"], "--channels must be >= 1"),
    (["--messages", "-1"], "--messages must be >= 0"),
    (["--size", "2000000"], "--size must be <= 1048576"),
    (["--rate", "-1"], "--rate must be >= 0"),
    (["--connect-rate", "-5"], "--connect-rate must be >= 0"),
    (["--churn", "150", "--rate", "10"], "--churn must be a percentage"),
    (["--churn", "1"], "--churn needs --rate > 0"),
    (["--timeout", "0"], "--timeout and --duration-limit must be > 0"),
    (["--duration-limit", "-1"], "--timeout and --duration-limit must be > 0"),
    (["--procs", "0"], "--procs must be >= 1"),
    (["--prefix", "a.b"], "--prefix must be one NATS token"),
    (["--url", "ftp://example.com"], "--url must be http(s)://host:port"),
    (["--url", "http://127.0.0.1:99999"], "bad port in --url"),
    (["--url", "http://127.0.0.1:0"], "bad port in --url"),
    (["--emit-concurrency", "0"], "--emit-concurrency must be >= 1"),
    (["--vs-floor", "--rounds", "0"], "--rounds must be >= 1"),
    (["--vs-floor", "--reconnect"], "--vs-floor compares plain runs"),
    (["--vs-floor", "--stall", "2"], "--vs-floor compares plain runs"),
    (["--source-addresses", "0"], "--source-addresses must be 1..65536"),
    (["--source-addresses", "2", "--url", "http://localhost:8000"], "needs a 127.x.y.z --url"),
    (["--idle", "-1"], "--idle must be >= 0"),
    (["--broadcast", "--messages", "5"], "drop --messages"),
    (["--broadcast", "2", "--channels", "2"], "--broadcast needs --channels 1"),
    (["--broadcast", "--via", "emit"], "--broadcast needs --channels 1 and --via nats"),
    (["--broadcast", "--rate", "5"], "drop --rate"),
    (["--broadcast", "-1"], "--broadcast must be >= 0 rounds"),
]


async def test_bad_arguments_exit_2_from_the_command():
    # arguments are checked before any connection: nothing listens on the default URL
    runs = await asyncio.gather(
        bench("--secret", SECRET, "--json", "--clients", "0"),
        bench("--secret", SECRET, "--json", "--clients", "many"),  # argparse's own error
    )
    for (code, out, err), reason in zip(
        runs, ["--clients must be >= 1", "invalid int"], strict=True
    ):
        assert code == 2, (out, err)
        assert out == ""
        assert reason in err, err
        assert "Traceback" not in err, err


@pytest.mark.parametrize(
    ("args", "reason"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_exit_2(args, reason, monkeypatch, capsys):
    # in process (each case would cost a Python start-up): the ``pushsvc`` entry point
    for name in list(os.environ):
        if name.startswith("PUSHSVC_"):
            monkeypatch.delenv(name)
    code = cli_main(["bench", "--secret", SECRET, "--json", *args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("pushsvc bench: "), err
    assert reason in err, err


async def test_wrong_secret_clients_fail(start_server, nats_url):
    srv = await start_server()
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "3", "--messages", "1", secret="not-" + SECRET
    )
    context = f"status {code}, report {report}, stderr {err}"
    assert code == 1, context
    assert report["subscribed"] == 0, context
    assert report["failed_clients"] == 3, context
    assert report["published"] == 0, context
    assert report["expected"] == 0, context
    assert report["deliveries"] == 0, context
    assert report["lost"] == 0, context  # nothing was expected: the failure is the clients
    # the server closes a bad token with 4001 (docs/protocol.md)
    assert report["closes"] == {"4001": 3}, context
    # three setup failures plus "nothing published"
    assert report["errors"] == 4, context
    samples = report["error_samples"]
    assert sum("setup failed" in s and "4001" in s for s in samples) == 3, context
    assert any("nothing published" in s for s in samples), context


# --------------------------------------------------------------------------- floor


async def test_floor_measures_raw_fan_out_without_a_server():
    # no secret, no pushsvc, no NATS: the built-in raw server on a free loopback port
    code, out, err = await bench(
        "--floor", "--clients", "30", "--messages", "20", "--size", "100", "--procs", "2", "--json"
    )
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["mode"] == "floor"
    assert report["deliveries"] == report["expected"] == 30 * 20
    assert report["lost"] == 0
    assert report["record_bytes"] == 100 + 60  # the size of pushsvc's frame for that payload
    assert report["server_cpu_us_per_write"] > 0
    lat = report["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


async def test_floor_broadcast_reports_the_last_delivery_per_round():
    # the same --broadcast keys as a pushsvc run, for a side-by-side reading
    code, out, err = await bench("--floor", "--clients", "10", "--broadcast", "2", "--json")
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["messages"] == 2 and report["deliveries"] == 20, report
    b = report["broadcast_ms"]
    assert b["rounds"] == 2 and len(b["last"]) == 2, report
    assert 0 < b["p50"] <= b["p99"] <= b["last_max"] == report["latency_ms"]["max"], report


# ----------------------------------------------------------------------------- emit


class CountingProxy(_Proxy):
    """A TCP proxy to the server that watches the HTTP POSTs going through it.

    A connection whose first bytes are ``POST`` is an emit connection. A POST is
    in flight from its first request bytes to the first bytes of its answer;
    ``max_in_flight`` is the most POSTs in flight at once over all connections.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.post_connections = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def _relay(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        s_reader: asyncio.StreamReader,
        s_writer: asyncio.StreamWriter,
    ) -> None:
        state = {"post": None, "busy": False}
        await asyncio.gather(
            self._pipe(c_reader, s_writer, state, upstream=True),
            self._pipe(s_reader, c_writer, state, upstream=False),
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: dict[str, Any],
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and state["post"] is None:
                    state["post"] = data.startswith(b"POST ")
                    self.post_connections += state["post"]
                if state["post"]:
                    if upstream and not state["busy"]:
                        state["busy"] = True
                        self.in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    elif not upstream and state["busy"]:
                        state["busy"] = False
                        self.in_flight -= 1
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_emit_concurrency(start_server, nats_url, concurrency):
    # --emit-concurrency 1 is the serial pattern: one POST at a time, the next after the 202
    srv = await start_server()
    async with CountingProxy(srv.settings.port) as proxy:
        code, report, err = await run_bench(
            srv,
            nats_url,
            "--clients",
            "5",
            "--messages",
            "40",
            "--via",
            "emit",
            "--emit-concurrency",
            str(concurrency),
            url=f"http://127.0.0.1:{proxy.port}{srv.settings.base_path}",
        )
    assert_clean(code, report, err, expected=5 * 40)
    assert report["via"] == "emit"
    assert report["emit_concurrency"] == concurrency
    assert proxy.post_connections == concurrency
    if concurrency == 1:
        assert proxy.max_in_flight == 1  # never a second POST before the 202
    else:
        assert 1 < proxy.max_in_flight <= concurrency


# ------------------------------------------------------------------ dev-mode tokens


@pytest.mark.parametrize("via", ["nats", "emit"])
async def test_tokens_from_a_dev_server(start_server, nats_url, via):
    # `pushsvc serve --dev` generates a secret it never prints: without --secret the
    # bench gets every client's (and emitter's) token from GET /dev/token
    srv = await start_server(dev=True, jwt_secret=None)
    code, report, err = await run_bench(
        srv, nats_url, "--clients", "12", "--messages", "20", "--via", via, secret=None
    )
    assert_clean(code, report, err, expected=12 * 20)
    assert report["tokens"] == "dev"


async def test_no_secret_and_no_dev_server_exits_2(start_server, nats_url):
    srv = await start_server()  # not in dev mode: GET /dev/token is 404
    code, out, err = await bench(
        "--url", srv.base, "--nats-url", nats_url, "--clients", "2", "--messages", "1", "--json"
    )
    assert code == 2, (out, err)
    assert out == ""
    assert "--secret (or PUSHSVC_JWT_SECRET) is required" in err, err
    assert "404" in err, err
    assert "Traceback" not in err, err


async def test_unreachable_nats_exits_1_naming_url_and_cause(start_server):
    srv = await start_server()
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await bench(
        *("--url", srv.base, "--nats-url", url, "--secret", SECRET, "--json"),
        *("--clients", "1", "--messages", "1", "--timeout", "5"),
    )
    assert code == 1, (out, err)
    # one line naming the URL and the cause (natsconn.connect's NatsUnreachable)
    assert f"pushsvc bench: cannot reach NATS at {url}: connection refused\n" in err, err
    assert "Traceback" not in err, err


def test_no_secret_and_no_server_exits_2(monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("PUSHSVC_"):
            monkeypatch.delenv(name)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = cli_main(["bench", "--url", url, "--json"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    assert "--secret (or PUSHSVC_JWT_SECRET) is required" in err, err
    assert f"{url}/dev/token" in err, err


# ------------------------------------------------------------------------- vs floor


async def test_vs_floor_prints_both_rows_and_ratios(start_server, nats_url):
    srv = await start_server()
    code, out, err = await bench(
        "--vs-floor",
        "--rounds",
        "1",
        "--url",
        srv.base,
        "--nats-url",
        nats_url,
        "--prefix",
        srv.settings.subject_prefix,
        "--secret",
        SECRET,
        "--clients",
        "10",
        "--messages",
        "30",
        "--rate",
        "200",
        "--procs",
        "1",
        "--quiet",
    )
    assert code == 0, (out, err)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert set(rows) == {"floor", "pushsvc", "ratio"}, out
    # p50, p99, CPU per frame and per delivery, deliveries/s: numbers (or "-") in each row
    assert all(len(cells) == 5 for cells in rows.values()), out
    assert all(float(c.rstrip("x").replace(",", "")) > 0 for c in rows["ratio"][:2]), out
    assert "lost 0" in out and "failed runs 0" in out, out
    assert "nats hop: p50 " in out and "pushsvc p50 less the hop" in out, out
    # the server runs in this test's process, found as the one listening on --url's port
    assert f"server pid {os.getpid()}" in out, out


async def test_compressed_clients_decode_every_frame(start_server, nats_url):
    """--compression deflate --sample: clients negotiate permessage-deflate and inflate
    the shared compressed frames; the order book costs a fraction of its bytes."""
    srv = await start_server(compression="deflate")
    common = ("--clients", "6", "--messages", "40", "--rate", "400", "--sample")
    code, plain, err = await run_bench(srv, nats_url, *common)
    assert_clean(code, plain, err, expected=6 * 40)
    code, packed, err = await run_bench(srv, nats_url, *common, "--compression", "deflate")
    assert_clean(code, packed, err, expected=6 * 40)
    assert plain["compression"] == "off" and packed["compression"] == "deflate"
    assert plain["size"] > 1900  # the sample, ~2 KiB
    assert packed["wire_bytes_per_delivery"] < 0.5 * plain["wire_bytes_per_delivery"]


async def test_compression_both_prints_both_rows_and_ratios(start_server, nats_url):
    srv = await start_server(compression="deflate")
    code, out, err = await bench(
        "--compression",
        "both",
        "--sample",
        "--rounds",
        "1",
        "--url",
        srv.base,
        "--nats-url",
        nats_url,
        "--prefix",
        srv.settings.subject_prefix,
        "--secret",
        SECRET,
        "--clients",
        "8",
        "--messages",
        "30",
        "--rate",
        "300",
        "--procs",
        "1",
        "--quiet",
    )
    assert code == 0, (out, err)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert set(rows) == {"off", "deflate", "ratio"}, out
    assert all(len(cells) == 5 for cells in rows.values()), out
    assert float(rows["ratio"][0].rstrip("x")) < 0.5, out  # wire bytes per delivery
    assert "lost 0" in out and "failed runs 0" in out, out


async def test_heap_measures_both_kinds():
    """``python -m pushsvc.bench.heap`` (docs/benchmarks.md, "Compression") runs as written."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushsvc.bench.heap",
        "--clients",
        "5",
        "--rounds",
        "1",
        "--idle",
        "0.5",
        "--json",
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["clean"] and set(result["bytes_per_connection"]) == {"off", "deflate"}
    wire = {r["kind"]: r["wire_bytes_per_delivery"] for r in result["runs"]}
    assert wire["deflate"] < 0.5 * wire["off"]  # the deflate clients did negotiate it


async def test_vs_floor_json_and_failing_runs_exit_1(start_server, nats_url):
    srv = await start_server()
    code, report, err = await run_bench(
        srv,
        nats_url,
        "--vs-floor",
        "--rounds",
        "2",
        "--clients",
        "3",
        "--messages",
        "5",
        secret="not-" + SECRET,  # pushsvc refuses every client: the floor still runs
    )
    assert code == 1, (report, err)
    assert report["mode"] == "vs-floor"
    assert report["rounds"] == len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["floor"]["deliveries"] == 3 * 5
        assert run["pushsvc"]["failed_clients"] == 3
    assert report["floor"]["latency_p50_ms"] is not None
    assert report["pushsvc"]["latency_p50_ms"] is None  # nothing delivered
    assert report["ratio"]["latency_p50_ms"] is None
    assert report["failed_runs"] >= 2
    assert any("setup failed" in s for s in report["error_samples"]), report


# --------------------------------------------------------------------------- README


def measure_it_block() -> str:
    """The first ``sh`` block of README.md's "Measure it" section."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Measure it", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def small_runs(block: str) -> str:
    """``block`` with every ``pushsvc bench`` line made small: the same flags, fewer of all."""
    lines = []
    for line in block.splitlines():
        if line.startswith("pushsvc bench "):
            line = re.sub(r"--clients \d+", "--clients 20", line)
            line = re.sub(r"--messages \d+", "--messages 20", line)
            line += " --rounds 1 --procs 1"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_readme_measure_it_defaults(monkeypatch):
    # the block's server is serve's default address, which is bench's default --url
    block = measure_it_block()
    assert "pushsvc serve --dev &" in block
    assert "http://127.0.0.1:8000" in block and "/readyz" in block
    monkeypatch.delenv("PUSHSVC_URL", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).url == "http://127.0.0.1:8000"
    assert Settings.load(env={}, dev=True).port == 8000
    benches = [line for line in block.splitlines() if line.startswith("pushsvc bench ")]
    assert len(benches) >= 4, block
    for flag in ("--floor", "--vs-floor", "--emit-concurrency 1"):
        assert any(flag in line for line in benches), (flag, block)


async def test_readme_measure_it_runs_as_written(nats_url, tmp_path):
    # The block runs in bash as written, with smaller runs, against its own
    # `pushsvc serve --dev &`; this machine is shared, so the user's way to move
    # it (README: PUSHSVC_PORT for the server, PUSHSVC_URL and PUSHSVC_NATS_URL for
    # the client commands) points it at a free port and the tests' NATS.
    port = free_port()
    env = node_env(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PUSHSVC_PORT=str(port),
        PUSHSVC_URL=f"http://127.0.0.1:{port}",
        PUSHSVC_NATS_URL=nats_url,
    )
    script = "set -e\n" + small_runs(measure_it_block())
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 2 * RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Dev token" in text, text  # the server the block started
    assert text.count("pushsvc bench --floor: ") == 1, text
    assert text.count("pushsvc bench --vs-floor: ") == 1, text
    # the two plain runs: every message once, tokens from /dev/token (no secret anywhere)
    assert text.count("tokens from /dev/token") == 2, text
    assert text.count("deliveries    400 of 400 expected") == 2, text
    assert "failed runs 0" in text, text


def test_client_counts_late_duplicate_and_batched_frames_once():
    """The bench client's accounting, fed server frames directly (its sans-I/O part).

    The common read (one frame, the next message in order) is counted inline; a
    message that arrives early, a duplicate, or a frame of several messages takes
    the general path. Every message must count once as unique and every repeat
    as a duplicate, whichever path saw it.
    """
    loop = asyncio.new_event_loop()
    try:
        tally = Tally(
            loop, parse_uri("ws://127.0.0.1:1/ws"), {"channels": 1, "messages": 20, "procs": 1}
        )
        client = Client(tally, 0, "token", stalled=False)
        client.raw = True  # as after the handshake

        def frame(*ids: int) -> bytes:
            lines = [
                json.dumps(
                    {
                        "type": "message",
                        "channel": "bench.0",
                        "data": {"i": i, "t": time.time_ns()},
                        "seq": i + 1,
                    },
                    separators=(",", ":"),
                )
                for i in ids
            ]
            return Frame(Opcode.TEXT, "\n".join(lines).encode()).serialize(mask=False)

        # 3 early; 2 then fills the gap, so the repeated 3 is a duplicate, not next
        for ids in [(0,), (1,), (3,), (2,), (3,), (2,), (4, 5), (7,), (5,), (6,), (8,)]:
            client.data_received(frame(*ids))
    finally:
        loop.close()
    assert tally.unique == 9  # 0..8
    assert tally.dups == 3  # the second 3, 2 and 5
    assert tally.delivered == 12
    assert tally.frames == 11
    assert tally.errors == 0
    tally.fold()
    assert len(tally.lat_done) == 12  # one latency sample per delivery
