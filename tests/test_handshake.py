"""The opening handshake as pushsvc's uvicorn protocols take it (pushsvc.server.httpprotocol).

An upgrade request is parsed once, by httptools, and handed to the WebSocket
protocol as a ``websockets`` Request; requests ``websockets``' own parser would
refuse or read differently take uvicorn's serialise-and-parse path. These tests
check, over real sockets, that both paths answer as ``websockets`` does: the
limits (128 headers, 8 KiB lines), header values as sent (obs-text, spaces), the
query string and the peer address as the application sees them. The JWT
decoder that prepares its key once must still check every signature. Sessions'
deadlines (pings, pongs, expiry) share one coarse timer per loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings

import jwt
import pytest
from conftest import SECRET
from hostile import LogCapture
from wsclient import WSClient

from pushsvc.auth.tokens import Authenticator, AuthError
from pushsvc.config.settings import Settings
from pushsvc.core.deadlines import Deadlines


def _upgrade(path: str = "/ws", extra: bytes = b"") -> bytes:
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


async def _status(port: int, request: bytes) -> bytes:
    """The status line the server answers ``request`` with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_header_limits_and_values_as_websockets_reads_them(start_server):
    srv = await start_server()
    port = srv.settings.port
    headers = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(123))  # 5 + 123 = 128
    assert (await _status(port, _upgrade(extra=headers))).startswith(b"HTTP/1.1 101")
    headers += b"X-One-More: 1\r\n"
    assert (await _status(port, _upgrade(extra=headers))).startswith(b"HTTP/1.1 431")
    # a long line under websockets' 8 KiB limit, obs-text and padded values: accepted
    extra = b"X-Long: " + b"a" * 8000 + b"\r\nX-Latin: caf\xe9\r\nX-Padded:   v  \r\n"
    assert (await _status(port, _upgrade(extra=extra))).startswith(b"HTTP/1.1 101")
    # a request body is refused as websockets refuses it (connection closed, no 101)
    answer = await _status(port, _upgrade(extra=b"Content-Length: 5\r\n") + b"hello")
    assert not answer.startswith(b"HTTP/1.1 101")
    # not a WebSocket version this server speaks: 426 with the version it does speak
    request = _upgrade().replace(b"Version: 13", b"Version: 8")
    assert (await _status(port, request)).startswith(b"HTTP/1.1 426")


async def test_query_token_padded_header_token_and_origin(start_server):
    srv = await start_server(allowed_origins=["https://app.example"])
    token = srv.token("alice")
    # the query string reaches the endpoint undecoded: %2E is a '.' once parsed
    c = await WSClient.connect(f"{srv.ws_url}?token={token.replace('.', '%2E')}", token)
    assert c.welcome["user"] == "alice"
    await c.close()
    c = await WSClient.connect(
        srv.ws_url,
        additional_headers={"Authorization": f"Bearer {token}   ", "Origin": "https://app.example"},
    )
    # a handshake token: no auth frame, the welcome comes first
    assert (await c.expect("welcome"))["user"] == "alice"
    await c.close()
    with pytest.raises(Exception) as info:
        await WSClient.connect(srv.ws_url, additional_headers={"Origin": "https://app.example."})
    assert info.value.response.status_code == 403  # type: ignore[attr-defined]


async def test_uvicorn_logs_the_peer_and_path_of_an_accepted_socket(start_server):
    srv = await start_server()
    with LogCapture().installed(logging.INFO) as logs:
        c = await srv.client(srv.token("alice"))
        local = c.ws.local_address
        await c.close()
    assert f'127.0.0.1:{local[1]} - "WebSocket /ws" [accepted]' in logs.text, logs.text


def test_cached_jwt_key_still_checks_every_signature():
    auth = Authenticator(Settings.load(env={}, jwt_secret=SECRET))
    claims = {"sub": "alice", "exp": int(time.time()) + 600}
    good = jwt.encode(claims, SECRET, algorithm="HS256")
    assert auth.verify(good).sub == "alice"
    head, _, sig = good.split(".")
    forged = jwt.encode({**claims, "sub": "mallory"}, "another-secret-0123456789abcdefghij")
    tampered = f"{head}.{forged.split('.')[1]}.{sig}"
    for bad in (forged, tampered, forged, tampered):
        with pytest.raises(AuthError) as info:
            auth.verify(bad)
        assert info.value.reason == "signature"
    with warnings.catch_warnings():  # (PyJWT: the test secret is short for SHA-512)
        warnings.simplefilter("ignore")
        hs512 = jwt.encode({**claims, "sub": "bob"}, SECRET, algorithm="HS512")
    with pytest.raises(AuthError) as info:
        auth.verify(hs512)
    assert info.value.reason == "algorithm"
    assert auth.verify(jwt.encode({**claims, "sub": "carol"}, SECRET)).sub == "carol"


# --- coarse deadlines (pushsvc.core.deadlines: pings, pongs, token expiry) -----------------------


async def test_deadlines_fire_once_not_early_and_can_move_or_clear():
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    dl = Deadlines(loop, lambda owner: fired.append((owner, loop.time())))
    start = loop.time()
    dl.set("a", 0.3)
    dl.set("b", 0.3)
    dl.set("moved", 0.1)
    dl.set("moved", 0.5)  # re-armed: only the later deadline counts
    dl.set("cleared", 0.1)
    dl.clear("cleared")
    assert len(dl) == 3 and "cleared" not in dl
    for _ in range(300):
        if len(fired) == 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.25)  # nothing else fires
    assert [owner for owner, _ in fired] == ["a", "b", "moved"]
    for owner, at in fired:
        due = start + (0.5 if owner == "moved" else 0.3)
        assert due - 0.002 <= at < due + 2.0  # never early; late by about a tick
    assert len(dl) == 0


async def test_deadline_callbacks_may_rearm_and_one_failure_spares_the_rest():
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    def fire(owner: str) -> None:
        seen.append(owner)
        if owner == "bad":
            raise RuntimeError("boom")
        if seen.count(owner) < 3:
            dl.set(owner, 0.05)  # as a session's ping re-arms itself

    dl = Deadlines(loop, fire)
    dl.set("bad", 0.05)
    dl.set("good", 0.05)
    for _ in range(300):
        if seen.count("good") == 3:
            break
        await asyncio.sleep(0.01)
    assert seen.count("good") == 3 and seen.count("bad") == 1


async def test_protocol_pings_close_a_peer_that_never_answers(start_server, channel, nc):
    """uvicorn's RFC 6455 keepalive (armed on the shared coarse timer) still works."""
    srv = await start_server(uvicorn_options={"ws_ping_interval": 0.2, "ws_ping_timeout": 0.3})
    alive = await srv.client(srv.token("alice"))  # the websockets client answers pings
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.settings.port)
    writer.write(_upgrade())
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    started = asyncio.get_running_loop().time()
    data = b""
    while chunk := await asyncio.wait_for(reader.read(4096), 5):  # never answer
        data += chunk
    writer.close()
    assert b"\x89" in data  # a ping frame came (opcode 0x9) ...
    assert asyncio.get_running_loop().time() - started < 5  # ... then the close
    await alive.subscribe(channel)
    await nc.publish(f"push.{channel}", b'"still here"')
    assert (await alive.messages(1))[0]["data"] == "still here"
