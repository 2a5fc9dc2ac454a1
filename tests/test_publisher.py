"""Who published (issue 22 §2): the server stamps ``publisher`` {user, client} from the
verified token, in delivered frames, history reads and the NATS headers.

Real nats-server, real uvicorn, real WebSocket and HTTP clients.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_client_publish_is_stamped_in_frames_history_and_nats_headers(
    start_server, nc, http, channel
):
    srv = await start_server()
    seen: asyncio.Queue[Any] = asyncio.Queue()
    await nc.subscribe(f"push.{channel}", cb=seen.put)
    await nc.flush()
    reader = await srv.client(srv.token("bob", channels=[channel]))
    await reader.subscribe(channel)
    watcher = await srv.client(srv.token("carol", channels=[channel.split(".")[0] + ".*"]))
    await watcher.subscribe(channel.split(".")[0] + ".*")
    alice = await srv.client(srv.token("alice", channels=[], publish=[channel]))
    me = alice.welcome["client"]

    # the client's own "publisher" in data is just data: the stamp is the server's
    forged = {"text": "hi", "publisher": {"user": "admin", "client": "x"}}
    await alice.send({"op": "publish", "channel": channel, "data": forged, "id": 1})
    seq = (await alice.expect("published", id=1))["seq"]
    (message,) = await reader.messages(1)
    assert message["publisher"] == {"user": "alice", "client": me}
    assert message["data"] == forged and message["seq"] == seq
    (via_pattern,) = await watcher.messages(1)
    assert via_pattern["publisher"] == {"user": "alice", "client": me}
    assert via_pattern["pattern"] == channel.split(".")[0] + ".*"

    msg = await asyncio.wait_for(seen.get(), 5)
    assert (msg.headers["Pushsvc-User"], msg.headers["Pushsvc-Client"]) == ("alice", me)

    # history: GET /history and a resume with since
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token("bob")))
    assert r.status_code == 200, r.text
    (item,) = r.json()["messages"]
    assert item["publisher"] == {"user": "alice", "client": me} and item["seq"] == seq
    late = await srv.client(srv.token("dave", channels=[channel]))
    await late.subscribe(channel, since=0, recovered=True)
    (replayed,) = await late.messages(1)
    assert replayed["publisher"] == {"user": "alice", "client": me}

    # a plain NATS producer stamps nothing (and is trusted with what it sets)
    await nc.publish(f"push.{channel}", b'{"from":"backend"}')
    (plain,) = await reader.messages(1)
    assert plain["data"] == {"from": "backend"} and "publisher" not in plain


async def test_emits_by_jwt_carry_sub_and_by_api_key_none(start_server, http, channel):
    srv = await start_server(api_keys=["billing:k-abcdef123"])
    reader = await srv.client()
    await reader.subscribe(channel)
    token = srv.token("svc-orders", publish=[channel])
    r = await http.post(
        f"{srv.base}/emit", json={"channel": channel, "data": 1}, headers=bearer(token)
    )
    assert r.status_code == 202, r.text
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"2", headers=bearer(token))
    assert r.status_code == 202, r.text
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"3", headers=bearer("k-abcdef123"))
    assert r.status_code == 202, r.text
    one, two, three = await reader.messages(3)
    assert one["publisher"] == {"user": "svc-orders"} == two["publisher"]
    assert "publisher" not in three


async def test_stamp_with_history_off(start_server, channel):
    srv = await start_server(history_ttl=0)
    reader = await srv.client()
    await reader.subscribe(channel)
    alice = await srv.client(srv.token("alice", publish=[channel]))
    await alice.send({"op": "publish", "channel": channel, "data": "x", "id": 1})
    await alice.expect("published", id=1)
    (message,) = await reader.messages(1)
    assert message["publisher"] == {"user": "alice", "client": alice.welcome["client"]}
    assert "seq" not in message


async def test_publish_without_echo_skips_only_the_publishing_connection(
    start_server, nc, http, channel
):
    srv = await start_server()
    token = srv.token("alice", channels=[channel], publish=[channel])
    tab1, tab2 = await srv.client(token), await srv.client(token)
    bob = await srv.client(srv.token("bob", channels=[channel]))
    for c in (tab1, tab2, bob):
        await c.subscribe(channel)

    await tab1.send({"op": "publish", "channel": channel, "data": 1, "echo": False, "id": 1})
    seq = (await tab1.expect("published", id=1))["seq"]
    for c in (tab2, bob):  # the same user's other tab gets it too
        (m,) = await c.messages(1)
        assert (m["data"], m["seq"]) == (1, seq)
    await tab1.send({"op": "publish", "channel": channel, "data": 2, "id": 2})
    got = sorted([await tab1.recv(), await tab1.recv()], key=lambda f: f["type"])
    assert [f["type"] for f in got] == ["message", "published"]  # in either order
    assert got[0]["data"] == 2  # message 1 never came; echo is back to normal

    # history keeps it (a resumed connection has a new id: skipping it is the client's job)
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(token))
    assert [m["data"] for m in r.json()["messages"]] == [1, 2]


async def test_exclude_by_nats_header_and_emit_mid_batch(start_server, nc, http, channel):
    srv = await start_server(api_keys=["k-exclude-1234"])
    a = await srv.client()
    b = await srv.client()
    pattern = channel.split(".")[0] + ".>"
    p = await srv.client()
    for c, ch in ((a, channel), (b, channel), (p, pattern)):
        await c.subscribe(ch)
    me = a.welcome["client"]
    # three messages in one NATS read: the middle one names a (one batch, one skip)
    await nc.publish(f"push.{channel}", b"1")
    await nc.publish(f"push.{channel}", b"2", headers={"Pushsvc-Exclude-Client": me})
    await nc.publish(f"push.{channel}", b"3")
    await nc.flush()
    assert [m["data"] for m in await a.messages(2)] == [1, 3]
    assert [m["data"] for m in await b.messages(3)] == [1, 2, 3]
    assert [m["data"] for m in await p.messages(3)] == [1, 2, 3]
    # excluding p's client skips its pattern delivery too
    await nc.publish(
        f"push.{channel}", b"4", headers={"Pushsvc-Exclude-Client": p.welcome["client"]}
    )
    await nc.publish(f"push.{channel}", b"5")
    assert [m["data"] for m in await p.messages(1)] == [5]

    key = bearer("k-exclude-1234")
    r = await http.post(
        f"{srv.base}/emit", json={"channel": channel, "data": 6, "exclude_client": me}, headers=key
    )
    assert r.status_code == 202, r.text
    r = await http.post(
        f"{srv.base}/emit/{channel}", content=b"7", headers={**key, "Pushsvc-Exclude-Client": me}
    )
    assert r.status_code == 202, r.text
    batch = {"messages": [{"channel": channel, "data": 8}, {"channel": channel, "data": 9}]}
    r = await http.post(
        f"{srv.base}/emit", json=batch, headers={**key, "Pushsvc-Exclude-Client": me}
    )
    assert r.status_code == 202, r.text
    await nc.publish(f"push.{channel}", b"10")
    assert [m["data"] for m in await a.messages(3)] == [4, 5, 10]
    assert [m["data"] for m in await b.messages(7)] == [4, 5, 6, 7, 8, 9, 10]
    r = await http.post(
        f"{srv.base}/emit",
        json={"channel": channel, "data": 0, "exclude_client": "a b"},
        headers=key,
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


async def test_echo_false_over_sse(start_server, http, channel):
    from test_sse import sse

    srv = await start_server()
    token = srv.token("erin", channels=[channel], publish=[channel])
    ws = await srv.client(token)
    await ws.subscribe(channel)
    async with sse(srv.base, channel, token=token) as events:
        session = (await events.next("welcome"))["data"]["session"]
        await events.next("subscribed")
        commands = [
            {"op": "publish", "channel": channel, "data": "quiet", "echo": False, "id": 1},
            {"op": "publish", "channel": channel, "data": "loud", "id": 2},
        ]
        posted = await http.post(
            srv.base + "/sse/commands", json={"session": session, "commands": commands}
        )
        assert posted.status_code == 202, posted.text
        assert (await events.next("message"))["data"]["data"] == "loud"
    assert [m["data"] for m in await ws.messages(2)] == ["quiet", "loud"]


async def test_hub_skips_excluded_frames_inside_one_batch():
    """The hub's batch path: skipped frames with late joiners and a leave mid-batch."""
    from test_fanout import _FakeSession, _StubBus

    from pushsvc.core.hub import Hub

    hub = Hub(_StubBus())  # type: ignore[arg-type]
    s1, s2, s3 = (_FakeSession(hub, name) for name in ("s1", "s2", "s3"))
    for s in (s1, s2):
        hub.add_client(s)  # type: ignore[arg-type]
        await hub.subscribe(s, "room", None, None)  # type: ignore[arg-type]
    hub.add_client(s3)  # type: ignore[arg-type]
    skip = "Pushsvc-Exclude-Client"
    hub.dispatch("room", b"1", None)
    hub.dispatch("room", b"2", None, None, {skip: "s1"})
    await hub.subscribe(s3, "room", None, None)  # type: ignore[arg-type]  # joins mid-batch
    hub.dispatch("room", b"3", None, None, {skip: "s3"})
    hub.dispatch("room", b"4", None, None, {skip: "nobody-here"})
    await asyncio.sleep(0)

    def data(s: Any) -> list[Any]:
        return [json.loads(line)["data"] for text in s.got for line in text.split("\n")]

    assert (data(s1), data(s2), data(s3)) == ([1, 3, 4], [1, 2, 3, 4], [4])
    for s in (s1, s2, s3):
        s.got.clear()
    hub.dispatch("room", b"5", None, None, {skip: "s1"})
    hub.dispatch("room", b"6", None)
    hub.unsubscribe(s1, "room")  # type: ignore[arg-type]  # owed the batch, less its skip
    await asyncio.sleep(0)
    assert (data(s1), data(s2), data(s3)) == ([6], [5, 6], [5, 6])
    await hub.wait_idle()


