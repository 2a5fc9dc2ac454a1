"""Limits over real sockets: command and emit rate limits, connection and subscription caps.

Limits are configured small so floods are short. Each test checks the exact
error code, close code or HTTP status, and that a well-behaved client
(:class:`hostile.Bystander`) connected during the flood is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import websockets
from hostile import Bystander
from wsclient import WSClient


async def _answers(c: WSClient, n: int) -> list[dict]:
    return [await c.recv() for _ in range(n)]


async def test_command_bucket_is_shared_by_all_sockets_of_a_user(start_server, nc):
    srv = await start_server(command_rate=1, command_burst=10, rate_limit_strikes=100)
    bystander = await Bystander.join(srv)
    token = srv.token("mallory")
    sockets = [await srv.client(token) for _ in range(3)]
    for i in range(4):  # 12 commands over 3 sockets: the user's burst is 10
        for c in sockets:
            await c.send({"op": "unsubscribe", "channel": "x.y", "id": i})
    answers = [f for c in sockets for f in await _answers(c, 4)]
    ok = [f for f in answers if f["type"] == "unsubscribed"]
    limited = [f for f in answers if f["type"] == "error"]
    assert len(ok) == 10 and len(limited) == 2, answers
    for f in limited:
        assert f["code"] == "rate_limited"
        assert 0 < f["retry_after"] <= 1.0
    # another user is not affected
    other = await srv.client(srv.token("trent"))
    await other.send({"op": "unsubscribe", "channel": "x.y", "id": 1})
    await other.expect("unsubscribed", id=1)
    # tokens come back at command_rate per second
    await asyncio.sleep(1.1)
    await sockets[0].send({"op": "unsubscribe", "channel": "x.y", "id": "later"})
    await sockets[0].expect("unsubscribed", id="later")
    await bystander.still_served(nc)


async def test_flood_is_closed_4008_after_strikes(start_server, nc):
    srv = await start_server(command_rate=5, command_burst=5, rate_limit_strikes=3)
    bystander = await Bystander.join(srv)
    token = srv.token("mallory")
    flooder, calm = await srv.client(token), await srv.client(token)
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(20):  # a client that ignores retry_after and keeps going
            await flooder.send({"op": "unsubscribe", "channel": "x.y"})
            frames.append(await flooder.recv())
    assert flooder.ws.close_code == 4008
    assert flooder.ws.close_reason == "rate limit exceeded repeatedly"
    assert [f["type"] for f in frames] == ["unsubscribed"] * 5 + ["error"] * 3
    assert all(f["code"] == "rate_limited" and f["retry_after"] > 0 for f in frames[5:])
    # the user's other socket got no strike from the flood and is not closed
    await asyncio.sleep(0.3)
    await calm.send({"op": "subscribe", "channel": "calm.x", "id": 1})
    await calm.expect("subscribed", id=1)
    await nc.publish("push.calm.x", b"1")
    assert (await calm.messages(1))[0]["data"] == 1
    await bystander.still_served(nc)


async def test_malformed_frames_count_against_the_limit(start_server, nc):
    srv = await start_server(command_rate=1, command_burst=3, rate_limit_strikes=2)
    bystander = await Bystander.join(srv)
    c = await srv.client(srv.token("mallory"))
    with contextlib.suppress(websockets.ConnectionClosed):
        for frame in ("junk", "[]", '{"op":"nope"}', "{", b"\x00", "junk", "junk"):
            await c.ws.send(frame)
            await c.expect("error", code="bad_request")
            if frame in ("{", b"\x00"):  # 4th and 5th: over the burst of 3
                await c.expect("error", code="rate_limited")
    assert await c.closed() == 4008
    # the 6th frame was the 3rd refusal in a row: closed instead of a 3rd rate_limited
    assert [f.get("code") for f in c.frames[1:]] == ["bad_request"] * 4 + [
        "rate_limited",
        "bad_request",
        "rate_limited",
    ]
    # unsolicited pongs are not free either
    c = await srv.client(srv.token("eve"))
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(10):
            await c.send({"op": "pong"})
            await asyncio.sleep(0.01)
    assert await c.closed() == 4008
    await bystander.still_served(nc)


async def test_connections_per_user(start_server, nc):
    srv = await start_server(max_connections_per_user=2)
    bystander = await Bystander.join(srv)
    token = srv.token("mallory")
    first, second = await srv.client(token), await srv.client(token)
    # handshake token: refused before accept with 429
    for kwargs in (
        {"uri": f"{srv.ws_url}?token={token}"},
        {"uri": srv.ws_url, "additional_headers": {"Authorization": f"Bearer {token}"}},
    ):
        with pytest.raises(websockets.InvalidStatus) as info:
            await WSClient.connect(kwargs.pop("uri"), **kwargs)
        assert info.value.response.status_code == 429
    # auth frame: accepted, then closed 4008 with a reason
    third = await WSClient.connect(srv.ws_url)
    await third.send({"op": "auth", "token": token})
    assert await third.closed() == 4008
    assert third.ws.close_reason == "too many connections for this user"
    # another user is not affected; a closed socket frees its slot
    await srv.client(srv.token("trent"))
    await first.close()
    for _ in range(50):
        if srv.node.hub.user_connections("mallory") < 2:
            break
        await asyncio.sleep(0.02)
    again = await srv.client(token)
    assert again.welcome["user"] == "mallory"
    await second.subscribe("m.x")
    await bystander.still_served(nc)


async def test_parallel_handshakes_cannot_overshoot_the_user_cap(start_server, nc):
    srv = await start_server(max_connections_per_user=3)
    bystander = await Bystander.join(srv)
    token = srv.token("mallory")

    async def attempt(i: int) -> int:
        try:
            if i % 2:
                c = await WSClient.connect(f"{srv.ws_url}?token={token}")
                await c.expect("welcome")
            else:
                c = await WSClient.connect(srv.ws_url, token)
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else -1
        try:
            await c.nothing(0.3)
        except (websockets.ConnectionClosed, AssertionError):
            return c.ws.close_code or -1
        return 101

    results = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert results.count(101) == 3, results
    assert set(results) <= {101, 429, 4008}, results
    assert srv.node.hub.user_connections("mallory") == 3
    await bystander.still_served(nc)


async def test_subscriptions_per_connection(start_server, nc):
    srv = await start_server(max_subscriptions=3)
    bystander = await Bystander.join(srv)
    c = await srv.client(srv.token("mallory"))
    for i in range(3):
        await c.subscribe(f"s.{i}")
    await c.send({"op": "subscribe", "channel": "s.3", "id": "over"})
    err = await c.expect("error", code="limit_exceeded", id="over")
    assert "3" in err["message"]
    await c.send({"op": "unsubscribe", "channel": "s.0", "id": 1})
    await c.expect("unsubscribed", id=1)
    await c.subscribe("s.3")
    # the limit is per connection: another socket of the same user has its own
    d = await srv.client(srv.token("mallory"))
    await d.subscribe("s.9")
    await nc.publish("push.s.3", b"1")
    assert (await c.messages(1))[0]["data"] == 1
    await bystander.still_served(nc)


async def test_global_connection_cap_counts_unauthenticated_sockets(start_server, nc, http):
    srv = await start_server(max_connections=3, auth_timeout=1.0)
    bystander = await Bystander.join(srv)
    idle = [await websockets.connect(srv.ws_url, compression=None) for _ in range(2)]
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, srv.token("late"))
    assert info.value.response.status_code == 503
    assert info.value.response.headers.get("Retry-After")
    # a burst of refused handshakes does not take the server down
    for _ in range(20):
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(srv.ws_url, compression=None)
    r = await http.get(f"{srv.base}/readyz")
    assert r.status_code == 200
    await bystander.still_served(nc)
    for ws in idle:  # closed 4001 at the auth timeout, freeing their places
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == 4001
    await asyncio.sleep(0.1)
    late = await srv.client(srv.token("late"))
    assert late.welcome["user"] == "late"


async def test_emit_rate_limit_429_with_retry_after(start_server, nc, http, channel):
    srv = await start_server(emit_rate=1, emit_burst=2)
    bystander = await Bystander.join(srv)
    headers = {"Authorization": f"Bearer {srv.token('svc', publish=['>'])}"}
    other = {"Authorization": f"Bearer {srv.token('svc2', publish=['>'])}"}
    url = f"{srv.base}/emit"
    body = {"channel": channel, "data": 1}
    statuses = [(await http.post(url, json=body, headers=headers)).status_code for _ in range(2)]
    assert statuses == [202, 202]
    r = await http.post(url, json=body, headers=headers)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"] == "rate_limited"
    r = await http.post(f"{url}/{channel}", content=b"1", headers=headers)
    assert r.status_code == 429  # one bucket per principal, across both routes
    assert (await http.post(url, json=body, headers=other)).status_code == 202
    await bystander.still_served(nc)


async def test_emit_body_size_413_also_chunked(start_server, nc, http, channel):
    srv = await start_server(max_emit_bytes=1024)
    bystander = await Bystander.join(srv)
    headers = {"Authorization": f"Bearer {srv.token('svc', publish=['>'])}"}
    url = f"{srv.base}/emit"
    ok = json.dumps({"channel": channel, "data": "x" * 900}).encode()
    assert (await http.post(url, content=ok, headers=headers)).status_code == 202
    big = json.dumps({"channel": channel, "data": "x" * 2000}).encode()
    r = await http.post(url, content=big, headers=headers)
    assert r.status_code == 413

    async def chunks():
        for _ in range(64):
            yield b"x" * 256

    r = await http.post(f"{url}/{channel}", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert "content-length" not in {k.lower() for k in r.request.headers}
    r = await http.post(url, content=chunks(), headers=headers)
    assert r.status_code == 413
    await bystander.still_served(nc)
