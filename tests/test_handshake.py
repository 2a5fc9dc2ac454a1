"""The opening handshake as pushsvc's uvicorn protocols take it (pushsvc.httpprotocol).

An upgrade request is parsed once, by httptools, and handed to the WebSocket
protocol as a ``websockets`` Request; requests ``websockets``' own parser would
refuse or read differently take uvicorn's serialise-and-parse path. These tests
check, over real sockets, that both paths answer as ``websockets`` does: the
limits (128 headers, 8 KiB lines), header values as sent (obs-text, spaces), the
query string and the peer address as the application sees them. The JWT
decoder that prepares its key once must still check every signature.
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

from pushsvc.auth import Authenticator, AuthError
from pushsvc.settings import Settings


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
