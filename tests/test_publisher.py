"""Who published (issue 22 §2): the server stamps ``publisher`` {user, client} from the
verified token, in delivered frames, history reads and the NATS headers.

Real nats-server, real uvicorn, real WebSocket and HTTP clients.
"""

from __future__ import annotations

import asyncio
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
