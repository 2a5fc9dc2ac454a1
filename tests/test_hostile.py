"""Hostile clients over real sockets: bad tokens, bad channels, bad frames, bad origins.

Each test asserts the exact HTTP status or close code, and that a well-behaved
client connected during the attack still receives a published message
afterwards (:class:`hostile.Bystander`). Token rules follow RFC 8725 (JWT BCP),
the WebSocket rules OWASP's WebSocket Security Cheat Sheet.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import json
import logging
import socket
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets
from conftest import SECRET
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import refcounting_only, until
from hostile import Bystander, LogCapture
from wsclient import WSClient

from pushsvc.auth.tokens import mint_token
from pushsvc.config.settings import Settings, SettingsError


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(sub: str = "mallory", ttl: int = 3600, **extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + ttl, "channels": [">"], **extra}


def _unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    return f"{_b64(header)}.{_b64(claims)}."


async def _refused_in_handshake(url: str, token: str, status: int = 403) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(f"{url}?token={token}")
    assert info.value.response.status_code == status


async def _closed_after_auth_frame(url: str, token: str, code: int = 4001) -> str:
    c = await WSClient.connect(url)
    await c.send({"op": "auth", "token": token})
    assert await c.closed() == code
    return c.ws.close_reason or ""


@pytest.fixture(scope="module")
def rsa_pem() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


# --- tokens (RFC 8725) --------------------------------------------------------------------


async def test_forged_expired_and_malformed_tokens(start_server, nc):
    srv = await start_server(jwt_leeway=0)
    bystander = await Bystander.join(srv)
    good = srv.token("mallory")
    head, body, _sig = good.split(".")
    tampered_claims = _b64({**jwt.decode(good, options={"verify_signature": False}), "sub": "bob"})
    bad_tokens = {
        "bad signature": f"{head}.{body}.AAAA",
        "claims swapped under the old signature": f"{head}.{tampered_claims}.{_sig}",
        "other secret": mint_token("another-secret-of-sufficient-length-000", "mallory"),
        "expired": srv.token("mallory", ttl=-5),
        "garbage": "not-a-jwt",
        "two parts": f"{head}.{body}",
        "huge": "a" * 8000,
    }
    for name, token in bad_tokens.items():
        await _refused_in_handshake(srv.ws_url, token)
        reason = await _closed_after_auth_frame(srv.ws_url, token)
        assert token not in reason, name
    # beyond the HTTP parser's 8 KiB line limit: answered (not left hanging) and closed
    await _refused_in_handshake(srv.ws_url, "a" * 9000, status=414)
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(
            srv.ws_url, additional_headers={"Authorization": "Bearer " + "a" * 9000}
        )
    assert info.value.response.status_code == 431
    assert await _closed_after_auth_frame(srv.ws_url, "a" * 9000) == "token too large"
    # non-string token fields in the auth frame
    for token in (None, 5, ["x"], {"a": 1}, ""):
        c = await WSClient.connect(srv.ws_url)
        await c.send({"op": "auth", "token": token})
        assert await c.closed() == 4001
    await bystander.still_served(nc)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the HS512 forgery
async def test_alg_none_and_algorithm_confusion_rejected(start_server, nc, rsa_pem):
    srv = await start_server()
    bystander = await Bystander.join(srv)
    private, _public = rsa_pem
    claims = _claims()
    tokens = {
        # RFC 8725 3.1: never accept "none", in any spelling
        "none": _unsigned({"alg": "none", "typ": "JWT"}, claims),
        "None": _unsigned({"alg": "None"}, claims),
        "NONE with a signature": _unsigned({"alg": "NONE"}, claims) + "c2ln",
        # pinned algorithms: HS256 only, even with the right secret
        "HS512 with the right secret": jwt.encode(claims, SECRET, algorithm="HS512"),
        "RS256": jwt.encode(claims, private, algorithm="RS256"),
        "ES256": jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
    }
    for name, token in tokens.items():
        await _refused_in_handshake(srv.ws_url, token)
        await _closed_after_auth_frame(srv.ws_url, token)
        assert name
    await bystander.still_served(nc)


async def test_public_key_server_rejects_hs256_signed_with_the_public_key(
    start_server, nc, tmp_path, rsa_pem
):
    """Key confusion (RFC 8725 2.1/3.1): the PEM public key used as an HMAC secret."""
    private, public = rsa_pem
    pem = tmp_path / "pub.pem"
    pem.write_bytes(public)
    srv = await start_server(jwt_secret=None, jwt_public_key=str(pem))
    claims = _claims()
    good = jwt.encode(claims, private, algorithm="RS256")
    c = await WSClient.connect(srv.ws_url, good)
    assert c.welcome["user"] == "mallory"
    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64(claims)
    sig = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    confused = f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    await _refused_in_handshake(srv.ws_url, confused)
    await _closed_after_auth_frame(srv.ws_url, confused)
    with pytest.raises(SettingsError):
        Settings.load(env={}, jwt_secret="x", jwt_algorithms=["HS256", "RS256"])
    await c.subscribe("news.x")
    await nc.publish("push.news.x", b"1")
    assert (await c.messages(1))[0]["data"] == 1


async def test_required_claims_time_claims_and_crit(start_server, nc):
    srv = await start_server(jwt_leeway=5)
    bystander = await Bystander.join(srv)
    now = int(time.time())

    def sign(claims: dict[str, object], **headers: object) -> str:
        return jwt.encode(claims, SECRET, algorithm="HS256", headers=headers or None)

    rejected = {
        "no exp": sign({"sub": "mallory"}),
        "no sub": sign({"exp": now + 60}),
        "empty sub": sign({"sub": "", "exp": now + 60}),
        "numeric sub": sign({"sub": 42, "exp": now + 60}),
        "nbf beyond leeway": sign(_claims(nbf=now + 60)),
        "iat in the future beyond leeway": sign(_claims(iat=now + 60)),
        "expired beyond leeway": sign(_claims(ttl=-10)),
        "unknown crit": sign(
            _claims(), crit=["urn:example:must-understand"], **{"urn:example:must-understand": True}
        ),
        "grant with a bad pattern": sign(_claims(channels=["a.>.b"])),
    }
    for name, token in rejected.items():
        await _refused_in_handshake(srv.ws_url, token)
        await _closed_after_auth_frame(srv.ws_url, token)
        assert name
    # inside the leeway (RFC 7519 4.1.4/4.1.5: small clock skew tolerated)
    for token in (sign(_claims(nbf=now + 2)), sign(_claims(ttl=-2))):
        c = await WSClient.connect(srv.ws_url, token)
        assert c.welcome["user"] == "mallory"
        await c.close()
    await bystander.still_served(nc)


async def test_kid_jku_x5u_never_fetch(start_server, nc, rsa_pem):
    """RFC 8725 3.10: headers naming key locations are never followed."""
    srv = await start_server()
    bystander = await Bystander.join(srv)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/keys"
    private, _ = rsa_pem
    try:
        for headers in ({"jku": url}, {"x5u": url}, {"kid": url}, {"jwk": {"kty": "oct"}}):
            for alg, key in (("RS256", private), ("HS256", "attacker-secret-000000000000000000")):
                token = jwt.encode(_claims(), key, algorithm=alg, headers=headers)
                await _refused_in_handshake(srv.ws_url, token)
                await _closed_after_auth_frame(srv.ws_url, token)
        await asyncio.sleep(0.1)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected to the key URL
    finally:
        listener.close()
    await bystander.still_served(nc)


async def test_audiences_tell_connection_and_emit_tokens_apart(start_server, nc, http, channel):
    srv = await start_server(jwt_audience="pushsvc", emit_audience="pushsvc-emit")
    bystander = await Bystander.join(srv)
    conn = srv.token("mallory", publish=[">"], audience="pushsvc")
    emit = srv.token("mallory", publish=[">"], audience="pushsvc-emit")
    for token in (
        emit,
        srv.token("mallory"),  # no aud at all
        srv.token("mallory", audience="someone-else"),
        srv.token("mallory", extra={"aud": ["someone-else", "another"]}),
    ):
        await _refused_in_handshake(srv.ws_url, token)
        await _closed_after_auth_frame(srv.ws_url, token)
    c = await WSClient.connect(srv.ws_url, conn)
    assert c.welcome["user"] == "mallory"
    url = f"{srv.base}/emit"
    body = {"channel": channel, "data": 1}
    r = await http.post(url, json=body, headers={"Authorization": f"Bearer {conn}"})
    assert r.status_code == 401
    r = await http.post(url, json=body, headers={"Authorization": f"Bearer {emit}"})
    assert r.status_code == 202
    await bystander.still_served(nc)


async def test_explicit_typ_pins_token_kinds(start_server, nc, http, channel):
    """RFC 8725 3.11: with ``jwt_type``/``emit_type`` set, ``typ`` must match exactly."""
    srv = await start_server(jwt_type="pushsvc+jwt", emit_type="pushsvc-emit+jwt")
    bystander = await Bystander.join(srv)
    conn = jwt.encode(_claims(publish=[">"]), SECRET, headers={"typ": "pushsvc+jwt"})
    emit = jwt.encode(_claims(publish=[">"]), SECRET, headers={"typ": "pushsvc-emit+jwt"})
    plain = jwt.encode(_claims(publish=[">"]), SECRET)  # typ "JWT"
    for token in (emit, plain):
        await _refused_in_handshake(srv.ws_url, token)
    c = await WSClient.connect(srv.ws_url, conn)
    assert c.welcome["user"] == "mallory"
    # RFC 7515 4.1.9: "application/" may be omitted; compared case-insensitively
    c2 = await WSClient.connect(
        srv.ws_url, jwt.encode(_claims(), SECRET, headers={"typ": "application/PushSvc+JWT"})
    )
    await c2.close()
    url = f"{srv.base}/emit"
    body = {"channel": channel, "data": 1}
    for token, status in ((conn, 401), (plain, 401), (emit, 202)):
        r = await http.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == status
    await bystander.still_served(nc)


# --- channels ---------------------------------------------------------------------------


async def test_other_users_personal_channel_and_bad_channel_names(start_server, nc):
    srv = await start_server(command_burst=500)
    bystander = await Bystander.join(srv)
    # A wildcard grant does not reach into other users' personal channels.
    c = await srv.client(srv.token("mallory", channels=[">"], publish=["chat.>"]))
    await c.subscribe("user.mallory")
    for i, name in enumerate(("user.bob", "user.bystander", "user.bob.extra")):
        await c.send({"op": "subscribe", "channel": name, "id": i})
        await c.expect("error", code="forbidden", id=i)
    star = await srv.client(srv.token("eve", channels=["*.bob"]))
    await star.send({"op": "subscribe", "channel": "user.bob", "id": 1})
    await star.expect("error", code="forbidden", id=1)
    # an explicit grant on user.* does (e.g. a support console)
    admin = await srv.client(srv.token("admin", channels=["user.*"]))
    await admin.subscribe("user.bob")
    # wildcard subscriptions never reach other users' personal channels either
    patterns = ("chat.*", "chat.>", ">", "*", "*.bob")
    for name in patterns:
        await c.subscribe(name)
    bad = (
        "$SYS.SERVER.PING",
        "$JS.API.STREAM.LIST",
        "_INBOX.abc",
        "_R_.x",
        "a..b",
        ".a",
        "a.",
        "",
        "x" * 129,
        "a b",
        "a\tb",
        "a\nb",
        "caf\u00e9",
        "push.x\x00",
    )
    for op in ("subscribe", "publish", "unsubscribe"):
        for name in bad + (patterns if op == "publish" else ()):
            cmd = {"op": op, "channel": name, "id": "b"}
            if op == "publish":
                cmd["data"] = 1
            await c.send(cmd)
            await c.expect("error", code="invalid_channel", id="b")
    await c.send({"op": "publish", "channel": "user.bob", "data": 1, "id": "p"})
    await c.expect("error", code="forbidden", id="p")
    await nc.publish("push.user.bob", b'"private"')
    (m,) = await admin.messages(1)
    assert m["data"] == "private"
    await c.nothing(0.2)
    await bystander.still_served(nc)


# --- frames -----------------------------------------------------------------------------


async def test_malformed_frames_get_bad_request_without_tracebacks(start_server, nc):
    srv = await start_server(command_burst=200, command_rate=100)
    bystander = await Bystander.join(srv)
    c = await srv.client(srv.token("mallory"))
    deep = "[" * 5000 + "]" * 5000
    frames: list[str | bytes] = [
        "not json",
        "",
        "[]",
        '"a string"',
        "42",
        "null",
        "{}",
        '{"op": "fly"}',
        '{"op": null}',
        '{"op": 5}',
        '{"op": "subscribe"}',
        '{"op": "subscribe", "channel": 5}',
        '{"op": "subscribe", "channel": "a", "since": "x"}',
        '{"op": "subscribe", "channel": "a", "since": 1.5}',
        '{"op": "subscribe", "channel": "a", "id": {"x": 1}}',
        '{"op": "subscribe", "channel": "a", "id": [1]}',
        '{"op": "publish", "channel": "a"}',
        '{"op": "refresh"}',
        '{"op": "refresh", "token": 7}',
        '{"op": "auth", "token": "x"}',  # already authenticated
        '{"op": "subscribe", "channel": "a", "since": 99999999999999999999999}',
        '{"op": "subscribe", "channel": "a"',
        '{"op": "subscribe", "channel": "\\ud800"}',
        f'{{"op": "publish", "channel": "a", "data": {deep}}}',
        deep,
        '{"op": "subscribe", "channel": "a", 1}',
        b"\x00\x01binary",
        b'{"op": "subscribe", "channel": "a"}',  # JSON, but in a binary frame
    ]
    with LogCapture().installed() as logs:
        for frame in frames:
            await c.ws.send(frame)
            err = await c.expect("error")
            assert err["code"] in ("bad_request", "invalid_channel"), (frame, err)
        await c.send({"op": "subscribe", "channel": "ok.1", "id": 1})
        await c.expect("subscribed", id=1)
        await bystander.still_served(nc)
    assert "Traceback" not in logs.text
    assert "ERROR" not in logs.text


async def test_unknown_fields_are_ignored_and_since_bounds(start_server, nc, channel):
    srv = await start_server()
    c = await srv.client()
    await c.send({"op": "subscribe", "channel": channel, "id": 1, "extra": {"x": [1, 2]}})
    await c.expect("subscribed", id=1)
    for since in (-1, 2**64, 10**30):  # JetStream sequences are uint64: 0..2^64-1
        await c.send({"op": "subscribe", "channel": channel + "x", "since": since, "id": 2})
        await c.expect("error", code="bad_request", id=2)
    await c.send({"op": "subscribe", "channel": channel + "y", "since": 2**64 - 1, "id": 3})
    await c.expect("subscribed", id=3)
    await nc.publish(f"push.{channel}", b"1")
    assert (await c.messages(1))[0]["data"] == 1


async def test_oversized_frame_closes_1009(start_server, nc):
    srv = await start_server(max_frame_bytes=4096)
    bystander = await Bystander.join(srv)
    c = await srv.client(srv.token("mallory", publish=[">"]))
    await c.send({"op": "publish", "channel": "big.x", "data": "x" * 3900, "id": 1})
    await c.expect("published", id=1)
    await c.send({"op": "publish", "channel": "big.x", "data": "x" * 5000})
    assert await c.closed() == 1009
    # before authentication too: the limit is the server's, not the session's
    raw = await websockets.connect(srv.ws_url, compression=None, max_size=None)
    await raw.send("x" * 5000)
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(raw.recv(), 5)
    assert raw.close_code == 1009
    # fragmented: many small fragments that add up past the limit
    raw = await websockets.connect(srv.ws_url, compression=None)
    await raw.send(["x" * 1000 for _ in range(10)])
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(raw.recv(), 5)
    assert raw.close_code == 1009
    await bystander.still_served(nc)


async def test_permessage_deflate_is_never_negotiated(start_server, nc):
    """With PUSHSVC_COMPRESSION off (the default) a client offering deflate gets none
    (the deflate case and its 1009 for bombs: tests/test_compression.py)."""
    srv = await start_server()
    c = await WSClient.connect(srv.ws_url, srv.token(), compression="deflate")
    assert c.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    await c.subscribe("news.deflate")
    await nc.publish("push.news.deflate", b"1")
    assert (await c.messages(1))[0]["data"] == 1


# --- origins and cookies (OWASP: cross-site WebSocket hijacking) ---------------------------


async def test_foreign_origin_refused_before_accept(start_server, nc):
    srv = await start_server(allowed_origins=["https://app.example.com", "HTTPS://Other.Example/"])
    bystander = await Bystander.join(srv, origin="https://app.example.com")
    token = srv.token("mallory")
    for origin in (
        "https://evil.example.com",
        "http://app.example.com",  # scheme differs
        "https://app.example.com:8443",
        "https://app.example.com.evil.net",
        "null",
    ):
        with pytest.raises(websockets.InvalidStatus) as info:
            await WSClient.connect(srv.ws_url, token, origin=origin)
        assert info.value.response.status_code == 403, origin
        with pytest.raises(websockets.InvalidStatus) as info:
            await WSClient.connect(f"{srv.ws_url}?token={token}", origin=origin)
        assert info.value.response.status_code == 403, origin
    # a present but empty Origin is not in the list either
    answer = await _exchange(srv.settings.port, _upgrade(extra="Origin: \r\n"))
    assert answer.startswith(b"HTTP/1.1 403")
    # configured entries are normalised (lower case, no trailing slash) like browsers send them
    c = await WSClient.connect(srv.ws_url, token, origin="https://other.example")
    await c.close()
    await bystander.still_served(nc)


async def test_no_origin_is_a_non_browser_client_still_needing_a_token(start_server, nc):
    """Browsers always send Origin: without one the allowlist does not apply, tokens do."""
    srv = await start_server(allowed_origins=["https://app.example"])
    token = srv.token("cli")
    c = await WSClient.connect(srv.ws_url, token)  # auth frame, no Origin header
    assert c.welcome["user"] == "cli"
    h = await WSClient.connect(
        srv.ws_url, None, additional_headers={"Authorization": f"Bearer {token}"}
    )
    await h.expect("welcome", user="cli")
    with pytest.raises(websockets.InvalidStatus) as info:  # a bad token is still refused
        await WSClient.connect(f"{srv.ws_url}?token=not-a-jwt")
    assert info.value.response.status_code == 403
    n = await WSClient.connect(srv.ws_url)
    await n.send({"op": "auth", "token": "not-a-jwt"})
    assert await n.closed() == 4001
    await c.subscribe("cli.news")
    await nc.publish("push.cli.news", b"1")
    assert (await c.messages(1))[0]["data"] == 1


async def test_cookie_auth_requires_allowlist_and_checks_origin(start_server, nc):
    with pytest.raises(SettingsError) as info:
        Settings.load(env={}, jwt_secret="x", auth_cookie="pushsvc_token")
    assert info.value.setting == "PUSHSVC_AUTH_COOKIE"
    srv = await start_server(auth_cookie="pushsvc_token", allowed_origins=["https://app.example"])
    bystander = await Bystander.join(srv, origin="https://app.example")
    cookie = {"Cookie": f"pushsvc_token={srv.token('mallory')}"}
    c = await WSClient.connect(srv.ws_url, origin="https://app.example", additional_headers=cookie)
    await c.expect("welcome", user="mallory")
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, origin="https://evil.example", additional_headers=cookie)
    assert info.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(srv.ws_url, origin="null", additional_headers=cookie)
    assert info.value.response.status_code == 403
    # no Origin: not a browser (a browser sending the cookie also sends Origin), so the
    # same rule as for other tokens: the cookie's token decides
    d = await WSClient.connect(srv.ws_url, additional_headers=cookie)
    await d.expect("welcome", user="mallory")
    await bystander.still_served(nc)


# --- logging hygiene ----------------------------------------------------------------------


async def test_tokens_never_logged(start_server, nc, http, channel):
    srv = await start_server(
        api_keys=["ops:super-secret-api-key-0123456789"],
        auth_cookie="session",
        allowed_origins=["https://app.example"],
        jwt_leeway=0,
    )
    origin = {"origin": "https://app.example"}
    secrets_seen = [SECRET, "super-secret-api-key-0123456789"]
    with LogCapture().installed() as logs:
        bystander = await Bystander.join(srv, origin="https://app.example")
        good = srv.token("mallory", publish=[">"])
        expired = srv.token("mallory", ttl=-5)
        other = srv.token("bob")
        secrets_seen += [good, expired, other, "eyJ-forged.part.sig"]
        c = await WSClient.connect(f"{srv.ws_url}?token={good}", **origin)
        await c.expect("welcome")
        with pytest.raises(websockets.InvalidStatus):
            await WSClient.connect(f"{srv.ws_url}?token={expired}", **origin)
        with pytest.raises(websockets.InvalidStatus):
            await WSClient.connect(
                srv.ws_url, additional_headers={"Authorization": f"Bearer {expired}"}, **origin
            )
        d = await WSClient.connect(
            srv.ws_url, additional_headers={"Cookie": f"session={good}"}, **origin
        )
        await d.expect("welcome")
        e = await WSClient.connect(srv.ws_url, **origin)
        await e.send({"op": "auth", "token": "eyJ-forged.part.sig"})
        assert await e.closed() == 4001
        await c.send({"op": "refresh", "token": other})  # another sub: closed 4001
        assert await c.closed() == 4001
        for cred in (good, expired, "super-secret-api-key-0123456789", "wrong-key"):
            await http.post(
                f"{srv.base}/emit?token={cred}",
                json={"channel": channel, "data": 1},
                headers={"Authorization": f"Bearer {cred}"},
            )
        async with httpx.AsyncClient() as h2:
            await h2.get(f"{srv.base}/metrics")
        await bystander.still_served(nc)
        await bystander.close()
        await d.close()
    assert "WebSocket" in logs.text  # the capture did see uvicorn's lines
    assert "< TEXT" in logs.text  # and websockets' frame-level DEBUG lines
    for secret in secrets_seen:
        assert secret not in logs.text
        assert secret[-16:] not in logs.text  # nor the tail of a shortened one
    metrics_text = (await http.get(f"{srv.base}/metrics")).text
    for secret in secrets_seen:
        assert secret not in metrics_text
    assert "Traceback" not in logs.text


# --- broken handshakes and abrupt clients (uvicorn fixes in pushsvc.ws.protocol) -----------


def _upgrade(path: str = "/ws", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (<= 3 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 3)
    finally:
        writer.close()


async def test_broken_handshakes_are_answered_and_shutdown_still_works(start_server, nc):
    srv = await start_server(allowed_origins=["https://app.example"])
    port = srv.settings.port
    bystander = await Bystander.join(srv, origin="https://app.example")
    with LogCapture().installed(logging.INFO) as logs:
        # each used to be left hanging by uvicorn (and then crash its shutdown)
        answer = await _exchange(port, _upgrade(f"/ws?token={'a' * 9000}"))
        assert answer.startswith(b"HTTP/1.1 414")
        answer = await _exchange(port, _upgrade(extra=f"Authorization: Bearer {'a' * 9000}\r\n"))
        assert answer.startswith(b"HTTP/1.1 431")
        headers = "".join(f"X-H{i}: {i}\r\n" for i in range(200))
        answer = await _exchange(port, _upgrade(extra=headers))
        assert answer.startswith(b"HTTP/1.1 431")
        # refusals before accept are complete answers, not "ASGI callable returned
        # without completing handshake" errors
        answer = await _exchange(port, _upgrade(extra="Origin: https://evil.example\r\n"))
        assert answer.startswith(b"HTTP/1.1 403")
        # a client vanishing mid-frame, mid-handshake and mid-emit-body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_upgrade(extra="Origin: https://app.example\r\n"))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x81\xfe\x01\x00" + b"\x00" * 10)  # a masked text frame cut short
        writer.close()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_upgrade()[:40])
        writer.close()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        emit_token = srv.token("svc", publish=[">"])
        writer.write(
            f"POST /emit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {emit_token}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"chan'.encode()
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.2)
        await bystander.still_served(nc)
        await srv.stop()  # graceful: sessions closed 1012, NATS drained, no crash
    await asyncio.sleep(0.1)
    assert bystander.close_code == 1012
    assert "Traceback" not in logs.text, logs.text
    assert "ERROR" not in logs.text, logs.text


async def subscribed_clients(srv: Any, channel: str, n: int) -> list[WSClient]:
    """``n`` authenticated WebSocket clients (users u0..), each subscribed to ``channel``."""
    clients = [await srv.client(srv.token(f"u{i}")) for i in range(n)]
    for c in clients:
        await c.subscribe(channel)
    await asyncio.sleep(0.05)
    return clients


async def test_upgraded_connections_leave_no_garbage_cycles(start_server, nc, channel):
    """The HTTP protocol object that read an upgrade is freed at once, not by the cyclic GC.

    Otherwise every WebSocket leaves ~5 KiB for full collections to find: a reconnect
    storm's memory and most of its CPU (docs/benchmarks.md).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    srv = await start_server()
    with refcounting_only():
        await subscribed_clients(srv, channel, 20)
        leftover = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)]
        assert leftover == []
        assert len(srv.node.hub.clients) == 20


