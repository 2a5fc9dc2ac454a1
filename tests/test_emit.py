"""HTTP emit shim over real HTTP, real NATS and real WebSocket subscribers."""

from __future__ import annotations

import gzip

import pytest


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_emit_json_and_raw_are_delivered(start_server, http, channel):
    srv = await start_server()
    sub = await srv.client()
    await sub.subscribe(channel)
    token = srv.token("svc", publish=[channel])
    r = await http.post(
        f"{srv.base}/emit", json={"channel": channel, "data": {"n": 1}}, headers=bearer(token)
    )
    assert r.status_code == 202 and r.json()["channel"] == channel and r.json()["seq"] > 0
    r2 = await http.post(f"{srv.base}/emit/{channel}", content=b"raw text", headers=bearer(token))
    assert r2.status_code == 202
    r3 = await http.post(
        f"{srv.base}/emit", json={"channel": channel, "payload": [1]}, headers=bearer(token)
    )
    assert r3.status_code == 202
    m1, m2, m3 = await sub.messages(3)
    assert (m1["data"], m2["data"], m3["data"]) == ({"n": 1}, "raw text", [1])
    assert [m1["seq"], m2["seq"], m3["seq"]] == [
        r.json()["seq"],
        r2.json()["seq"],
        r3.json()["seq"],
    ]


async def test_emit_batch(start_server, http, channel):
    srv = await start_server()
    sub = await srv.client()
    await sub.subscribe(channel)
    body = {"messages": [{"channel": channel, "data": i} for i in range(5)]}
    r = await http.post(f"{srv.base}/emit", json=body, headers=bearer(srv.token(publish=[">"])))
    assert r.status_code == 202
    results = r.json()["results"]
    assert [x["channel"] for x in results] == [channel] * 5
    got = await sub.messages(5)
    assert [m["data"] for m in got] == list(range(5))
    assert [m["seq"] for m in got] == [x["seq"] for x in results]


async def test_emit_with_api_key(start_server, http, channel):
    srv = await start_server(api_keys=["billing:k-123456", "plainkey"])
    sub = await srv.client()
    await sub.subscribe(channel)
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"1", headers=bearer("k-123456"))
    assert r.status_code == 202
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"2", headers=bearer("plainkey"))
    assert r.status_code == 202
    assert [m["data"] for m in await sub.messages(2)] == [1, 2]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer not-a-jwt"}, 401), ({"Authorization": "Basic x"}, 401)],
)
async def test_emit_unauthorized(start_server, http, channel, headers, status):
    srv = await start_server()
    r = await http.post(f"{srv.base}/emit", json={"channel": channel, "data": 1}, headers=headers)
    assert r.status_code == status
    assert r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_emit_errors(start_server, http, channel):
    srv = await start_server(max_emit_bytes=1024)
    sub = await srv.client()
    await sub.subscribe(channel)
    token = srv.token("svc", publish=["allowed.*", channel])
    h = bearer(token)
    r = await http.post(f"{srv.base}/emit", json={"channel": "other", "data": 1}, headers=h)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    for bad in ("allowed.*", "allowed.>", "$SYS.x", "a..b", "x" * 200):
        r = await http.post(f"{srv.base}/emit", json={"channel": bad, "data": 1}, headers=h)
        assert r.status_code == 422, bad
        assert r.json()["error"] == "invalid_channel"
    r = await http.post(f"{srv.base}/emit/allowed.%2A", content=b"1", headers=h)
    assert r.status_code == 422
    r = await http.post(f"{srv.base}/emit", content=b"{not json", headers=h)
    assert r.status_code == 400
    r = await http.post(f"{srv.base}/emit", json={"channel": channel}, headers=h)
    assert r.status_code == 400 and "data" in r.json()["message"]
    big = {"channel": channel, "data": "x" * 2000}
    r = await http.post(f"{srv.base}/emit", json=big, headers=h)
    assert r.status_code == 413  # chunked bodies: tests/test_limits.py
    # nothing of the refused emits was delivered
    await sub.nothing()


async def test_emit_503_when_nats_is_down(start_server, http, own_nats, channel):
    srv = await start_server(nats_url=own_nats.url, publish_timeout=0.5)
    token = srv.token("svc", publish=[">"])
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"1", headers=bearer(token))
    assert r.status_code == 202
    own_nats.kill()
    r = await http.post(f"{srv.base}/emit/{channel}", content=b"2", headers=bearer(token))
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == "unavailable"
    ready = await http.get(f"{srv.base}/readyz")
    assert ready.status_code == 503


async def test_compressed_emit_is_refused_not_published(start_server, http, channel):
    """A gzip body would otherwise be published as its compressed bytes (base64 garbage)."""
    srv = await start_server()
    sub = await srv.client()
    await sub.subscribe(channel)
    h = {**bearer(srv.token("svc", publish=[channel])), "Content-Encoding": "gzip"}
    body = gzip.compress(b'{"n": 1}')
    r = await http.post(f"{srv.base}/emit/{channel}", content=body, headers=h)
    assert r.status_code == 415 and r.headers["accept-encoding"] == "identity"
    r = await http.post(f"{srv.base}/emit", content=body, headers=h)
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    await sub.nothing()
    ok = {**h, "Content-Encoding": "identity"}
    r = await http.post(f"{srv.base}/emit/{channel}", content=b'{"n": 2}', headers=ok)
    assert r.status_code == 202
    assert [m["data"] for m in await sub.messages(1)] == [{"n": 2}]
