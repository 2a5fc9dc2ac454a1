"""The cluster-wide server API over NATS (``<prefix>-api.<op>``) and HTTP (``POST /api/<op>``).

Two real pushsvc nodes under uvicorn on one real nats-server, real sockets. The
nodes use their own subject prefix, stream and node bucket, so nodes of other
test modules never answer their scatters. A third node runs as a subprocess to be
SIGKILLed (``missing_nodes``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import SECRET, Running, launch
from helpers import bearer, node_env, until
from test_sse import sse
from wsclient import WSClient

from pushsvc.protocol import Disconnect
from pushsvc.server.embedded import free_port

KEY = "ops:s3rver-api-key"
API_KEY = KEY.split(":", 1)[1]
TAG = uuid.uuid4().hex[:8]
PREFIX = f"api{TAG}"
SETTINGS = {
    "subject_prefix": PREFIX,
    "stream": f"API_{TAG}",
    "node_bucket": f"NODES_{TAG}",
    "presence_bucket": f"PRES_{TAG}",
    "presence_channels": ["room.>"],
    "api_keys": [KEY],
}


@pytest.fixture(scope="module")
async def cluster(nats_url: str) -> AsyncIterator[tuple[Running, Running]]:
    """Two nodes (``one``, ``two``) sharing NATS, stream and buckets."""
    one = await launch(nats_url, node_name="one", **SETTINGS)
    two = await launch(nats_url, node_name="two", **SETTINGS)
    yield one, two
    await one.stop()
    await two.stop()


@pytest.fixture
def room() -> str:
    return f"room.r{uuid.uuid4().hex[:8]}"


async def call(srv: Running, op: str, body: Any = None, key: str = API_KEY) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(f"{srv.base}/api/{op}", json=body, headers=bearer(key))


async def nats_call(nc: Any, op: str, body: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    msg = await nc.request(
        f"{PREFIX}-api.{op}", b"" if body is None else json.dumps(body).encode(), timeout=5
    )
    return json.loads(msg.data), dict(msg.headers or {})


def user(srv: Running, sub: str, **claims: Any) -> str:
    return srv.token(sub, extra=claims or None)


async def test_disconnect_on_another_node_with_each_close_code(cluster):
    one, two = cluster
    sub = f"u{uuid.uuid4().hex[:6]}"
    a = await one.client(user(one, sub))
    b = await two.client(user(two, sub))
    other = await one.client(user(one, "bystander"))

    r = await call(two, "disconnect", {"user": sub})  # the request reaches node two only
    assert r.status_code == 200, r.text
    assert r.json() == {"disconnected": 2, "missing_nodes": []}
    assert await a.closed() == 4011 and await b.closed() == 4011
    assert a.ws.close_reason == "disconnected by the server"
    assert not Disconnect.of(4011).reconnect

    # reconnect: true -> 4012; an app's own code and reason; one client by id
    a = await one.client(user(one, sub))
    r = await call(two, "disconnect", {"user": sub, "reconnect": True})
    assert r.json()["disconnected"] == 1 and await a.closed() == 4012
    assert Disconnect.of(4012).reconnect

    a = await one.client(user(one, sub))
    a2 = await one.client(user(one, sub))
    r = await call(
        two, "disconnect", {"client": a.welcome["client"], "code": 4501, "reason": "bye"}
    )
    assert r.json()["disconnected"] == 1
    assert await a.closed() == 4501 and a.ws.close_reason == "bye"
    assert not Disconnect.of(4501).reconnect and Disconnect.of(4100).reconnect
    await a2.send({"op": "unsubscribe", "channel": "x"})  # the user's other socket is open
    await a2.expect("unsubscribed", channel="x")
    await other.send({"op": "unsubscribe", "channel": "x"})
    await other.expect("unsubscribed", channel="x")

    for bad in ({"user": sub, "code": 4000}, {"user": sub, "code": 5000}, {}, {"user": 1}):
        r = await call(one, "disconnect", bad)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", bad
    await a2.close()
    await other.close()


async def test_nats_requests_reach_every_node(cluster, nc, room):
    one, two = cluster
    info, headers = await nats_call(nc, "info")
    assert "Pushsvc-Error" not in headers
    assert [n["node"] for n in info["nodes"]] == ["one", "two"] and info["missing_nodes"] == []
    node = info["nodes"][0]
    assert set(node) == {
        "node", "id", "version", "uptime", "connections", "subscriptions", "transports"
    }  # fmt: skip

    sub = f"u{uuid.uuid4().hex[:6]}"
    a = await one.client(user(one, sub, info={"name": "A"}))
    b = await two.client(user(two, sub))
    await a.subscribe(room)

    answer, _ = await nats_call(nc, "connections", {"user": sub})
    conns = {c["client"]: c for c in answer["connections"]}
    assert set(conns) == {a.welcome["client"], b.welcome["client"]}
    assert conns[a.welcome["client"]]["node"] == "one"
    assert conns[a.welcome["client"]]["channels"] == [room]
    assert conns[a.welcome["client"]]["info"] == {"name": "A"}
    assert conns[b.welcome["client"]]["transport"] == "ws"
    assert "info" not in conns[b.welcome["client"]]
    assert all(abs(c["connected_at"] - time.time()) < 60 for c in conns.values())
    answer, _ = await nats_call(nc, "connections", {"user": "nobody-here"})
    assert answer["connections"] == []

    info, _ = await nats_call(nc, "info")
    counts = {n["node"]: n for n in info["nodes"]}
    assert counts["one"]["connections"] >= 1 and counts["one"]["transports"]["ws"] >= 1

    # errors: a header and a JSON body
    answer, headers = await nats_call(nc, "nosuchop")
    assert headers["Pushsvc-Error"] == "not_found" and answer["error"] == "not_found"
    answer, headers = await nats_call(nc, "disconnect", {"nobody": 1})
    assert headers["Pushsvc-Error"] == "bad_request" and "message" in answer
    await a.close()
    await b.close()


async def test_server_side_subscribe_and_unsubscribe(cluster, nc, room):
    one, two = cluster
    sub = f"u{uuid.uuid4().hex[:6]}"
    a = await one.client(one.token(sub, channels=[]))  # no grant: the backend decides
    b = await two.client(two.token(sub, channels=[]))

    answer, _ = await nats_call(nc, "subscribe", {"user": sub, "channel": room})
    assert answer == {"subscribed": 2, "missing_nodes": []}
    for c in (a, b):
        frame = await c.expect("subscribed", channel=room)
        assert "id" not in frame
    await nc.publish(f"{PREFIX}.{room}", b'{"n":1}')
    for c in (a, b):
        assert (await c.expect("message", channel=room))["data"] == {"n": 1}
    # already subscribed: not counted again
    answer, _ = await nats_call(nc, "subscribe", {"user": sub, "channel": room})
    assert answer["subscribed"] == 0

    # channels: clients and distinct users, cluster-wide, filtered by a pattern
    watcher = await two.client(two.token("watcher"))
    await watcher.subscribe(room)
    r = await call(one, "channels", {"pattern": "room.>"})
    entries = {e["channel"]: e for e in r.json()["channels"]}
    assert entries[room] == {"channel": room, "clients": 3, "users": 2}
    r = await call(one, "channels", {"pattern": "elsewhere.>"})
    assert r.json()["channels"] == []
    r = await call(one, "channels", {"pattern": "bad..pattern"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_channel"

    # resume from a position: since 0 replays what the channel holds
    c = await one.client(one.token(sub, channels=[]))
    req = {"client": c.welcome["client"], "channel": room, "since": 0}
    answer, _ = await nats_call(nc, "subscribe", req)
    assert answer["subscribed"] == 1
    frame = await c.expect("subscribed", channel=room)
    assert frame["recovered"] is True
    assert (await c.expect("message", channel=room))["data"] == {"n": 1}

    r = await call(two, "unsubscribe", {"user": sub, "channel": room})
    assert r.json() == {"unsubscribed": 3, "missing_nodes": []}
    for cl in (a, b, c):
        frame = await cl.expect("unsubscribed", channel=room)
        assert frame["reason"] == "server"
    await nc.publish(f"{PREFIX}.{room}", b'{"n":2}')
    assert (await watcher.expect("message", channel=room))["data"] == {"n": 2}
    for cl in (a, b, c):
        await cl.nothing(0.2)
    for cl in (a, b, c, watcher):
        await cl.close()


async def test_presence_ops_without_grants(cluster, room):
    one, two = cluster
    a = await one.client(user(one, "pam"))
    b = await two.client(user(two, "quinn"))
    for c in (a, b):
        await c.subscribe(room)

    async def both() -> bool:
        r = await call(two, "presence", {"channel": room})
        return r.status_code == 200 and r.json()["clients_total"] == 2

    await until(both)
    r = await call(one, "presence", {"channel": room})
    assert {c["user"] for c in r.json()["clients"]} == {"pam", "quinn"}
    r = await call(one, "presence_stats", {"channel": room})
    assert r.json() == {"channel": room, "clients": 2, "users": 2}
    r = await call(one, "presence", {"channel": "lobby"})
    assert r.status_code == 400 and "not enabled" in r.json()["message"]
    await a.close()
    await b.close()


async def test_http_refusals(cluster):
    one, _ = cluster
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{one.base}/api/info")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await call(one, "info", key="not-a-key")
    assert r.status_code == 401
    r = await call(one, "info", key=one.token("alice"))  # a valid JWT is not an API key
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = await call(one, "nosuchop")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{one.base}/api/info", content=b"[1", headers=bearer(API_KEY))
        assert r.status_code == 400
    r = await call(one, "info")
    assert r.status_code == 200 and len(r.json()["nodes"]) == 2


async def test_a_killed_node_is_missing_then_not_waited_for(cluster, nats_url):
    one, _ = cluster
    port = free_port()
    env = node_env()
    env.update(
        {
            f"PUSHSVC_{k.upper()}": ",".join(v) if isinstance(v, list) else str(v)
            for k, v in SETTINGS.items()
        }
    )
    env.update(
        PUSHSVC_NATS_URL=nats_url,
        PUSHSVC_JWT_SECRET=SECRET,
        PUSHSVC_PORT=str(port),
        PUSHSVC_NODE_NAME="doomed",
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
        doomed = await WSClient.connect(f"ws://127.0.0.1:{port}/ws", one.token("zed"))
        r = await call(one, "info")
        assert sorted(n["node"] for n in r.json()["nodes"]) == ["doomed", "one", "two"]

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await doomed.closed()
        started = time.monotonic()
        r = await call(one, "disconnect", {"user": "zed"})  # mid-request: it cannot answer
        took = time.monotonic() - started
        assert r.status_code == 200
        assert [m["node"] for m in r.json()["missing_nodes"]] == ["doomed"]
        assert took >= one.settings.api_timeout * 0.9  # it waited for the node, bounded

        async def forgotten() -> bool:  # its registry entry expires (6 s TTL)
            r = await call(one, "info")
            return r.json()["missing_nodes"] == [] and len(r.json()["nodes"]) == 2

        await until(forgotten, within=15)
        started = time.monotonic()
        await call(one, "info")
        assert time.monotonic() - started < one.settings.api_timeout / 2  # not waited for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def pushsvc_api(nats_url: str, *args: str) -> tuple[int, str, str]:
    """Run ``pushsvc api ARGS`` as a user would (a subprocess; the loop keeps serving)."""
    env = node_env()
    env.update(PUSHSVC_NATS_URL=nats_url, PUSHSVC_SUBJECT_PREFIX=PREFIX)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushsvc",
        "api",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_verbs(cluster, nats_url, room):
    one, two = cluster
    sub = f"u{uuid.uuid4().hex[:6]}"
    a = await one.client(one.token(sub, channels=[]))
    b = await two.client(two.token(sub, channels=[]))

    code, out, _ = await pushsvc_api(nats_url, "info")
    assert code == 0 and [n["node"] for n in json.loads(out)["nodes"]] == ["one", "two"]
    code, out, _ = await pushsvc_api(nats_url, "subscribe", "--user", sub, "--channel", room)
    assert code == 0 and json.loads(out)["subscribed"] == 2
    await a.expect("subscribed", channel=room)
    code, out, _ = await pushsvc_api(nats_url, "connections", "--user", sub)
    assert {c["client"] for c in json.loads(out)["connections"]} == {
        a.welcome["client"],
        b.welcome["client"],
    }
    code, _, err = await pushsvc_api(nats_url, "disconnect", "--user", sub, "--code", "42")
    assert code == 1 and json.loads(err)["error"] == "bad_request"
    code, out, _ = await pushsvc_api(nats_url, "disconnect", "--user", sub, "--reconnect")
    assert code == 0 and json.loads(out)["disconnected"] == 2
    assert await a.closed() == 4012 and await b.closed() == 4012


async def test_sse_connections_are_acted_on_too(cluster, nc, room):
    one, two = cluster
    sub = f"u{uuid.uuid4().hex[:6]}"
    token = one.token(sub, channels=["lobby"])
    async with sse(one.base, "lobby", headers=bearer(token)) as events:
        welcome = await events.next("welcome")
        await events.next("subscribed")
        answer, _ = await nats_call(nc, "connections", {"user": sub})
        assert [(c["client"], c["transport"]) for c in answer["connections"]] == [
            (welcome["data"]["client"], "sse")
        ]
        info, _ = await nats_call(nc, "info")
        assert {n["node"]: n for n in info["nodes"]}["one"]["transports"].get("sse", 0) >= 1
        r = await call(two, "subscribe", {"user": sub, "channel": room})
        assert r.json()["subscribed"] == 1
        await events.next("subscribed")
        await nc.publish(f"{PREFIX}.{room}", b'{"sse":1}')
        assert (await events.next("message"))["data"]["data"] == {"sse": 1}
        r = await call(two, "disconnect", {"user": sub})
        assert r.json()["disconnected"] == 1
        close = await events.next("close")
        assert close["data"]["code"] == 4011 and close["data"]["reconnect"] is False


async def test_python_subscriber_reconnects_or_stops_as_the_code_says(cluster, room):
    """``pushsvc subscribe`` (the Python client in this package) follows the table."""
    one, two = cluster
    sub = f"u{uuid.uuid4().hex[:6]}"
    env = node_env()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushsvc",
        "subscribe",
        room,
        "--url",
        one.base,
        "--token",
        one.token(sub),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def clients() -> set[str]:
            r = await call(two, "connections", {"user": sub})
            return {c["client"] for c in r.json()["connections"]}

        async def online() -> bool:
            return len(await clients()) == 1

        await until(online, within=15)
        first = await clients()
        r = await call(two, "disconnect", {"user": sub, "reconnect": True})
        assert r.json()["disconnected"] == 1

        async def back() -> bool:
            now = await clients()
            return len(now) == 1 and now != first

        await until(back, within=15)  # 4012: it came back (and resumed)
        r = await call(two, "disconnect", {"user": sub, "code": 4501, "reason": "gone"})
        assert r.json()["disconnected"] == 1
        assert await asyncio.wait_for(proc.wait(), 15) == 1  # 4501: it stopped
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "4012" in err and "4501 gone" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_without_jetstream_the_request_waits_its_timeout(start_server, nc):
    """History off: no node registry; every node still answers, after the whole timeout."""
    prefix = f"live{TAG}"
    srv = await start_server(
        subject_prefix=prefix, history_ttl=0, api_timeout=0.5, api_keys=[KEY], node_name="solo"
    )
    started = time.monotonic()
    msg = await nc.request(f"{prefix}-api.info", b"", timeout=5)
    took = time.monotonic() - started
    answer = json.loads(msg.data)
    assert [n["node"] for n in answer["nodes"]] == ["solo"] and answer["missing_nodes"] == []
    assert 0.45 <= took < 3
    r = await call(srv, "presence", {"channel": "room.x"})
    assert r.status_code == 400  # presence is off on this node
