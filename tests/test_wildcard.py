"""Wildcard subscriptions (``orders.*``, ``orders.>``): grants, delivery with the concrete
channel and ``pattern``, resume with ``since``, one NATS subscription per pattern."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any


def fresh() -> str:
    return f"o{uuid.uuid4().hex[:8]}"


def nats_subs(srv: Any, subject: str) -> int:
    """NATS subscriptions the node's connection holds on ``subject``."""
    return sum(1 for s in srv.node.bus.nc._subs.values() if s.subject == subject)


async def test_pattern_delivers_matching_channels_with_their_name(start_server, nc):
    srv = await start_server()
    orders = fresh()
    c = await srv.client(srv.token("alice", channels=[f"{orders}.>"]))
    await c.subscribe(f"{orders}.*")
    await nc.publish(f"push.{orders}.eu", b'{"n":1}')
    await nc.publish(f"push.{orders}.eu.x", b'{"n":2}')  # two tokens deeper: not matched
    await nc.publish(f"push.{orders}.us", b'{"n":3}')
    got = await c.messages(2)
    assert [(m["channel"], m["pattern"], m["data"]["n"]) for m in got] == [
        (f"{orders}.eu", f"{orders}.*", 1),
        (f"{orders}.us", f"{orders}.*", 3),
    ]
    await c.nothing(0.3)

    # holding the pattern and one of its channels: that channel's message arrives twice,
    # once per subscription, told apart by ``pattern``
    await c.subscribe(f"{orders}.eu")
    await nc.publish(f"push.{orders}.eu", b'{"n":4}')
    twice = await c.messages(2)
    assert sorted(m.get("pattern", "") for m in twice) == ["", f"{orders}.*"]
    assert {m["seq"] for m in twice} == {twice[0]["seq"]}

    await c.send({"op": "unsubscribe", "channel": f"{orders}.*", "id": 1})
    await c.expect("unsubscribed", channel=f"{orders}.*", id=1)
    await nc.publish(f"push.{orders}.us", b'{"n":5}')
    await nc.publish(f"push.{orders}.eu", b'{"n":6}')
    (m,) = await c.messages(1)
    assert m["data"]["n"] == 6 and "pattern" not in m


async def test_grant_must_cover_the_whole_pattern(start_server):
    srv = await start_server()
    orders = fresh()
    c = await srv.client(srv.token("bob", channels=[f"{orders}.eu", f"{orders}.*"]))
    for i, pattern in enumerate((f"{orders}.>", f"{orders}.*.x", ">")):
        await c.send({"op": "subscribe", "channel": pattern, "id": i})
        await c.expect("error", code="forbidden", id=i)
    narrow = await srv.client(srv.token("carl", channels=[f"{orders}.eu"]))
    await narrow.send({"op": "subscribe", "channel": f"{orders}.*", "id": 9})
    await narrow.expect("error", code="forbidden", id=9)
    await c.subscribe(f"{orders}.*")  # covered by the grant orders.*


async def test_wildcards_can_be_turned_off(start_server):
    srv = await start_server(wildcard_subscriptions=False)
    c = await srv.client()
    await c.send({"op": "subscribe", "channel": "orders.*", "id": 1})
    err = await c.expect("error", code="invalid_channel", id=1)
    assert "wildcard" in err["message"]


async def test_pattern_resume_replays_missed_messages_in_stream_order(start_server, nc):
    srv = await start_server()
    orders = fresh()
    token = srv.token("dora", channels=[f"{orders}.>"])
    c = await srv.client(token)
    await c.subscribe(f"{orders}.*")
    await nc.publish(f"push.{orders}.eu", b'{"n":-1}')
    (first,) = await c.messages(1)
    await c.close()

    regions = ("eu", "us", "asia")
    sent = []
    for n in range(50):
        region = regions[n % 3]
        ack = await nc.jetstream().publish(
            f"push.{orders}.{region}", json.dumps({"n": n}).encode(), stream="PUSHSVC"
        )
        sent.append((ack.seq, f"{orders}.{region}", n))
    await nc.publish(f"push.{orders}.eu.deep", b'{"n":999}')  # not part of the pattern

    c = await srv.client(token)
    await c.subscribe(f"{orders}.*", since=first["seq"], recovered=True)
    got = await c.messages(50)
    assert [(m["seq"], m["channel"], m["data"]["n"]) for m in got] == sent
    assert all(m["pattern"] == f"{orders}.*" for m in got)
    # then live, seamlessly
    await nc.publish(f"push.{orders}.us", b'{"n":50}')
    (live,) = await c.messages(1)
    assert live["data"]["n"] == 50 and live["seq"] > sent[-1][0]
    await c.nothing(0.3)


async def test_one_nats_subscription_per_pattern(start_server, nc):
    srv = await start_server()
    orders = fresh()
    clients = [await srv.client(srv.token(f"u{i}", channels=[f"{orders}.>"])) for i in range(3)]
    for c in clients:
        await c.subscribe(f"{orders}.>")
    await clients[0].subscribe(f"{orders}.*")
    assert nats_subs(srv, f"push-live.{orders}.>") == 1
    assert nats_subs(srv, f"push-live.{orders}.*") == 1
    await nc.publish(f"push.{orders}.a.b", b"1")
    for c in clients:
        (m,) = await c.messages(1)
        assert m["channel"] == f"{orders}.a.b" and m["pattern"] == f"{orders}.>"
    for c in clients:
        await c.close()
    await srv.node.hub.wait_idle()
    for _ in range(50):
        if nats_subs(srv, f"push-live.{orders}.>") == 0:
            break
        await asyncio.sleep(0.05)
    assert nats_subs(srv, f"push-live.{orders}.>") == 0
    assert nats_subs(srv, f"push-live.{orders}.*") == 0


async def test_pattern_never_delivers_other_users_personal_channels(start_server, nc):
    srv = await start_server()
    c = await srv.client(srv.token("mallory", channels=[">"]))
    await c.subscribe("*.*")
    await nc.publish("push.user.bob", b'"private"')
    tag = fresh()
    await nc.publish(f"push.{tag}.x", b'"public"')
    (m,) = await c.messages(1)
    assert m["channel"] == f"{tag}.x"
    await c.nothing(0.3)


async def test_pattern_resume_beyond_one_read_says_not_recovered(start_server, nc):
    suffix = uuid.uuid4().hex[:8]
    prefix, stream = f"wc{suffix}", f"WC_{suffix}"
    srv = await start_server(subject_prefix=prefix, stream=stream, history_size=5)
    token = srv.token("fay", channels=["o.>"])
    c = await srv.client(token)
    await c.subscribe("o.*")
    await nc.publish(f"{prefix}.o.a", b"0")
    (first,) = await c.messages(1)
    await c.close()
    for n in range(12):  # 4 per channel: under the per-channel cap, over one read
        await nc.publish(f"{prefix}.o.{'abc'[n % 3]}", str(n + 1).encode())
    await nc.flush()
    c = await srv.client(token)
    await c.subscribe("o.*", since=first["seq"], recovered=False)
    got = await c.messages(5)
    assert [m["data"] for m in got] == [1, 2, 3, 4, 5]
