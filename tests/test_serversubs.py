"""Server-side subscriptions: the token's ``subs`` claim, the auth frame's ``subs``
resume map and ``PUSHSVC_AUTO_SUBSCRIBE_PERSONAL``. Real NATS, real sockets."""

from __future__ import annotations

import json
import uuid
from typing import Any

from wsclient import WSClient


def tok(srv: Any, sub: str, **claims: Any) -> str:
    return srv.token(sub, channels=[], extra=claims or None)


async def hello(srv: Any, token: str, subs: dict[str, Any] | None = None) -> WSClient:
    """Connect with an auth frame carrying ``subs`` (the resume map); await welcome."""
    c = await WSClient.connect(srv.ws_url)
    frame: dict[str, Any] = {"op": "auth", "token": token}
    if subs is not None:
        frame["subs"] = subs
    await c.send(frame)
    c.welcome = await c.expect("welcome")
    return c


async def test_subs_claim_subscribes_without_asking_and_resumes(start_server, nc):
    srv = await start_server()
    news, tag = f"news{uuid.uuid4().hex[:8]}", f"alerts{uuid.uuid4().hex[:8]}"
    alerts, eu = f"{tag}.*", f"{tag}.eu"  # a pattern, and one of its channels
    token = tok(srv, "alice", subs=[news, alerts])
    c = await hello(srv, token)
    assert c.welcome["subs"] == [news, alerts]
    await c.expect("subscribed", channel=news)
    await c.expect("subscribed", channel=alerts)
    await nc.publish(f"push.{news}", b'{"n":1}')
    await nc.publish(f"push.{eu}", b'{"n":2}')
    got = await c.messages(2)
    assert [(m["channel"], m["data"]["n"]) for m in got] == [(news, 1), (eu, 2)]
    assert got[1]["pattern"] == alerts
    last = {m.get("pattern", m["channel"]): m["seq"] for m in got}
    await c.close()

    for n in range(3, 9):  # missed while away, on both subscriptions
        await nc.publish(f"push.{news if n % 2 else eu}", json.dumps({"n": n}).encode())
    await nc.flush()

    c = await hello(srv, token, {news: {"since": last[news]}, alerts: {"since": last[alerts]}})
    await c.expect("subscribed", channel=news, recovered=True)
    replay_news = await c.messages(3)
    await c.expect("subscribed", channel=alerts, recovered=True)
    replay_alerts = await c.messages(3)
    assert [m["data"]["n"] for m in replay_news] == [3, 5, 7]
    assert [(m["channel"], m["data"]["n"]) for m in replay_alerts] == [(eu, 4), (eu, 6), (eu, 8)]
    # a server-side subscription is an ordinary one: the client may leave it
    await c.send({"op": "unsubscribe", "channel": news})
    await c.expect("unsubscribed", channel=news)
    await nc.publish(f"push.{news}", b'{"n":9}')
    await nc.publish(f"push.{eu}", b'{"n":10}')
    (m,) = await c.messages(1)
    assert m["channel"] == eu


async def test_token_without_subs_gets_no_subs_field(start_server):
    srv = await start_server()
    c = await srv.client()
    assert "subs" not in c.welcome
    await c.nothing(0.3)


async def test_auto_subscribe_personal(start_server, nc):
    srv = await start_server(auto_subscribe_personal=True)
    user = f"u{uuid.uuid4().hex[:8]}"
    c = await srv.client(tok(srv, user))
    assert c.welcome["subs"] == [f"user.{user}"]
    await c.expect("subscribed", channel=f"user.{user}")
    await nc.publish(f"push.user.{user}", b'"psst"')
    (m,) = await c.messages(1)
    assert m == {"type": "message", "channel": f"user.{user}", "data": "psst", "seq": m["seq"]}


async def test_server_subs_over_the_limit_are_refused_by_name(start_server):
    srv = await start_server(max_subscriptions=2)
    chans = [f"c{uuid.uuid4().hex[:6]}.{i}" for i in range(3)]
    c = await srv.client(tok(srv, "bob", subs=chans))
    await c.expect("subscribed", channel=chans[0])
    await c.expect("subscribed", channel=chans[1])
    err = await c.expect("error", code="limit_exceeded")
    assert chans[2] in err["message"]


async def test_subs_pattern_refused_when_wildcards_are_off(start_server):
    srv = await start_server(wildcard_subscriptions=False)
    c = await srv.client(tok(srv, "eve", subs=["orders.*", "news"]))
    err = await c.expect("error", code="invalid_channel")
    assert "orders.*" in err["message"]
    await c.expect("subscribed", channel="news")


async def test_subs_resume_with_epoch(start_server, nc):
    """The resume map carries the epoch as ``subscribe`` does: the current epoch resumes,
    another epoch is answered recovered: false with everything the stream holds."""
    srv = await start_server()
    news = f"news{uuid.uuid4().hex[:8]}"
    token = tok(srv, "gus", subs=[news])
    c = await hello(srv, token)
    epoch = c.welcome["epoch"]
    await c.expect("subscribed", channel=news, epoch=epoch)
    await nc.publish(f"push.{news}", b"1")
    (m,) = await c.messages(1)
    await c.close()
    await nc.publish(f"push.{news}", b"2")
    await nc.flush()

    c = await hello(srv, token, {news: {"since": m["seq"], "epoch": epoch}})
    await c.expect("subscribed", channel=news, recovered=True, epoch=epoch)
    assert [x["data"] for x in await c.messages(1)] == [2]
    await c.close()

    c = await hello(srv, token, {news: {"since": m["seq"], "epoch": "0ld"}})
    await c.expect("subscribed", channel=news, recovered=False, epoch=epoch)
    assert [x["data"] for x in await c.messages(2)] == [1, 2]
