"""The open-file limit of a real ``pushsvc serve``, run with a low ``RLIMIT_NOFILE``.

The server runs in a subprocess whose soft limit is 64 and hard limit 200
(``resource.setrlimit`` before exec): it raises the soft limit to 200, logs how
many connections it can hold, accepts exactly that many WebSockets, and refuses
the next handshakes with 503 + ``Retry-After`` (instead of the reset without an
answer that libuv gives at ``EMFILE``); plain HTTP still answers from the spare
descriptors, and a closed connection frees a place. A few hundred sockets: fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from conftest import SECRET
from helpers import http_ready, node_env, thread_names, until

from pushsvc.auth.tokens import mint_token
from pushsvc.server.embedded import free_port

PUSHSVC = [sys.executable, "-m", "pushsvc"]
SOFT, HARD = 64, 200  # descriptors


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


async def _connect(url: str, sub: str) -> websockets.ClientConnection:
    token = mint_token(SECRET, sub, channels=[">"])
    ws = await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
    )
    assert '"welcome"' in await asyncio.wait_for(ws.recv(), 10)
    return ws


async def test_serve_raises_the_limit_logs_capacity_and_refuses_503_near_it(nats_url):
    port = free_port()
    env = node_env()
    env.update(PUSHSVC_JWT_SECRET=SECRET, PUSHSVC_NATS_URL=nats_url, PUSHSVC_LOG_LEVEL="info")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test, read from a thread
        [*PUSHSVC, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_low_limit,
    )
    lines: list[str] = []
    clients: list[websockets.ClientConnection] = []
    try:
        assert proc.stdout is not None
        capacity = None
        deadline = time.monotonic() + 30
        while capacity is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                break
            lines.append(line)
            if m := re.search(r"capacity: (\d+) connections", line):
                capacity = int(m.group(1))
        log = "".join(lines)
        assert capacity is not None, log
        assert f"open-file limit raised from {SOFT} to {HARD}" in log, log
        assert f"limit {HARD}" in log and "32 kept spare" in log, log
        assert 100 < capacity < HARD - 32, log
        # the heap trimmer runs (pushsvc.server.heaptrim), in a thread of its own
        assert "free heap memory goes back to the OS every 60 s" in log, log
        assert "pushsvc-trim" in thread_names(proc.pid), thread_names(proc.pid)
        url = f"ws://127.0.0.1:{port}/ws"
        for k in range(0, capacity, 25):  # in groups: every handshake is a connection
            clients += await asyncio.gather(
                *(_connect(url, f"u{i}") for i in range(k, min(capacity, k + 25)))
            )
        assert len(clients) == capacity
        # one more: 503 with Retry-After and a reason, not a reset
        for _ in range(3):
            with pytest.raises(websockets.InvalidStatus) as info:
                await _connect(url, "late")
            response = info.value.response
            assert response.status_code == 503, response
            assert response.headers["Retry-After"] == "5"
            assert b"connection limit reached" in response.body
        # plain HTTP still answers: the spare descriptors
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert r.status_code == 200
        # a closed connection frees its place
        await clients.pop().close()
        for _ in range(50):
            with contextlib.suppress(websockets.InvalidStatus):
                clients.append(await _connect(url, "next"))
                break
            await asyncio.sleep(0.05)
        assert len(clients) == capacity
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        proc.terminate()
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
    log = "".join(lines) + out
    assert "Traceback" not in log and " ERROR " not in log, log


async def test_handshake_gate_holds_new_connections_until_a_slot_frees(start_server, monkeypatch):
    # one handshake in flight at a time: a connection that sends nothing holds the slot,
    # the next one waits (accepted, reading paused) and completes as soon as it frees
    from pushsvc.server.capacity import handshake_gate

    gate = handshake_gate()
    monkeypatch.setattr(gate, "limit", 1)
    srv = await start_server()
    before = gate.active
    _, silent = await asyncio.open_connection("127.0.0.1", srv.settings.port)
    for _ in range(100):
        if gate.active > before:
            break
        await asyncio.sleep(0.01)
    pending = asyncio.ensure_future(_connect(srv.ws_url, "waiting"))
    await asyncio.sleep(0.3)
    assert not pending.done() and gate.waiting == 1  # no 101 while the slot is held
    silent.close()  # the slot frees: the waiting handshake goes on
    ws = await asyncio.wait_for(pending, 5)
    # an authenticated client holds no slot: the next connections pass at once
    more = [await _connect(srv.ws_url, f"u{i}") for i in range(3)]
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{srv.base}/healthz")).status_code == 200
    for c in [ws, *more]:
        await c.close()
    await asyncio.sleep(0.1)
    assert gate.active == before and gate.waiting == 0


async def test_under_uvloop_a_queued_connection_is_not_served_before_its_slot(nats_url):
    # uvloop starts reading after connection_made, so the gate's pause_reading() there
    # does not hold: before the fix a queued connection was upgraded and authenticated
    # while still queued, admitted later, and its slot's deadline then closed the live
    # WebSocket (silent 1006 drops, seen under a bench's churn). `pushsvc serve` runs
    # uvloop; the test server in this process does not, hence a subprocess
    from pushsvc.server.capacity import HANDSHAKES_IN_FLIGHT

    port = free_port()
    env = node_env()
    env.update(PUSHSVC_JWT_SECRET=SECRET, PUSHSVC_NATS_URL=nats_url, PUSHSVC_LOG_LEVEL="warning")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test
        [*PUSHSVC, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    silent: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient() as http:
            await until(lambda: http_ready(http, port), within=30)
        for _ in range(HANDSHAKES_IN_FLIGHT):  # every slot held by a peer that says nothing
            silent.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await asyncio.sleep(0.2)
        pending = asyncio.ensure_future(_connect(f"ws://127.0.0.1:{port}/ws", "queued"))
        await asyncio.sleep(0.5)
        assert not pending.done()  # queued: no 101 before a slot frees
        for writer in silent:
            writer.close()
        ws = await asyncio.wait_for(pending, 10)
        await ws.send('{"op":"presence_stats","channel":"x","id":1}')
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
    finally:
        pending_close = [w for w in silent if not w.is_closing()]
        for writer in pending_close:
            writer.close()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)


async def test_a_silent_connection_loses_its_gate_slot_after_the_handshake_timeout(
    start_server, monkeypatch
):
    # a peer that never sends its request cannot keep the gate shut: it is closed
    from pushsvc.server import capacity

    gate = capacity.handshake_gate()
    monkeypatch.setattr(gate, "limit", 1)
    monkeypatch.setattr(capacity, "HANDSHAKE_TIMEOUT", 0.5)
    srv = await start_server()
    reader, silent = await asyncio.open_connection("127.0.0.1", srv.settings.port)
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    ws = await asyncio.wait_for(_connect(srv.ws_url, "patient"), 5)
    assert 0.3 < time.monotonic() - t0 < 3  # waited for the silent one's deadline
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the silent one was closed
    silent.close()
    await ws.close()
