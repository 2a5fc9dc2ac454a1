"""Lifecycle events on NATS (``<prefix>-events.<type>``): order, occupancy, node loss, stream.

Two real pushsvc nodes on one real nats-server (their own prefix, stream, node
bucket and events stream); a third node runs as a subprocess to be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
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
from hostile import LogCapture
from nats.js.errors import KeyNotFoundError
from test_sse import sse
from wsclient import WSClient

from pushsvc.server.embedded import free_port

TAG = uuid.uuid4().hex[:8]
PREFIX = f"ev{TAG}"
TYPES = ["connect", "disconnect", "subscribe", "unsubscribe", "occupied", "vacated"]
SETTINGS: dict[str, Any] = {
    "subject_prefix": PREFIX,
    "stream": f"EV_{TAG}",
    "node_bucket": f"EVNODES_{TAG}",
    "events": TYPES,
    "events_stream": f"EVENTS_{TAG}",
}


@pytest.fixture(scope="module")
async def cluster(nats_url: str) -> AsyncIterator[tuple[Running, Running]]:
    one = await launch(nats_url, node_name="one", **SETTINGS)
    two = await launch(nats_url, node_name="two", **SETTINGS)
    yield one, two
    await one.stop()
    await two.stop()


class Recorder:
    """Every lifecycle event seen on ``<prefix>-events.>``, with its Nats-Msg-Id."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def cb(self, msg: Any) -> None:
        event = json.loads(msg.data)
        event["_id"] = (msg.headers or {}).get("Nats-Msg-Id")
        assert msg.subject == f"{PREFIX}-events.{event['type']}"
        self.events.append(event)

    def of(self, client: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("client") == client]

    def on(self, channel: str, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("channel") == channel and e["type"] in types]


@pytest.fixture
async def recorder(nc) -> AsyncIterator[Recorder]:
    rec = Recorder()
    sub = await nc.subscribe(f"{PREFIX}-events.>", cb=rec.cb)
    await nc.flush()
    yield rec
    await sub.unsubscribe()


@pytest.fixture
def room() -> str:
    return f"r{uuid.uuid4().hex[:8]}.room"


EXPECTED = ["connect", "subscribe", "unsubscribe", "disconnect"]


async def until_occupied_by(nc: Any, channel: str, nodes: int) -> None:
    """Wait until the node bucket's ``o.<channel>`` lists ``nodes`` node ids."""
    kv = await nc.jetstream().key_value(SETTINGS["node_bucket"])

    async def count() -> int:
        try:
            entry = await kv.get(f"o.{channel}")
        except KeyNotFoundError:
            return 0
        return len(json.loads(entry.value or b"[]"))

    deadline = time.monotonic() + 5
    while await count() != nodes:
        assert time.monotonic() < deadline, f"o.{channel} never listed {nodes} nodes"
        await asyncio.sleep(0.02)


async def test_every_type_in_order_for_one_websocket_connection(cluster, recorder, room):
    one, _ = cluster
    c = await one.client(one.token("ada", extra={"info": {"name": "Ada"}}))
    client = c.welcome["client"]
    await c.subscribe(room)
    await c.send({"op": "unsubscribe", "channel": room})
    await c.expect("unsubscribed", channel=room)
    await c.close()
    await until(lambda: len(recorder.of(client)) == 4 and len(recorder.on(room, "vacated")) == 1)
    assert recorder.of(client) == EXPECTED
    mine = [e for e in recorder.events if e.get("client") == client]
    assert all(e["user"] == "ada" and e["node"] == "one" and e["transport"] == "ws" for e in mine)
    assert mine[0]["info"] == {"name": "Ada"}
    assert mine[1]["channel"] == room and mine[2]["channel"] == room
    bye = mine[3]
    assert bye["code"] == 1000 and bye["duration"] >= 0 and bye["reason"]
    assert len({e["_id"] for e in mine}) == 4  # every event has its own Nats-Msg-Id
    occupied = recorder.on(room, "occupied")
    assert len(occupied) == 1 and set(occupied[0]) == {"type", "time", "node", "channel", "_id"}


async def test_every_type_in_order_for_one_sse_connection(cluster, recorder, room):
    one, two = cluster
    token = one.token("bea", channels=[room])
    async with sse(two.base, room, headers=bearer(token)) as events:
        welcome = (await events.next("welcome"))["data"]
        client = welcome["client"]
        await events.next("subscribed")
        async with httpx.AsyncClient() as http:
            body = {
                "session": welcome["session"],
                "commands": [{"op": "unsubscribe", "channel": room}],
            }
            r = await http.post(f"{two.base}/sse/commands", json=body)
            assert r.status_code == 202, r.text
        await events.next("unsubscribed")
    await until(lambda: len(recorder.of(client)) == 4)
    assert recorder.of(client) == EXPECTED
    assert {e["transport"] for e in recorder.events if e.get("client") == client} == {"sse"}
    bye = [e for e in recorder.events if e.get("client") == client][-1]
    assert bye["code"] == 1006  # the stream's reader went away without a close


