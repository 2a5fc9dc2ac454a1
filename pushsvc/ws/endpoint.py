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

Checks, in order (OWASP WebSocket Security Cheat Sheet):

1. a present ``Origin`` against ``PUSHSVC_ALLOWED_ORIGINS`` (exact match) -> 403
   (no ``Origin`` header: a non-browser client, checked by its token only);
2. draining -> 503 (``Retry-After``);
3. ``PUSHSVC_MAX_CONNECTIONS`` sockets on the node, *including* sockets still
   waiting for their auth frame, or the process's open-file capacity reached
   (:mod:`pushsvc.server.capacity`) -> 503 (``Retry-After``);
4. the handshake token, if any -> 403; ``PUSHSVC_MAX_CONNECTIONS_PER_USER``
   -> 429 (with an auth frame instead: close 4008). A slot is reserved from the
   check until the session registers with the hub, so parallel handshakes of
   one user cannot overshoot the cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser

from .. import metrics
from ..auth.tokens import Authenticator, AuthError, Principal
from ..config.settings import Settings
from ..core.client import ASGIReceive, ASGISend, Session
from ..core.hub import Hub
from ..core.presence import PresenceRegistry
from ..core.ratelimit import BucketRegistry
from ..protocol import (
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    Auth,
    ProtocolError,
    SubResume,
    decode_command,
)

log = logging.getLogger("pushsvc.ws.endpoint")