async def test_python_client_publisher_echo_false_and_resume(start_server, nats_url, channel):
    """pushsvc.client: ``Message.publisher``; ``publish(echo=False)`` is neither delivered
    back nor replayed by the resume after a server restart (a new client id)."""
    from helpers import until

    from pushsvc import Publisher
    from pushsvc.client import Client

    srv = await start_server()
    port = srv.settings.port
    token = srv.token("ann", channels=[channel], publish=[channel])
    async with Client(srv.base, token=token) as client, Publisher(nats_url) as pub:
        sub = await client.subscribe(channel)
        await pub.publish(channel, {"n": 1})
        first = await asyncio.wait_for(sub.__anext__(), 10)
        assert first.publisher is None
        own = await client.publish(channel, {"n": 2}, echo=False)
        assert own is not None and sub.own == {own}
        await srv.stop()  # 1012: the client reconnects and resumes from seq 1
        await until(lambda: client.state == "connecting")
        await start_server(port=port)
        await pub.publish(channel, {"n": 3})
        third = await asyncio.wait_for(sub.__anext__(), 60)
        assert third.data == {"n": 3} and sub.duplicates == 1 and not sub.own
        await client.publish(channel, {"n": 4})
        fourth = await asyncio.wait_for(sub.__anext__(), 10)
        assert fourth.data == {"n": 4} and fourth.publisher is not None
        assert fourth.publisher.user == "ann"
        assert fourth.to_frame()["publisher"] == {"user": "ann", "client": fourth.publisher.client}