async def test_occupied_and_vacated_are_cluster_wide(cluster, recorder, room, nc):
    one, two = cluster
    a = await one.client(one.token("cy"))
    b = await two.client(two.token("dee"))
    await a.subscribe(room)
    await until(lambda: len(recorder.on(room, "occupied")) == 1)
    await b.subscribe(room)  # the second node: the channel is occupied already
    # node two records its part asynchronously: were node one to leave first, the
    # channel would honestly be vacated and occupied again
    await until_occupied_by(nc, room, 2)
    await a.close()  # node one leaves; node two still holds it
    await until(lambda: len(recorder.on(room, "unsubscribe")) == 1)
    await asyncio.sleep(0.5)
    assert recorder.on(room, "vacated") == []
    await b.close()
    await until(lambda: len(recorder.on(room, "vacated")) == 1)
    assert len(recorder.on(room, "occupied")) == 1
    # occupied again, by either node, once
    c = await two.client(two.token("eve"))
    d = await one.client(one.token("fay"))
    await asyncio.gather(c.subscribe(room), d.subscribe(room))
    await until(lambda: len(recorder.on(room, "occupied")) == 2)
    await asyncio.sleep(0.5)
    assert len(recorder.on(room, "occupied")) == 2
    await c.close()
    await d.close()
    await until(lambda: len(recorder.on(room, "vacated")) == 2)


async def test_a_sigkilled_node_s_connections_are_reported_once(cluster, recorder, nats_url, nc):
    one, _ = cluster
    lonely = f"lonely{TAG}.room"  # only the doomed node's clients
    shared = f"shared{TAG}.room"  # also a survivor's client
    port = free_port()
    env = node_env()
    for key, value in SETTINGS.items():
        env[f"PUSHSVC_{key.upper()}"] = ",".join(value) if isinstance(value, list) else value
    env.update(
        PUSHSVC_NATS_URL=nats_url,
        PUSHSVC_JWT_SECRET=SECRET,
        PUSHSVC_PORT=str(port),
        PUSHSVC_NODE_NAME="doomed",
        PUSHSVC_LOG_LEVEL="warning",
        PUSHSVC_MAX_CONNECTIONS_PER_USER="100",
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
        url = f"ws://127.0.0.1:{port}/ws"
        clients = [await WSClient.connect(url, one.token(f"z{i % 5}")) for i in range(50)]
        for i, c in enumerate(clients):
            await c.subscribe(lonely if i % 2 else shared)
        survivor = await one.client(one.token("stays"))
        await survivor.subscribe(shared)
        ids = {c.welcome["client"] for c in clients}

        def subscribed() -> int:
            return sum(e["type"] == "subscribe" and e["client"] in ids for e in recorder.events)

        await until(lambda: subscribed() == 50)
        await asyncio.sleep(0.5)  # the records and occupancy are written (core publishes)

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()

        def lost() -> list[dict[str, Any]]:
            return [e for e in recorder.events if e["type"] == "disconnect" and e["client"] in ids]

        await until(lambda: len(lost()) == 50, within=20)
        took = time.monotonic() - killed
        print(f"50 node_lost disconnects {took:.1f} s after the SIGKILL")
        assert took < 6 + 6  # the registry entry's TTL (6 s) plus a few seconds
        assert all(e["reason"] == "node_lost" and e["code"] == 1006 for e in lost())
        assert {e["node"] for e in lost()} == {"doomed"}
        await until(lambda: len(recorder.on(lonely, "vacated")) == 1)
        await asyncio.sleep(2)  # nothing more comes: once each
        assert len(lost()) == 50 and {e["client"] for e in lost()} == ids
        assert len(recorder.on(lonely, "vacated")) == 1
        assert recorder.on(shared, "vacated") == []  # the survivor still holds it
        await survivor.close()
        await until(lambda: len(recorder.on(shared, "vacated")) == 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def test_a_consumer_that_was_down_catches_up_from_the_stream(cluster, nc, room):
    one, _ = cluster
    c = await one.client(one.token("gil"))
    client = c.welcome["client"]
    await c.subscribe(room)
    await c.close()
    js = nc.jetstream()
    # a consumer that starts now reads what happened while it was not there
    seen: list[str] = []
    psub = await js.pull_subscribe(f"{PREFIX}-events.>", stream=f"EVENTS_{TAG}")

    async def all_there() -> bool:
        try:
            for msg in await psub.fetch(100, timeout=0.5):
                event = json.loads(msg.data)
                if event.get("client") == client:
                    seen.append(event["type"])
                await msg.ack()
        except TimeoutError:
            pass
        return len(seen) >= 4

    await until(all_there, within=10)
    assert seen == EXPECTED


async def test_a_node_watching_for_lost_nodes_stops_without_an_error(nats_url):
    """The expiry fetch that the stop cancels leaves nothing in its inbox for the
    NATS drain to wait on: no drain timeout, no ERROR from nats-py's drain."""
    node = await launch(nats_url, node_name="three", **SETTINGS)
    await asyncio.sleep(1.5)  # the 1 s expiry fetches have been answered at least once
    with LogCapture().installed(logging.WARNING) as logs:
        await node.stop()
        gc.collect()  # asyncio reports a never-retrieved exception when it is freed
    assert "ERROR" not in logs.text, logs.text
    assert "Traceback" not in logs.text, logs.text
