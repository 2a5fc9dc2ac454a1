"""The ``GET /ws`` handshake and read loop: admission, authentication, then a Client.

A raw ASGI endpoint (no Starlette ``WebSocket`` wrapper on the hot path). The
token is taken, in this order (wire contract v1): ``Authorization: Bearer``,
``?token=``, the cookie ``PUSHSVC_AUTH_COOKIE`` (:func:`~pushsvc.auth.credentials.handshake_token`),
otherwise the first frame ``{"op":"auth","token":...}`` within
``PUSHSVC_AUTH_TIMEOUT`` seconds.

Admission (origin, draining, the caps every transport shares) is
:class:`~pushsvc.core.admission.Admission`. A bad token presented in the
handshake is refused with HTTP 403 before accept; a bad token in the auth frame
closes with 4001. Refusals before accept use the ASGI "websocket.http.response"
extension when the server offers it (status 403/429/503 with a reason body),
else a plain ASGI close (HTTP 403).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.datastructures import Headers

from .. import metrics
from ..auth.callouts import CalloutUnavailable
from ..auth.credentials import handshake_token
from ..auth.tokens import AuthError, Principal
from ..core.admission import USER_LIMIT, Admission, Refusal
from ..core.client import Client, ClientFactory
from ..protocol import (
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    Auth,
    ProtocolError,
    SubResume,
    decode_command,
)
from .transport import ASGIReceive, ASGISend, WebSocketTransport, websocket_transport

log = logging.getLogger("pushsvc.ws.endpoint")


class WebSocketEndpoint:
    """ASGI app for ``/ws``.

    Args:
        clients: makes the clients (the node's settings, hub, token verifier, per-user
            command buckets and presence registry, shared by every transport).
        admission: the node's admission (origin, draining, caps; shared by every
            transport).
    """

    def __init__(self, clients: ClientFactory, admission: Admission) -> None:
        self.clients = clients
        self.settings = clients.settings
        self.auth = clients.auth
        self.admission = admission

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        assert scope["type"] == "websocket"
        admission = self.admission
        refusal = admission.check(Headers(scope=scope).get("origin"))
        if refusal is not None:
            await _deny(scope, receive, send, refusal)
            return
        admission.opened()
        try:
            await self._serve(scope, receive, send)
        finally:
            admission.closed()

    async def _serve(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        # no Headers kept in this frame: the connection's request headers are freed
        # once it is accepted (pushsvc.ws.protocol drops the scope's copy)
        token = handshake_token(
            Headers(scope=scope), scope.get("query_string", b""), self.settings.auth_cookie
        )
        principal: Principal | None = None
        if token is not None:
            try:
                principal = await self.auth.authenticate(
                    token, _context(scope, Headers(scope=scope))
                )
            except CalloutUnavailable as exc:  # the app's authorisation service is away
                _auth_failed(exc, scope, "handshake")
                await _deny(scope, receive, send, Refusal(503, str(exc), "unavailable", 5))
                return
            except AuthError as exc:
                _auth_failed(exc, scope, "handshake")
                await _deny(scope, receive, send, Refusal(403, str(exc), "unauthorized"))
                return
            if not self.admission.reserve(principal.sub):
                await _deny(scope, receive, send, USER_LIMIT)
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
            transport = websocket_transport(
                send,
                receive,
                compression=self.settings.compression,
                min_bytes=self.settings.compression_min_bytes,
            )
            client = self.clients.make(transport, principal, resume_subs=resume)
            # start() registers with the hub at its first step, run with no loop turn
            # after this finally: handing the reservation over leaves no window
            started = client.start()
        finally:
            if reserved is not None:
                self.admission.release(reserved)
        await _run(client, transport, receive, started)

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
            principal = await self.auth.authenticate(
                cmd.token, _context(scope, Headers(scope=scope))
            )
        except AuthError as exc:
            _auth_failed(exc, scope, "auth frame")
            await _close(send, CLOSE_UNAUTHORIZED, str(exc))
            return None
        if not self.admission.reserve(principal.sub):
            await _close(send, CLOSE_RATE_LIMITED, "too many connections for this user")
            return None
        return principal, cmd.subs


async def _run(
    client: Client, transport: WebSocketTransport, receive: ASGIReceive, started: Any
) -> None:
    """Serve an accepted connection until it closes: welcome, then read commands.

    ``started`` is :meth:`Client.start`'s coroutine, created (so the client is
    registered) but not yet awaited. Always unregisters the client.
    """
    transport.reader = asyncio.current_task()
    transport.established()
    pongs = transport.take_pongs(client.pong)
    try:
        await started
        while True:
            if client.closed:
                # Closed by a command (4001 refresh, 4008, 1009): returning now would
                # let the server drop the TCP connection before the close frame is
                # out (the client would see 1006). The close is time-bounded.
                await transport.wait_closed()
                break
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                await client.handle_text(text)
            elif kind == "websocket.disconnect":
                if not client.closed:  # the peer closed: its code (lifecycle events)
                    client.close_code = message.get("code", 1005)
                    client.close_reason = "closed by the client"
                break
    except asyncio.CancelledError:
        if not client.closed:
            raise
    finally:
        if pongs:
            transport.take_pongs(None)
        client.gone()


def _context(scope: dict[str, Any], headers: Headers) -> dict[str, str | None]:
    """What the connect callout is told about a WebSocket connection."""
    client = scope.get("client")
    return {
        "transport": "ws",
        "origin": headers.get("origin"),
        "remote": client[0] if client else None,
    }


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
    scope: dict[str, Any], receive: ASGIReceive, send: ASGISend, refusal: Refusal
) -> None:
    """Refuse a handshake before accept with an HTTP status and a text reason.

    ``refusal.retry`` (seconds) adds ``Retry-After`` (RFC 9110 10.2.3) to 503
    answers. The reason is client-safe: it never contains the token.
    """
    metrics.HANDSHAKES_REJECTED.labels(refusal.label).inc()
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if refusal.retry is not None:
            headers.append((b"retry-after", str(refusal.retry).encode()))
        await send(
            {
                "type": "websocket.http.response.start",
                "status": refusal.status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": refusal.reason.encode()})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason[:120]})
