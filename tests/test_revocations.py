"""Revocations survive restarts: stored in a JetStream KV bucket, loaded by nodes started later.

Real nats-server (a private one per test, so the bucket starts empty), pushsvc under
uvicorn, real sockets and HTTP. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import nats
import nats.js.errors
import pytest
import websockets
from helpers import bearer
from wsclient import WSClient

from pushsvc.auth.revocations import entry_keys
from pushsvc.auth.tokens import Revocation

BUCKET = "PUSHSVC_REVOCATIONS"


async def refused(srv, token: str) -> int | None:
    """Connect with ``token`` in the auth frame; the close code the server answers with."""
    c = await WSClient.connect(srv.ws_url)
    await c.send({"op": "auth", "token": token})
    return await c.closed()


async def stored(url: str, key: str) -> bool:
    """True while the bucket holds a live entry under ``key`` (a direct get, no watch)."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        try:
            await kv.get(key)
            return True
        except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
            return False
    finally:
        await nc.drain()


async def revoke(url: str, message: dict) -> None:
    nc = await nats.connect(url)
    try:
        await nc.publish("push-control.disconnect", json.dumps(message).encode())
        await nc.flush()
    finally:
        await nc.drain()


async def wait_until_stored(url: str, key: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await stored(url, key):
        assert time.monotonic() < deadline, f"{key} not stored"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["jti", "sub"])
async def test_a_node_started_later_refuses_revoked_tokens(own_nats, start_server, http, how):
    user = f"u{uuid.uuid4().hex[:8]}"
    first = await start_server(nats_url=own_nats.url)
    token = first.token(user, publish=[">"], jti="stolen-1")
    c = await first.client(token)
    await revoke(own_nats.url, {"jti": "stolen-1"} if how == "jti" else {"sub": user})
    assert await c.closed() == 4001
    key = entry_keys(Revocation(jti="stolen-1") if how == "jti" else Revocation(sub=user))[0]
    await wait_until_stored(own_nats.url, key)

    later = await start_server(nats_url=own_nats.url)  # never saw the control message
    assert await refused(later, token) == 4001
    with pytest.raises(websockets.InvalidStatus) as info:  # header auth: refused handshake
        await websockets.connect(later.ws_url, additional_headers=bearer(token))
    assert info.value.response.status_code == 403
    r = await http.post(
        f"{later.base}/emit", json={"channel": "x", "data": 1}, headers=bearer(token)
    )
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    # other tokens still work there: another jti, or (sub) one issued after the revocation
    if how == "jti":
        ok = later.token(user, jti="fresh-2")
    else:
        ok = later.token(user, extra={"iat": int(time.time()) + 2})
    c = await later.client(ok)
    await c.subscribe("news")


async def test_revocation_entries_expire_with_their_ttl(own_nats, start_server):
    user = f"u{uuid.uuid4().hex[:8]}"
    srv = await start_server(nats_url=own_nats.url)
    token = srv.token(user, jti="short-lived")
    await revoke(own_nats.url, {"jti": "short-lived", "ttl": 2})
    key = entry_keys(Revocation(jti="short-lived"))[0]
    await wait_until_stored(own_nats.url, key)
    assert await refused(srv, token) == 4001
    deadline = time.monotonic() + 8
    while await stored(own_nats.url, key):  # JetStream removes it (per-message TTL)
        assert time.monotonic() < deadline, "entry outlived its ttl"
        await asyncio.sleep(0.2)
    later = await start_server(nats_url=own_nats.url)
    c = await later.client(token)  # the revocation is over: accepted again
    await c.subscribe("news")


async def test_an_entry_written_by_an_operator_is_applied_by_running_nodes(own_nats, start_server):
    user = f"u{uuid.uuid4().hex[:8]}"
    a = await start_server(nats_url=own_nats.url)
    b = await start_server(nats_url=own_nats.url)
    ca = await a.client(a.token(user))
    cb = await b.client(b.token(user))
    other = await a.client(a.token("someone-else"))
    nc = await nats.connect(own_nats.url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        (key,) = entry_keys(Revocation(sub=user))
        await kv.put(key, json.dumps({"sub": user, "ttl": 60, "at": time.time()}).encode())
    finally:
        await nc.drain()
    assert await ca.closed() == 4001
    assert await cb.closed() == 4001
    await other.subscribe("still-here")


async def test_history_off_keeps_revocations_in_memory(own_nats, start_server):
    user = f"u{uuid.uuid4().hex[:8]}"
    srv = await start_server(nats_url=own_nats.url, history_ttl=0)
    token = srv.token(user, jti="mem-1")
    c = await srv.client(token)
    await revoke(own_nats.url, {"jti": "mem-1"})
    assert await c.closed() == 4001
    assert await refused(srv, token) == 4001
    assert srv.node.revocations is None
