"""Timers over real sockets: heartbeat (4010), auth timeout, token expiry, refresh, revocation.

Intervals are configured down to 100-300 ms and tokens live 2 s (``jwt_leeway=0``)
so every test is bounded to a few seconds. Each attack test also checks that a
well-behaved client (:class:`hostile.Bystander`, which answers pings) is still
served afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest
import websockets
from hostile import Bystander
from wsclient import WSClient

FAST = {"ping_interval": 0.1, "pong_timeout": 0.3}


async def _raw(url: str, token: str | None = None) -> websockets.ClientConnection:
    """A client that sends the auth frame (if any) and then never answers anything."""
    ws = await websockets.connect(url, compression=None, open_timeout=5)
    if token is not None:
        await ws.send(json.dumps({"op": "auth", "token": token}))
    return ws


async def _close_code(ws: websockets.ClientConnection, timeout: float = 5.0) -> int | None:
    async def drain() -> None:
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code


async def test_ping_pong_keeps_a_client_and_welcome_carries_the_interval(start_server, nc):
    srv = await start_server(**FAST)
    c = await srv.client()  # WSClient answers pings while it reads
    assert c.welcome["ping_interval"] == 0.1
    await c.subscribe("hb.alive")
    deadline = time.monotonic() + 1.0
    with pytest.raises(TimeoutError):  # ~10 pings answered within 1 s, nothing else, no close
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + 1.0):
            await c.recv(timeout=5)
    assert time.monotonic() >= deadline - 0.05
    pings = [f for f in c.frames if f.get("type") == "ping"]
    assert len(pings) >= 5, pings
    await nc.publish("push.hb.alive", b"1")
    assert (await c.messages(1))[0]["data"] == 1


@pytest.mark.parametrize("pong", ['{"op":"pong"}', '{"op": "pong"}'], ids=["canonical", "spaced"])
async def test_one_heartbeat_kind_and_both_pong_paths(start_server, nc, pong):
    # the canonical pong is taken by the WebSocket protocol itself (no ASGI queue), any
    # other spelling by the session's command reader: both keep the client alive, and
    # unsolicited ones cost command tokens on both paths. No RFC 6455 ping ever comes.
    srv = await start_server(**FAST, command_rate=1, command_burst=3, rate_limit_strikes=2)
    bystander = await Bystander.join(srv)
    ws = await _raw(srv.ws_url, srv.token("carol"))
    assert json.loads(await ws.recv())["type"] == "welcome"
    pings = 0
    end = time.monotonic() + 1.0  # ~10 pings, each answered inside the 0.3 s timeout
    while time.monotonic() < end:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 1))
        assert frame == {"type": "ping"}, frame
        pings += 1
        await ws.send(pong)
    assert pings >= 5 and ws.close_code is None
    assert ws.protocol.state is websockets.State.OPEN
    # unsolicited pongs: the burst of 3, then refusals (the 2nd in a row closes 4008)
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(10):
            await ws.send(pong)
            await asyncio.sleep(0.005)
    assert await _close_code(ws) == 4008
    await bystander.still_served(nc)


async def test_silent_client_closed_4010(start_server, nc):
    srv = await start_server(**FAST)
    bystander = await Bystander.join(srv)
    silent = await _raw(srv.ws_url, srv.token("mallory"))
    t0 = time.monotonic()
    assert await _close_code(silent) == 4010
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2.0, elapsed  # first ping at 0.1 s + 0.3 s pong timeout
    assert silent.close_reason == "no pong"
    await bystander.still_served(nc)
    assert bystander.close_code is None


async def test_client_answering_late_is_closed_4010(start_server, nc):
    srv = await start_server(ping_interval=0.2, pong_timeout=0.2)
    bystander = await Bystander.join(srv)
    ws = await _raw(srv.ws_url, srv.token("mallory"))
    assert json.loads(await ws.recv())["type"] == "welcome"
    assert json.loads(await ws.recv())["type"] == "ping"
    await asyncio.sleep(0.4)  # past the pong timeout
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send('{"op":"pong"}')
    assert await _close_code(ws) == 4010
    await bystander.still_served(nc)


async def test_unauthenticated_idle_client_closed_at_auth_timeout(start_server, nc):
    srv = await start_server(auth_timeout=0.3)
    bystander = await Bystander.join(srv)
    t0 = time.monotonic()
    idle = await _raw(srv.ws_url)
    assert await _close_code(idle) == 4001
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert idle.close_reason == "auth timeout"
    # a first frame that is not an auth frame is not a way around it
    for first in ('{"op":"pong"}', '{"op":"subscribe","channel":"a"}', "junk"):
        ws = await _raw(srv.ws_url)
        await ws.send(first)
        assert await _close_code(ws) == 4001
    ws = await _raw(srv.ws_url)
    await ws.send(b"\x00binary")
    assert await _close_code(ws) == 4001
    # uvicorn's protocol-level pings do not count as authentication either
    ws = await _raw(srv.ws_url)
    await ws.ping()
    assert await _close_code(ws) == 4001
    await bystander.still_served(nc)


async def test_token_expiry_without_refresh_closes_4001(start_server, nc):
    srv = await start_server(jwt_leeway=0)
    bystander = await Bystander.join(srv)
    c = await srv.client(srv.token("mallory", ttl=2))
    exp = c.welcome["exp"]
    code = await c.closed(timeout=4)
    assert code == 4001
    assert c.ws.close_reason == "token expired"
    assert time.time() >= exp - 0.05  # not before exp + leeway (0 here)
    assert time.time() < exp + 1.0
    await bystander.still_served(nc)


async def test_refresh_extends_the_session(start_server, nc, channel):
    srv = await start_server(jwt_leeway=0)
    c = await srv.client(srv.token("mallory", ttl=2))
    first_exp = c.welcome["exp"]
    await c.subscribe(channel)
    longer = srv.token("mallory", ttl=60)
    await c.send({"op": "refresh", "token": longer, "id": "r"})
    refreshed = await c.expect("refreshed", id="r")
    assert refreshed["exp"] > first_exp + 50
    await asyncio.sleep(max(0.0, first_exp - time.time()) + 0.5)  # past the old expiry
    await nc.publish(f"push.{channel}", b'"still here"')
    (m,) = await c.messages(1)
    assert m["data"] == "still here"


async def test_refresh_with_another_sub_or_a_bad_token_closes_4001(start_server, nc):
    srv = await start_server(jwt_leeway=0)
    bystander = await Bystander.join(srv)
    for bad in (
        srv.token("bob"),
        srv.token("mallory", ttl=-5),
        srv.token("mallory").rsplit(".", 1)[0] + ".AAAA",
    ):
        c = await srv.client(srv.token("mallory"))
        await c.send({"op": "refresh", "token": bad, "id": 1})
        assert await c.closed() == 4001
    await bystander.still_served(nc)


async def test_refresh_re_evaluates_grants(start_server, nc):
    srv = await start_server()
    c = await srv.client(srv.token("mallory", channels=["a.*", "b.*"]))
    await c.subscribe("a.x")
    await c.subscribe("b.x")
    await c.subscribe("user.mallory")
    await c.send({"op": "refresh", "token": srv.token("mallory", channels=["a.*"]), "id": 9})
    gone = await c.expect("unsubscribed", channel="b.x", reason="forbidden")
    assert "id" not in gone
    await c.expect("refreshed", id=9)
    await nc.publish("push.b.x", b'"no"')
    await nc.publish("push.a.x", b'"yes"')
    await nc.publish("push.user.mallory", b'"mine"')
    first, second = await c.messages(2)
    assert (first["channel"], second["channel"]) == ("a.x", "user.mallory")
    await c.send({"op": "subscribe", "channel": "b.x", "id": 2})
    await c.expect("error", code="forbidden", id=2)


@pytest.mark.parametrize("how", ["jti", "sub"])
async def test_revocation_closes_sessions_on_every_node(start_server, nc, how):
    a = await start_server()
    b = await start_server()
    bystanders = [await Bystander.join(a), await Bystander.join(b)]
    # revocations are stored in the session's shared NATS: names unique to this run
    tag = uuid.uuid4().hex[:8]
    mallory, revoked = f"mallory-{tag}", f"j-revoked-{tag}"
    revoked_jti = await a.client(a.token(mallory, jti=revoked))
    revoked_jti_b = await b.client(b.token(mallory, jti=revoked))
    other_jti = await b.client(b.token(mallory, jti=f"j-kept-{tag}"))
    other_user = await a.client(a.token("trent", jti=f"j-revoked-not-trent-{tag}"))
    await asyncio.sleep(0.1)  # control subscriptions are live on both nodes
    message = {"jti": revoked} if how == "jti" else {"sub": mallory}
    await nc.publish("push-control.disconnect", json.dumps(message).encode())
    await nc.flush()
    assert await revoked_jti.closed() == 4001
    assert await revoked_jti_b.closed() == 4001
    assert revoked_jti.ws.close_reason == "token revoked"
    if how == "sub":
        assert await other_jti.closed() == 4001
    else:
        await other_jti.subscribe("kept.x")
    await other_user.subscribe("trent.x")
    # malformed control messages are ignored, and nothing else is closed
    deep = b"[" * 5000 + b"]" * 5000
    for junk in (b"", b"[]", b"not json", b'{"sub": 5}', b'{"jti": null}', b"{}", deep):
        await nc.publish("push-control.disconnect", junk)
    await nc.publish("push.trent.x", b"1")
    assert (await other_user.messages(1))[0]["data"] == 1
    for bystander in bystanders:
        await bystander.still_served(nc)


async def test_revoked_token_cannot_reconnect(start_server, nc):
    """Revocation is remembered: the revoked token is refused on reconnect (also from
    the verified-token cache), while a token issued after a `sub` revocation works."""
    srv = await start_server()
    stolen = f"j-stolen-{uuid.uuid4().hex[:8]}"
    by_jti = srv.token("oscar", jti=stolen)
    c = await srv.client(by_jti)
    await nc.publish("push-control.disconnect", json.dumps({"jti": stolen}).encode())
    assert await c.closed() == 4001
    again = await WSClient.connect(srv.ws_url)
    await again.send({"op": "auth", "token": by_jti})
    assert await again.closed() == 4001
    assert again.ws.close_reason == "token revoked"
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, additional_headers={"Authorization": f"Bearer {by_jti}"})
    assert info.value.response.status_code == 403

    peggy = f"peggy-{uuid.uuid4().hex[:8]}"
    old = srv.token(peggy)
    c = await srv.client(old)
    await nc.publish("push-control.disconnect", json.dumps({"sub": peggy}).encode())
    assert await c.closed() == 4001
    refused = await WSClient.connect(srv.ws_url)
    await refused.send({"op": "auth", "token": old})
    assert await refused.closed() == 4001
    await asyncio.sleep(1.05 - time.time() % 1)  # iat has one-second resolution
    fresh = await srv.client(srv.token(peggy))
    await fresh.subscribe(f"user.{peggy}")
