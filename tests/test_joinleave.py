"""join/leave events across two pushsvc nodes on one NATS; none where not configured."""

from __future__ import annotations

from typing import Any

from pushsvc.metrics import JOIN_LEAVE_PUBLISHED

EVENTS = {"join_leave_channels": ["*.room"]}


def tok(srv: Any, sub: str, **claims: Any) -> str:
    return srv.token(sub, extra=claims or None)


async def test_join_and_leave_across_nodes_in_order(start_server, channel, nc):
    one = await start_server(**EVENTS)
    two = await start_server(**EVENTS)
    a = await one.client(tok(one, "alice", info={"name": "Alice"}))
    await a.subscribe(channel)
    own = await a.expect("join", channel=channel, client=a.welcome["client"], user="alice")
    assert own["info"] == {"name": "Alice"}

    published = JOIN_LEAVE_PUBLISHED.labels("join")._value.get()
    b = await two.client(tok(two, "bob"))
    await b.subscribe(channel)
    bob = b.welcome["client"]
    await a.expect("join", channel=channel, client=bob, user="bob")
    assert "info" not in a.frames[-1]
    await b.expect("join", channel=channel, client=bob)  # bob hears his own join too

    # c joins and leaves on node two, then b unsubscribes: a sees it all in order
    c = await two.client(tok(two, "carol"))
    await c.subscribe(channel)
    await c.close()
    carol = c.welcome["client"]
    got = [(f["type"], f["client"]) for f in [await a.recv() for _ in range(2)]]
    assert got == [("join", carol), ("leave", carol)]
    await b.send({"op": "unsubscribe", "channel": channel})
    while (await b.recv())["type"] != "unsubscribed":  # (b hears carol come and go)
        pass
    await a.expect("leave", channel=channel, client=bob, user="bob")
    assert JOIN_LEAVE_PUBLISHED.labels("join")._value.get() >= published + 2

    # messages still flow between the events, and events are not in history
    await nc.publish(f"push.{channel}", b'{"n":1}')
    (msg,) = await a.messages(1)
    a2 = await one.client(tok(one, "alice"))
    await a2.subscribe(channel, since=0, recovered=True)
    replay = await a2.recv()
    assert replay["type"] == "message" and replay["seq"] == msg["seq"]
    await a2.expect("join", client=a2.welcome["client"])
    await a.expect("join", client=a2.welcome["client"])


async def test_no_events_for_channels_not_configured(start_server):
    one = await start_server(**EVENTS)
    two = await start_server(**EVENTS)
    a = await one.client()
    await a.subscribe("quiet.lobby")
    b = await two.client(tok(two, "bob"))
    await b.subscribe("quiet.lobby")
    await b.close()
    await a.nothing(0.5)
    assert not one.node.bus.events._subs  # no NATS interest in events at all
