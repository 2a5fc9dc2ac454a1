"""End to end: NATS publish -> pushsvc -> WebSocket clients, over real sockets."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from wsclient import WSClient


async def test_core_publish_reaches_subscriber_only(start_server, nc, channel):
    srv = await start_server()
    alice = await srv.client()
    bob = await srv.client(srv.token("bob"))
    await alice.subscribe(channel)
    for i in range(20):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    got = await alice.messages(20)
    assert [m["data"]["i"] for m in got] == list(range(20))
    assert all(m["channel"] == channel for m in got)
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    await bob.nothing()


async def test_payload_mapping(start_server, nc, channel):
    srv = await start_server()
    c = await srv.client()
    await c.subscribe(channel)
    for payload in (b'{"a": [1, 2]}', b"plain text", b"\xff\x00\x01", b'{\n  "pretty": true\n}'):
        await nc.publish(f"push.{channel}", payload)
    await nc.flush()
    a, text, binary, pretty = await c.messages(4)
    assert a["data"] == {"a": [1, 2]} and "encoding" not in a
    assert text["data"] == "plain text"
    assert binary["encoding"] == "base64" and binary["data"] == "/wAB"
    assert pretty["data"] == {"pretty": True}


async def test_header_and_query_tokens(start_server, nc, channel):
    srv = await start_server()
    token = srv.token("carol")
    by_header = await WSClient.connect(
        srv.ws_url, additional_headers={"Authorization": f"Bearer {token}"}
    )
    by_query = await WSClient.connect(f"{srv.ws_url}?token={token}")
    for c in (by_header, by_query):
        welcome = await c.expect("welcome", user="carol")
        assert welcome["ping_interval"] == srv.settings.ping_interval
        await c.subscribe(channel)
    await nc.publish(f"push.{channel}", b'"hi"')
    for c in (by_header, by_query):
        (m,) = await c.messages(1)
        assert m["data"] == "hi"


async def test_bad_tokens(start_server):
    srv = await start_server()
    expired = srv.token(ttl=-120)  # beyond the 30 s leeway
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(f"{srv.ws_url}?token={expired}")
    assert info.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, additional_headers={"Authorization": "Bearer nope"})
    assert info.value.response.status_code == 403
    c = await WSClient.connect(srv.ws_url)
    await c.send({"op": "auth", "token": expired})
    assert await c.closed() == 4001
    forged = srv.token().rsplit(".", 1)[0] + ".AAAA"
    c = await WSClient.connect(srv.ws_url)
    await c.send({"op": "auth", "token": forged})
    assert await c.closed() == 4001


async def test_grants(start_server, nc):
    srv = await start_server()
    c = await srv.client(srv.token("dave", channels=["chat.*"]))
    await c.subscribe("chat.room1")
    await c.send({"op": "subscribe", "channel": "chat.room1.deep", "id": 1})
    await c.expect("error", code="forbidden", id=1)
    await c.send({"op": "subscribe", "channel": "news", "id": 2})
    await c.expect("error", code="forbidden", id=2)
    await c.subscribe("user.dave")  # personal channel always granted
    await c.send({"op": "subscribe", "channel": "user.erin", "id": 3})
    await c.expect("error", code="forbidden", id=3)
    # wildcard subscriptions (on by default): a grant must cover the whole pattern
    await c.send({"op": "subscribe", "channel": "chat.>", "id": 4})
    await c.expect("error", code="forbidden", id=4)
    for bad in ("chat.*.>.x", "_INBOX.*", "", "a..b", "$SYS.x", "_INBOX.x", "x" * 129, "a b"):
        await c.send({"op": "subscribe", "channel": bad, "id": "b"})
        await c.expect("error", code="invalid_channel", id="b")
    await c.send({"op": "subscribe", "channel": 5})
    await c.expect("error", code="bad_request")
    await nc.publish("push.user.dave", b'{"private": 1}')
    (m,) = await c.messages(1)
    assert m["channel"] == "user.dave"


async def test_unsubscribe_stops_delivery_and_releases_nats(start_server, nc, channel):
    srv = await start_server()
    a = await srv.client()
    b = await srv.client(srv.token("bob"))
    await a.subscribe(channel)
    await b.subscribe(channel)
    bus = srv.node.bus
    assert bus.holds(channel) and bus.live._subs[channel].refs == 2
    await a.send({"op": "unsubscribe", "channel": channel, "id": 7})
    await a.expect("unsubscribed", channel=channel, id=7)
    await nc.publish(f"push.{channel}", b"1")
    await b.messages(1)
    await a.nothing()
    assert bus.holds(channel)
    await b.send({"op": "unsubscribe", "channel": channel})
    await b.expect("unsubscribed")
    await srv.node.hub.wait_idle()
    assert not bus.holds(channel)
    # No subscriber left on this node: NATS has no interest from it.
    assert srv.node.bus.subscription_count == 0


async def test_disconnect_releases_nats_interest(start_server, channel):
    srv = await start_server()
    a = await srv.client()
    await a.subscribe(channel)
    assert srv.node.bus.holds(channel)
    await a.close()
    for _ in range(100):
        await srv.node.hub.wait_idle()
        if not srv.node.bus.holds(channel):
            break
        await asyncio.sleep(0.02)
    assert not srv.node.bus.holds(channel)


async def test_ws_publish(start_server, channel):
    srv = await start_server()
    pub = await srv.client(srv.token("pub", publish=[channel]))
    sub = await srv.client(srv.token("sub"))
    await sub.subscribe(channel)
    await pub.send({"op": "publish", "channel": channel, "data": {"x": 1}, "id": 9})
    answer = await pub.expect("published", id=9)
    (m,) = await sub.messages(1)
    assert m["data"] == {"x": 1} and m["seq"] == answer["seq"]
    await pub.send({"op": "publish", "channel": "other", "data": 1, "id": 10})
    await pub.expect("error", code="forbidden", id=10)


async def test_two_nodes_share_nats(start_server, http, channel):
    a = await start_server()
    b = await start_server()
    client = await b.client()
    await client.subscribe(channel)
    r = await http.post(
        f"{a.base}/emit",
        json={"channel": channel, "data": {"from": "a"}},
        headers={"Authorization": f"Bearer {a.token('svc', publish=['>'])}"},
    )
    assert r.status_code == 202, r.text
    (m,) = await client.messages(1)
    assert m["data"] == {"from": "a"} and m["seq"] == r.json()["seq"]


async def test_history_off_live_only(start_server, nc, channel):
    srv = await start_server(history_ttl=0, subject_prefix="live0")
    c = await srv.client()
    await c.subscribe(channel)
    await nc.publish(f"live0.{channel}", b'"x"')
    (m,) = await c.messages(1)
    assert "seq" not in m
    await c.send({"op": "subscribe", "channel": channel + "2", "since": 5})
    await c.expect("subscribed", recovered=False)
