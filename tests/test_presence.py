"""Presence, cluster-wide in a JetStream KV bucket: two pushsvc nodes on one NATS.

Real nats-server, real uvicorn servers, real sockets. The SIGKILL test runs a
node as a subprocess with its own bucket and a 2 s TTL.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
from conftest import SECRET
from helpers import node_env
from wsclient import WSClient

from pushsvc.server.embedded import free_port

PRESENCE = {"presence_channels": ["room.>", "*.room"]}


async def presence(client: WSClient, channel: str, op: str = "presence") -> dict[str, Any]:
    await client.send({"op": op, "channel": channel, "id": 7})
    return await client.expect(op, channel=channel, id=7)


async def eventually(check: Any, within: float = 10.0) -> Any:
    """Poll ``check()`` (async, returns a truthy value when done) for up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


def tok(srv: Any, sub: str, channels: list[str] | None = None, **claims: Any) -> str:
    """A connection token for ``srv`` with extra claims (``info``, ``presence``, ``subs``)."""
    return srv.token(sub, channels=channels, extra=claims)


def ids(answer: dict[str, Any]) -> set[str]:
    return {c["client"] for c in answer["clients"]}


async def test_presence_lists_clients_of_both_nodes(start_server, channel):
    one = await start_server(**PRESENCE)
    two = await start_server(**PRESENCE)
    a = await one.client(tok(one, "alice", info={"name": "Alice"}))
    b = await two.client(tok(two, "bob"))
    b2 = await two.client(tok(two, "bob"))
    for c in (a, b, b2):
        await c.subscribe(channel)

    # carol may see presence without subscribing; either node sees every node's sessions
    watcher = await one.client(tok(one, "carol", channels=[], presence=["*.room"]))
    answer = await presence(watcher, channel)
    assert answer["clients_total"] == 3 and answer["users"] == 2
    assert "truncated" not in answer
    by_client = {c["client"]: c for c in answer["clients"]}
    assert set(by_client) == {a.welcome["client"], b.welcome["client"], b2.welcome["client"]}
    assert by_client[a.welcome["client"]]["info"] == {"name": "Alice"}
    assert by_client[a.welcome["client"]]["user"] == "alice"
    assert "info" not in by_client[b.welcome["client"]]
    assert all(c["node"] for c in answer["clients"])  # the serving node (process) id
    assert (one.node.presence.entries, two.node.presence.entries) == (1, 2)  # owned per node

    watcher2 = await two.client(tok(two, "carol", channels=[], presence=["*.room"]))
    answer = await presence(watcher2, channel)
    assert ids(answer) == {a.welcome["client"], b.welcome["client"], b2.welcome["client"]}
    stats = await presence(watcher2, channel, "presence_stats")
    assert (stats["clients"], stats["users"]) == (3, 2)

    # a clean close removes the session at once (long before the 60 s TTL)
    await b2.close()

    async def gone() -> bool:
        return b2.welcome["client"] not in ids(await presence(watcher, channel))

    assert await eventually(gone, within=5)
    # and an unsubscribe too
    await a.send({"op": "unsubscribe", "channel": channel})
    await a.expect("unsubscribed", channel=channel)

    async def left() -> bool:
        return ids(await presence(watcher2, channel)) == {b.welcome["client"]}

    assert await eventually(left, within=5)
    stats = await presence(watcher2, channel, "presence_stats")
    assert (stats["clients"], stats["users"]) == (1, 1)


async def test_presence_refusals_keep_the_socket_open(start_server, channel):
    srv = await start_server(**PRESENCE)
    no_grant = await srv.client(tok(srv, "dave"))
    await no_grant.send({"op": "presence", "channel": channel, "id": 1})
    await no_grant.expect("error", code="forbidden", id=1)
    await no_grant.send({"op": "presence_stats", "channel": channel, "id": 2})
    await no_grant.expect("error", code="forbidden", id=2)

    granted = await srv.client(tok(srv, "erin", presence=[">"]))
    await granted.send({"op": "presence", "channel": "elsewhere.x", "id": 3})
    err = await granted.expect("error", code="bad_request", id=3)
    assert "not enabled" in err["message"]
    await granted.send({"op": "presence", "channel": "bad..name", "id": 4})
    await granted.expect("error", code="invalid_channel", id=4)
    # still open and answering
    answer = await presence(granted, channel)
    assert answer["clients"] == [] and answer["clients_total"] == 0 and answer["users"] == 0


