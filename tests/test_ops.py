"""Operations (issue 10): node identity, metrics across workers, drain on SIGTERM, JSON logs.

Every test runs ``pushsvc serve`` as a user would (a real process on a free
loopback port, against the session's NATS) and talks to it over real sockets.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import pytest
import websockets
from conftest import SECRET
from helpers import node_env, thread_names
from wsclient import WSClient

from pushsvc.auth.tokens import mint_token
from pushsvc.logs import JsonFormatter, RedactTokens
from pushsvc.server.embedded import EmbeddedNats, free_port

PUSHSVC = [sys.executable, "-m", "pushsvc"]


class Serve:
    """``pushsvc serve`` in a subprocess; stdout and stderr collected line by line."""

    def __init__(self, nats_url: str, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        full = node_env()
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
        full.update(
            PUSHSVC_JWT_SECRET=SECRET,
            PUSHSVC_NATS_URL=nats_url,
            PUSHSVC_PORT=str(self.port),
            **env,
        )
        self.proc = subprocess.Popen(
            [*PUSHSVC, "serve"],
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    async def started(self, workers: int = 1, timeout: float = 60) -> None:
        """Wait until every worker finished its start-up and ``/readyz`` answers 200."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"serve exited:\n{self.output}"
                if self.output.count("Application startup complete") >= workers:
                    try:
                        if (await http.get(f"{self.base}/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"serve did not start:\n{self.output}")

    def token(self, sub: str = "alice", ttl: float = 3600) -> str:
        return mint_token(SECRET, sub, channels=[">"], ttl=ttl)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for the exit code (the readers finish too)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, timeout)
        for t in self._readers:
            await asyncio.to_thread(t.join, 5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sample(text: str, name: str) -> float | None:
    """The value of sample ``name`` in a Prometheus text exposition (labelled: the sum)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if match is not None:
        return float(match.group(1))
    values = re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return sum(map(float, values)) if values else None


async def scrape(http: httpx.AsyncClient, base: str) -> str:
    r = await http.get(f"{base}/metrics")
    assert r.status_code == 200
    return r.text


async def connect_many(url: str, tokens: list[str], channel: str) -> list[WSClient]:
    """Connect and subscribe ``len(tokens)`` clients, 20 at a time."""
    clients: list[WSClient] = []
    for i in range(0, len(tokens), 20):
        batch = await asyncio.gather(*(WSClient.connect(url, t) for t in tokens[i : i + 20]))
        await asyncio.gather(*(c.subscribe(channel) for c in batch))
        clients.extend(batch)
    return clients


@pytest.fixture
def monitored_nats() -> Iterator[tuple[str, str]]:
    """A private nats-server with its HTTP monitoring port: ``(url, monitoring base)``."""
    monitor = free_port()
    server = EmbeddedNats(port=free_port(), extra_args=["-m", str(monitor)])
    server.start()
    yield server.url, f"http://127.0.0.1:{monitor}"
    server.cleanup()


async def test_workers_metrics_report_the_whole_server(monitored_nats, channel):
    nats_url, monitor = monitored_nats
    srv = Serve(nats_url, PUSHSVC_WORKERS="2", PUSHSVC_NODE_NAME="edge-7")
    clients: list[WSClient] = []
    try:
        await srv.started(workers=2)
        async with httpx.AsyncClient(timeout=5) as http:
            connz = (await http.get(f"{monitor}/connz")).json()
        names = sorted(c.get("name", "") for c in connz["connections"])
        # one connection per worker, named after the node and the worker
        assert len(names) == 2 and all(re.fullmatch(r"pushsvc/edge-7/\d+", n) for n in names)
        assert names[0] != names[1]
        for name in names:  # each worker trims its own heap (pushsvc.server.heaptrim)
            assert "pushsvc-trim" in thread_names(int(name.rsplit("/", 1)[1])), name
        tokens = [srv.token(f"u{i}") for i in range(200)]
        clients = await connect_many(srv.ws_url, tokens, channel)
        # session ids start with a per-process prefix: both workers hold sockets
        workers = {c.welcome["client"].split("-")[0] for c in clients}
        assert len(workers) == 2, f"all 200 sockets landed on one worker: {workers}"
        assert {c.welcome["node"] for c in clients} == {"edge-7"}
        async with httpx.AsyncClient(timeout=10) as http:
            # whichever worker answers, the connections gauge counts both
            for _ in range(8):
                text = await scrape(http, srv.base)
                assert sample(text, "pushsvc_connections") == 200, text
                assert sample(text, "pushsvc_subscriptions") == 200
                assert sample(text, "pushsvc_nats_connected") == 1
            assert re.search(r'^pushsvc_info\{node="edge-7",version="[^"]+"\} 1\.0$', text, re.M)
            before = await scrape(http, srv.base)
            nc = await nats.connect(nats_url)
            try:
                for i in range(20):
                    await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
                await nc.flush()
            finally:
                await nc.close()
            for c in clients:
                assert [m["data"]["i"] for m in await c.messages(20, timeout=30)] == list(range(20))
            after = await scrape(http, srv.base)

        def delta(name: str) -> float:
            return (sample(after, name) or 0) - (sample(before, name) or 0)

        # one observation per message and worker holding the channel
        handed = delta("pushsvc_messages_received_total")
        assert handed == 40  # 20 messages, each handed out by both workers
        assert delta("pushsvc_delivery_latency_seconds_count") == handed
        assert delta("pushsvc_deliveries_total") == 200 * 20
        assert sample(after, "pushsvc_channels") == 2  # one NATS subscription per worker

        # A worker dies (uvicorn starts another): its sockets stop counting.
        by_worker: dict[str, list[WSClient]] = {}
        for c in clients:
            by_worker.setdefault(c.welcome["client"].split("-")[0], []).append(c)
        os.kill(int(names[0].rsplit("/", 1)[1]), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not any(all(c.ws.close_code is not None for c in g) for g in by_worker.values()):
            assert time.monotonic() < deadline, "no worker's sockets were closed"
            await asyncio.sleep(0.05)
        survivors = [c for c in clients if c.ws.close_code is None]
        assert len(survivors) in {len(g) for g in by_worker.values()}
        async with httpx.AsyncClient(timeout=10) as http:
            while sample(await scrape(http, srv.base), "pushsvc_connections") != len(survivors):
                assert time.monotonic() < deadline, "the dead worker's sockets still count"
                await asyncio.sleep(0.2)
    finally:
        for c in clients:
            await c.close()
        code = await srv.stop()
        srv.kill()
    assert code == 0, srv.output


async def test_drain_delay_keeps_serving_while_readyz_says_503(nats_url, channel):
    srv = Serve(
        nats_url,
        PUSHSVC_DRAIN_DELAY="2",
        PUSHSVC_SHUTDOWN_TIMEOUT="5",
        PUSHSVC_NODE_NAME="drainer",
    )
    try:
        await srv.started()
        clients = await connect_many(srv.ws_url, [srv.token(f"d{i}") for i in range(3)], channel)
        nc = await nats.connect(nats_url)
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{srv.base}/readyz")).json()["node"] == "drainer"
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            while True:
                r = await http.get(f"{srv.base}/readyz")
                if r.status_code == 503:
                    break
                assert time.monotonic() - signalled < 0.2, "readyz still 200 after 0.2 s"
            assert time.monotonic() - signalled < 0.2
            assert r.json()["draining"] is True
            # existing sockets keep working: a message published now is delivered
            await nc.publish(f"push.{channel}", b'{"during": "drain"}')
            for c in clients:
                (m,) = await c.messages(1)
                assert m["data"] == {"during": "drain"}
            late = await WSClient.connect(srv.ws_url, srv.token("late"))  # still accepted
            codes = await asyncio.gather(*(c.closed(10) for c in [*clients, late]))
            closed_after = time.monotonic() - signalled
        await nc.close()
        assert codes == [1012] * 4
        assert closed_after >= 1.9, f"sessions closed {closed_after:.2f} s after SIGTERM"
        code = await asyncio.to_thread(srv.proc.wait, 2 + 5 + 3)
        assert code == 0, srv.output
    finally:
        srv.kill()


async def test_json_logs_every_line_is_an_object_without_tokens(nats_url, channel):
    srv = Serve(
        nats_url,
        PUSHSVC_LOG_FORMAT="json",
        PUSHSVC_NODE_NAME="jsonnode",
        PUSHSVC_SEND_QUEUE_BYTES="65536",
    )
    tokens: list[str] = []
    try:
        await srv.started()
        good = srv.token("alice")
        expired = srv.token("bob", ttl=-3600)
        forged = mint_token("another-secret-of-enough-length!!", "eve", ttl=3600)
        tokens += [good, expired, forged]
        client = await WSClient.connect(srv.ws_url, good)
        assert client.welcome["node"] == "jsonnode"
        await client.subscribe(f"{channel}.quiet")
        # refused tokens: in the query string (403) and in an auth frame (4001)
        try:
            await websockets.connect(f"{srv.ws_url}?token={forged}", open_timeout=5)
            raise AssertionError("a forged token was accepted")
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 403
        refused = await WSClient.connect(srv.ws_url, None)
        await refused.send({"op": "auth", "token": expired})
        assert await refused.closed(5) == 4001
        # a slow consumer: subscribes, then never reads (tiny receive buffer)
        stalled_token = srv.token("stall")
        tokens.append(stalled_token)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        stalled = await websockets.connect(
            srv.ws_url, sock=sock, max_queue=1, compression=None, open_timeout=5
        )
        await stalled.send(json.dumps({"op": "auth", "token": stalled_token}))
        await stalled.send(json.dumps({"op": "subscribe", "channel": channel}))
        await asyncio.sleep(0.2)
        nc = await nats.connect(nats_url)
        big = "x" * 8000
        async with httpx.AsyncClient(timeout=5) as http:
            for i in range(3000):
                await nc.publish(f"push.{channel}", json.dumps({"i": i, "p": big}).encode())
                if i % 50 == 49:
                    await nc.flush()
                    text = await scrape(http, srv.base)
                    if (sample(text, "pushsvc_slow_consumers_total") or 0) >= 1:
                        break
            assert (sample(text, "pushsvc_slow_consumers_total") or 0) >= 1
            failures = re.findall(
                r'^pushsvc_auth_failures_total\{reason="(\w+)"\} (\S+)', text, re.M
            )
            assert {"expired", "signature"} <= {r for r, v in failures if float(v) >= 1}
        await nc.close()
        stalled.transport.abort()
        await client.close()
        assert await srv.stop() == 0
    finally:
        srv.kill()
    lines = [line for line in srv.output.splitlines() if line.strip()]
    assert lines
    events = []
    for line in lines:
        obj = json.loads(line)  # every line of the run is one JSON object
        assert isinstance(obj, dict), line
        assert {"time", "level", "logger", "node", "event"} <= obj.keys(), line
        assert obj["node"] == "jsonnode"
        events.append(obj)
    for token in tokens:
        assert token not in srv.output
        assert token[-16:] not in srv.output
    assert any(e["logger"] == "uvicorn.access" and "path" in e for e in events)
    assert any(e["event"] == "token refused" and e["reason"] == "signature" for e in events)
    assert any(e["event"] == "token refused" and e["reason"] == "expired" for e in events)
    slow = [e for e in events if e["event"] == "session closed" and e.get("code") == 4009]
    assert slow and slow[0]["client"] and slow[0]["channels"] == 1


def test_json_formatter_one_object_per_line_never_a_token():
    """Quotes, newlines and tokens in messages, fields and tracebacks stay inside one object."""
    token = mint_token(SECRET, "alice", ttl=60)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(node="n-1"))
    handler.addFilter(RedactTokens())
    logger = logging.getLogger("pushsvc.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning('bad "frame"\nnext line %s', token, extra={"client": "c-1", "code": 4001})
        logger.info("frame", extra={"reason": f"Bearer {token}", "channels": 3, "obj": object()})
        try:
            raise ValueError(f"token={token}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["event"].startswith('bad "frame"\nnext line ')
    assert (first["level"], first["logger"], first["node"]) == (
        "warning",
        "pushsvc.test_json",
        "n-1",
    )
    assert (first["client"], first["code"]) == ("c-1", 4001)
    assert second["channels"] == 3 and second["reason"] == "Bearer [redacted]"
    assert "ValueError" in third["exc"]
    assert token not in stream.getvalue() and token[-16:] not in stream.getvalue()
