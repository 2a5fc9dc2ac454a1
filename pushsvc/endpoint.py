"""The ``GET /ws`` handshake: origin, connection caps and authentication, then a Session.

A raw ASGI endpoint (no Starlette ``WebSocket`` wrapper on the hot path). The
token is taken, in this order (wire contract v1):

1. ``Authorization: Bearer <jwt>`` header, 2. ``?token=`` query parameter,
3. the cookie named by ``PUSHSVC_AUTH_COOKIE`` (only with an origin allowlist),
4. otherwise the first frame ``{"op":"auth","token":...}`` within
   ``PUSHSVC_AUTH_TIMEOUT`` seconds.

A bad token presented in the handshake is refused with HTTP 403 before accept;
a bad token in the auth frame closes with 4001. Refusals before accept use the
ASGI "websocket.http.response" extension when the server offers it (status
403/429/503 with a reason body), else a plain ASGI close (HTTP 403).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser

from . import metrics
from .auth import Authenticator, AuthError, Principal
from .hub import Hub
from .protocol import (
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    Auth,
    ProtocolError,
    decode_command,
)
from .ratelimit import BucketRegistry
from .session import ASGIReceive, ASGISend, Session
from .settings import Settings

log = logging.getLogger("pushsvc.endpoint")


class WebSocketEndpoint:
    """ASGI app for ``/ws``.

    Args:
        settings: origins, caps, auth timeout, limits.
        hub: the node's hub.
        auth: token verifier.
        buckets: per-user command token buckets.
        accepting: returns False while the node drains (new handshakes get 503).
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        auth: Authenticator,
        buckets: BucketRegistry,
        accepting: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.auth = auth
        self.buckets = buckets
        self.accepting = accepting
        self.allowed_origins = frozenset(settings.allowed_origins)

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        assert scope["type"] == "websocket"
        headers = Headers(scope=scope)
        if self.allowed_origins and headers.get("origin") not in self.allowed_origins:
            await _deny(scope, receive, send, 403, "origin not allowed", "origin")
            return
        if not self.accepting():
            await _deny(scope, receive, send, 503, "server is draining", "draining")
            return
        if len(self.hub.sessions) >= self.settings.max_connections:
            await _deny(scope, receive, send, 503, "connection limit reached", "capacity")
            return
        token = self._handshake_token(scope, headers)
        principal: Principal | None = None
        if token is not None:
            try:
                principal = self.auth.verify(token)
            except AuthError as exc:
                await _deny(scope, receive, send, 403, str(exc), "unauthorized")
                return
            if self.hub.user_connections(principal.sub) >= self.settings.max_connections_per_user:
                await _deny(scope, receive, send, 429, "too many connections", "user_limit")
                return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        if principal is None:
            principal = await self._auth_frame(receive, send)
            if principal is None:
                return
        session = Session(
            send,
            receive,
            principal,
            self.hub,
            self.auth,
            self.buckets.get(principal.sub),
            self.settings,
        )
        await session.run()

    def _handshake_token(self, scope: dict[str, Any], headers: Headers) -> str | None:
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        token = QueryParams(scope.get("query_string", b"")).get("token")
        if token:
            return token
        if self.settings.auth_cookie and "cookie" in headers:
            token = cookie_parser(headers["cookie"]).get(self.settings.auth_cookie)
            if token:
                return token
        return None

    async def _auth_frame(self, receive: ASGIReceive, send: ASGISend) -> Principal | None:
        """Wait for ``{"op":"auth"}``; on failure close 4001/4008 and return None."""
        try:
            async with asyncio.timeout(self.settings.auth_timeout):
                message = await receive()
        except TimeoutError:
            await _close(send, CLOSE_UNAUTHORIZED, "auth timeout")
            return None
        if message["type"] != "websocket.receive":
            return None
        text = message.get("text")
        if text is None or len(text) > self.settings.max_frame_bytes:
            await _close(send, CLOSE_UNAUTHORIZED, "expected an auth frame")
            return None
        try:
            cmd = decode_command(text)
        except ProtocolError:
            cmd = None
        if not isinstance(cmd, Auth):
            await _close(send, CLOSE_UNAUTHORIZED, "expected an auth frame")
            return None
        try:
            principal = self.auth.verify(cmd.token)
        except AuthError as exc:
            await _close(send, CLOSE_UNAUTHORIZED, str(exc))
            return None
        if self.hub.user_connections(principal.sub) >= self.settings.max_connections_per_user:
            await _close(send, CLOSE_RATE_LIMITED, "too many connections for this user")
            return None
        return principal


async def _close(send: ASGISend, code: int, reason: str) -> None:
    metrics.CLOSES.labels(str(code)).inc()
    try:
        await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
    except Exception:
        pass  # peer already gone


async def _deny(
    scope: dict[str, Any],
    receive: ASGIReceive,
    send: ASGISend,
    status: int,
    reason: str,
    label: str,
) -> None:
    """Refuse a handshake before accept with an HTTP status and a text reason."""
    metrics.HANDSHAKES_REJECTED.labels(label).inc()
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": reason.encode()})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