async def test_presence_list_is_capped_counts_exact(start_server, channel):
    srv = await start_server(presence_limit=2, **PRESENCE)
    clients = [await srv.client(tok(srv, f"u{i % 3}")) for i in range(5)]
    for c in clients:
        await c.subscribe(channel)
    watcher = await srv.client(tok(srv, "w", presence=[channel]))
    answer = await presence(watcher, channel)
    assert len(answer["clients"]) == 2 and answer["truncated"] is True
    assert answer["clients_total"] == 5 and answer["users"] == 3


async def test_presence_over_http(start_server, http, channel):
    srv = await start_server(api_keys=["ops:k-123"], **PRESENCE)
    c = await srv.client(tok(srv, "alice", info={"seat": 4}))
    await c.subscribe(channel)
    url = f"{srv.base}/presence/{channel}"

    for credential in (tok(srv, "backend", channels=[], presence=["*.room"]), "k-123"):
        r = await http.get(url, headers={"Authorization": f"Bearer {credential}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["channel"] == channel and body["users"] == 1 and body["clients_total"] == 1
        assert body["clients"][0]["client"] == c.welcome["client"]
        assert body["clients"][0]["info"] == {"seat": 4}

    r = await http.get(url)
    assert r.status_code == 401
    r = await http.get(url, headers={"Authorization": f"Bearer {tok(srv, 'x')}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = await http.get(f"{srv.base}/presence/other.x", headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 400 and "not enabled" in r.json()["message"]
    r = await http.get(f"{srv.base}/presence/a..b", headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 422
    metrics = (await http.get(f"{srv.base}/metrics")).text
    assert "pushsvc_presence_entries 1.0" in metrics  # this node's present session


async def test_info_claim_over_1_kib_is_refused(start_server):
    srv = await start_server(**PRESENCE)
    token = tok(srv, "big", info={"blob": "x" * 1100})
    c = await WSClient.connect(srv.ws_url)
    await c.send({"op": "auth", "token": token})
    assert await c.closed() == 4001
    assert "info" in c.ws.close_reason
    token = tok(srv, "odd", info=["not", "an", "object"])
    c = await WSClient.connect(srv.ws_url)
    await c.send({"op": "auth", "token": token})
    assert await c.closed() == 4001


async def test_presence_unavailable_without_jetstream_history(start_server, channel):
    srv = await start_server(history_ttl=0, **PRESENCE)
    c = await srv.client(tok(srv, "alice", presence=[">"]))
    await c.subscribe(channel)  # delivery works, presence is not written
    await c.send({"op": "presence", "channel": channel, "id": 9})
    err = await c.expect("error", code="unavailable", id=9)
    assert "JetStream" in err["message"]
    assert srv.node.presence.entries == 1  # kept locally, written once JetStream is there


async def test_presence_over_http_unavailable_without_jetstream(start_server, http, channel):
    srv = await start_server(history_ttl=0, api_keys=["ops:k-123"], **PRESENCE)
    r = await http.get(f"{srv.base}/presence/{channel}", headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 503 and r.json()["error"] == "unavailable"
    assert "JetStream" in r.json()["message"] and int(r.headers["Retry-After"]) >= 1


async def test_sigkilled_node_entries_expire_within_the_ttl(start_server, nats_url, channel):
    bucket = f"PRES_{uuid.uuid4().hex[:8]}"
    settings = {"presence_bucket": bucket, "presence_ttl": 2, **PRESENCE}
    srv = await start_server(**settings)
    port = free_port()
    env = node_env()
    env.update(
        PUSHSVC_NATS_URL=nats_url,
        PUSHSVC_JWT_SECRET=SECRET,
        PUSHSVC_PORT=str(port),
        PUSHSVC_PRESENCE_BUCKET=bucket,
        PUSHSVC_PRESENCE_TTL="2",
        PUSHSVC_PRESENCE_CHANNELS="room.>,*.room",
        PUSHSVC_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - the node to kill
        [sys.executable, "-m", "pushsvc", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        doomed = await WSClient.connect(f"ws://127.0.0.1:{port}/ws", tok(srv, "zed"))
        await doomed.subscribe(channel)
        stays = await srv.client(tok(srv, "amy"))
        await stays.subscribe(channel)
        watcher = await srv.client(tok(srv, "w", presence=[channel]))
        everyone = {doomed.welcome["client"], stays.welcome["client"]}

        async def both() -> bool:
            return ids(await presence(watcher, channel)) == everyone

        assert await eventually(both, within=5)
        await asyncio.sleep(3)  # longer than the TTL: the owning nodes refresh their entries
        assert ids(await presence(watcher, channel)) == everyone

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()

        async def expired() -> bool:
            return ids(await presence(watcher, channel)) == {stays.welcome["client"]}

        assert await eventually(expired, within=10)
        # generous bound: TTL (2 s) plus the server's expiry scan
        assert time.monotonic() - killed < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
