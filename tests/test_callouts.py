"""Authorisation callouts over NATS (issue 22 §3): an app that does not mint JWTs decides
connections (its session cookie, an opaque token) and subscriptions with a NATS service.

Real nats-server, real uvicorn, real sockets; the services are written with nats-py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import websockets
from test_sse import sse
from wsclient import WSClient


def subject() -> str:
    return f"auth{uuid.uuid4().hex[:8]}.connect"


class Asked(list):
    """The requests a callout service got; ``sub`` is its NATS subscription."""

    sub: Any = None


async def serve(nc: Any, subj: str, decide: Any) -> Asked:
    """A callout service on ``subj``: ``decide(request) -> answer | None`` (None: silent)."""
    asked = Asked()

    async def cb(msg: Any) -> None:
        request = json.loads(msg.data)
        asked.append(request)
        answer = decide(request)
        if answer is not None:
            await msg.respond(json.dumps(answer).encode())

    asked.sub = await nc.subscribe(subj, cb=cb)
    await nc.flush()
    return asked


async def test_connect_callout_admits_refuses_and_leaves_jwts_alone(start_server, nc, channel):
    subj = subject()

    def decide(request: dict[str, Any]) -> dict[str, Any]:
        if request["credential"] == "session-ann":
            return {
                "allow": True,
                "sub": "ann",
                "channels": [channel],
                "publish": [channel],
                "info": {"name": "Ann"},
            }
        return {"allow": False, "reason": "session expired, log in again"}

    asked = await serve(nc, subj, decide)
    srv = await start_server(connect_auth_subject=subj)

    # an opaque bearer in the handshake
    ann = await WSClient.connect(
        srv.ws_url,
        additional_headers={"Authorization": "Bearer session-ann", "Origin": "https://app.test"},
    )
    welcome = await ann.expect("welcome")
    assert welcome["user"] == "ann"
    assert asked[-1] == {
        "credential": "session-ann",
        "transport": "ws",
        "origin": "https://app.test",
        "remote": "127.0.0.1",
    }
    await ann.subscribe(channel)
    await ann.send({"op": "publish", "channel": channel, "data": 1, "id": 1})
    got = {f["type"]: f for f in [await ann.recv(), await ann.recv()]}  # in either order
    assert set(got) == {"published", "message"}
    assert got["message"]["publisher"]["user"] == "ann"
    await ann.send({"op": "subscribe", "channel": "other.room", "id": 2})
    await ann.expect("error", id=2, code="forbidden")

    # an opaque token in the auth frame
    frame = await WSClient.connect(srv.ws_url, "session-ann")
    assert frame.welcome["user"] == "ann"

    # refusals: 403 in the handshake, 4001 after an auth frame, with the app's reason
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, additional_headers={"Authorization": "Bearer nope"})
    assert info.value.response.status_code == 403
    assert b"session expired" in info.value.response.body
    bad = await WSClient.connect(srv.ws_url, auth_frame=False)
    await bad.send({"op": "auth", "token": "nope"})
    assert await bad.closed() == 4001
    assert bad.ws.close_reason == "session expired, log in again"

    # a JWT is verified as always: the service is not asked
    before = len(asked)
    jwt_client = await srv.client(srv.token("bob"))
    assert jwt_client.welcome["user"] == "bob" and len(asked) == before


async def test_connect_callout_away_refuses_with_503_and_4001(start_server, nc, http, channel):
    silent = subject()
    await serve(nc, silent, lambda request: None)  # takes requests, never answers
    srv = await start_server(connect_auth_subject=silent, auth_callout_timeout=0.3)
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, additional_headers={"Authorization": "Bearer s-1"})
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Retry-After"] == "5"
    c = await WSClient.connect(srv.ws_url, auth_frame=False)
    await c.send({"op": "auth", "token": "s-1"})
    assert await c.closed() == 4001

    nobody = await start_server(connect_auth_subject=subject())  # no responder at all
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(f"{nobody.base}/sse", params={"channel": channel, "token": "s-1"})
    assert r.status_code == 503, r.text
    metrics = (await http.get(f"{nobody.base}/metrics")).text
    assert 'pushsvc_auth_failures_total{reason="callout_unavailable"}' in metrics


async def test_connect_callout_over_sse(start_server, nc, channel):
    subj = subject()
    asked = await serve(
        nc, subj, lambda request: {"allow": True, "sub": "sse-ann", "channels": [channel]}
    )
    srv = await start_server(connect_auth_subject=subj)
    async with sse(srv.base, channel, token="opaque-1") as events:
        welcome = await events.next("welcome")
        assert welcome["data"]["user"] == "sse-ann"
        await events.next("subscribed")
    assert asked[0]["transport"] == "sse" and asked[0]["credential"] == "opaque-1"


async def test_subscribe_callout_allows_caches_refuses(start_server, nc, http, channel):
    subj = f"auth{uuid.uuid4().hex[:8]}.subscribe"
    room = channel.split(".")[0]

    def decide(request: dict[str, Any]) -> dict[str, Any]:
        if request["channel"] == f"{room}.open":
            return {"allow": True, "ttl": 30}
        if request["channel"] == f"{room}.once":
            return {"allow": True}  # no ttl: asked every time
        return {"allow": False, "reason": "not a member"}

    asked = await serve(nc, subj, decide)
    srv = await start_server(subscribe_auth_subject=subj, presence_channels=[f"{room}.>"])
    token = srv.token("cat", channels=[], extra={"info": {"team": "x"}})
    a = await srv.client(token)
    await a.subscribe(f"{room}.open")
    assert asked == [
        {
            "user": "cat",
            "client": a.welcome["client"],
            "channel": f"{room}.open",
            "info": {"team": "x"},
        }
    ]
    await a.send({"op": "subscribe", "channel": f"{room}.closed", "id": 1})
    await a.expect("error", id=1, code="forbidden")

    b = await srv.client(token)
    await b.subscribe(f"{room}.open")  # cached for (cat, channel): not asked again
    await b.subscribe(f"{room}.once")
    assert [q["channel"] for q in asked] == [f"{room}.open", f"{room}.closed", f"{room}.once"]

    # presence and history reads follow the same rule
    await a.send({"op": "presence_stats", "channel": f"{room}.open", "id": 2})
    stats = await a.expect("presence_stats", id=2)
    assert stats["clients"] == 2
    await a.send({"op": "presence", "channel": f"{room}.closed", "id": 3})
    await a.expect("error", id=3, code="forbidden")
    auth = {"Authorization": f"Bearer {token}"}
    r = await http.get(f"{srv.base}/history/{room}.open", headers=auth)
    assert r.status_code == 200, r.text
    r = await http.get(f"{srv.base}/history/{room}.closed", headers=auth)
    assert r.status_code == 403

    # the service gone: unavailable (retry later), never forbidden
    await asked.sub.unsubscribe()
    await nc.flush()
    await a.send({"op": "subscribe", "channel": f"{room}.new", "id": 4})
    await a.expect("error", id=4, code="unavailable")