class WebSocketEndpoint:
    """ASGI app for ``/ws``.

    Args:
        settings: origins, caps, auth timeout, limits.
        hub: the node's hub.
        auth: token verifier.
        buckets: per-user command token buckets.
        accepting: returns False while the node drains (new handshakes get 503).
        presence: the node's presence registry, handed to every session (None: the
            ``presence`` commands are answered ``bad_request``).
        at_capacity: returns True when the process holds all the connections its
            open-file limit allows (:meth:`pushsvc.server.capacity.FdBudget.full`):
            new handshakes get 503 + ``Retry-After``, as at ``PUSHSVC_MAX_CONNECTIONS``.
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        auth: Authenticator,
        buckets: BucketRegistry,
        accepting: Callable[[], bool],
        presence: PresenceRegistry | None = None,
        at_capacity: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.auth = auth
        self.buckets = buckets
        self.accepting = accepting
        self.presence = presence
        self.at_capacity = at_capacity or _never
        self.allowed_origins = frozenset(normalise_origin(o) for o in settings.allowed_origins)
        #: sockets between handshake and close, authenticated or not (the global cap)
        self.open_sockets = 0
        # per user: handshakes admitted but not yet registered with the hub
        self._reserved: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        assert scope["type"] == "websocket"
        headers = Headers(scope=scope)
        # OWASP WebSocket cheat sheet: check Origin before accepting (cross-site
        # WebSocket hijacking); exact match, scheme and port included. Browsers always
        # send Origin on a WebSocket handshake (RFC 6455 4.1, Fetch), so a missing
        # header means a non-browser client, which hijacking cannot involve: it is
        # accepted (its token is still required), as NATS's same_origin and
        # gorilla/websocket do. A present Origin not in the list, `null` included, is not.
        origin = headers.get("origin")
        if self.allowed_origins and origin is not None and origin not in self.allowed_origins:
            await _deny(scope, receive, send, 403, "origin not allowed", "origin")
            return
        if not self.accepting():
            await _deny(scope, receive, send, 503, "server is draining", "draining", retry=5)
            return
        # Counts sockets still waiting for their auth frame too, so unauthenticated
        # clients cannot hold more than the cap between them.
        if self.open_sockets >= self.settings.max_connections or self.at_capacity():
            await _deny(scope, receive, send, 503, "connection limit reached", "capacity", retry=5)
            return
        self.open_sockets += 1
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            self.open_sockets -= 1

    async def _serve(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend, headers: Headers
    ) -> None:
        token = self._handshake_token(scope, headers)
        principal: Principal | None = None
        if token is not None:
            try:
                principal = self.auth.verify(token)
            except AuthError as exc:
                _auth_failed(exc, scope, "handshake")
                await _deny(scope, receive, send, 403, str(exc), "unauthorized")
                return
            if not self._reserve(principal.sub):
                await _deny(scope, receive, send, 429, "too many connections", "user_limit")
                return
        reserved = None if principal is None else principal.sub
        try:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            resume: dict[str, SubResume] | None = None
            if principal is None:
                authed = await self._auth_frame(scope, receive, send)
                if authed is None:
                    return
                principal, resume = authed
                reserved = principal.sub
            session = Session(
                send,
                receive,
                principal,
                self.hub,
                self.auth,
                self.buckets.get(principal.sub),
                self.settings,
                resume_subs=resume,
                presence=self.presence,
            )
        finally:
            # Session.run registers with the hub before its first await, so handing
            # the reservation over here leaves no window for another handshake.
            if reserved is not None:
                self._release(reserved)
        await session.run()

    def _reserve(self, sub: str) -> bool:
        """Hold one of ``sub``'s ``max_connections_per_user`` slots; False when full.

        Open sessions and handshakes in flight both count, so parallel handshakes of
        one user cannot overshoot the cap while they await accept.
        """
        held = self.hub.user_connections(sub) + self._reserved.get(sub, 0)
        if held >= self.settings.max_connections_per_user:
            return False
        self._reserved[sub] = self._reserved.get(sub, 0) + 1
        return True

    def _release(self, sub: str) -> None:
        left = self._reserved.get(sub, 0) - 1
        if left > 0:
            self._reserved[sub] = left
        else:
            self._reserved.pop(sub, None)

    def _handshake_token(self, scope: dict[str, Any], headers: Headers) -> str | None:
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        query = scope.get("query_string")
        if query:  # (most handshakes have none: no parse)
            token = QueryParams(query).get("token")
            if token:
                return token
        if self.settings.auth_cookie and "cookie" in headers:
            token = cookie_parser(headers["cookie"]).get(self.settings.auth_cookie)
            if token:
                return token
        return None

    async def _auth_frame(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> tuple[Principal, dict[str, SubResume] | None] | None:
        """Wait for ``{"op":"auth"}``; on failure close 4001/4008 and return None.

        Returns:
            The principal and the frame's ``subs`` resume map (or None).
        """
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
            _auth_failed(exc, scope, "auth frame")
            await _close(send, CLOSE_UNAUTHORIZED, str(exc))
            return None
        if not self._reserve(principal.sub):
            await _close(send, CLOSE_RATE_LIMITED, "too many connections for this user")
            return None
        return principal, cmd.subs


def _never() -> bool:
    return False


def normalise_origin(origin: str) -> str:
    """An allowlist entry as browsers serialise an Origin (RFC 6454 6.2).

    Scheme and host are lower case and there is no trailing ``/``; the port stays
    (a non-default port is part of the origin). Incoming ``Origin`` headers are
    compared to these entries byte for byte.
    """
    return origin.strip().rstrip("/").lower()


def _auth_failed(exc: AuthError, scope: dict[str, Any], where: str) -> None:
    """Count and log a refused token (reason code and peer address; never the token)."""
    metrics.AUTH_FAILURES.labels(exc.reason).inc()
    client = scope.get("client")
    log.info(
        "token refused",
        extra={"reason": exc.reason, "where": where, "peer": client[0] if client else None},
    )


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
    retry: int | None = None,
) -> None:
    """Refuse a handshake before accept with an HTTP status and a text reason.

    ``retry`` (seconds) adds ``Retry-After`` (RFC 9110 10.2.3) to 503 answers.
    ``reason`` must be client-safe: it never contains the token.
    """
    metrics.HANDSHAKES_REJECTED.labels(label).inc()
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if retry is not None:
            headers.append((b"retry-after", str(retry).encode()))
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": reason.encode()})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