async def test_closed_websockets_leave_no_garbage_cycles(start_server, nc, channel):
    """A WebSocket that is gone -- closed by the client, by the server, or its TCP
    aborted -- is freed at once, not by the cyclic GC.

    ``pushsvc serve`` makes full collections rare; before the fix each closed
    connection left its ``websockets`` protocol in a cycle with its frame parser,
    and RSS grew ~1.7 KiB with every reconnect (docs/capacity.md, "Soak").
    """
    from websockets.server import ServerProtocol

    srv = await start_server()
    with refcounting_only():
        clients = await subscribed_clients(srv, channel, 12)
        assert sum(isinstance(o, ServerProtocol) for o in gc.get_objects()) == 12
        for c in clients[:4]:
            await c.close()  # closing handshake from the client
        for c in clients[4:8]:
            c.ws.transport.abort()  # TCP reset, no close frame
        for c in clients[8:]:
            await c.ws.send("x" * (srv.settings.max_frame_bytes + 1))  # server closes 1009
            assert await c.closed() == 1009
        await until(lambda: not srv.node.hub.clients, within=2.0)
        await asyncio.sleep(0.1)  # the last connection_lost calls
        leftover = [o for o in gc.get_objects() if isinstance(o, ServerProtocol)]
        assert leftover == []
