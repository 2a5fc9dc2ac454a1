"""``GET /sse`` (Server-Sent Events) and ``POST /stream`` (NDJSON): open a stream, then a Client.

Raw ASGI endpoints, thin like the WebSocket one: admission (the same
:class:`~pushsvc.core.admission.Admission` and caps as ``/ws``), the token, the
channels and the resume position, then a :class:`~pushsvc.core.client.Client` over a
:class:`~pushsvc.sse.transport.StreamTransport`. Every refusal is a plain HTTP
answer *before* the stream starts (``{"error", "message"}``; an ``EventSource``
then stops for good): 400 bad channel or position, 401 no/bad/expired/used
ticket or token, 403 origin refused or channel not granted, 429 the user's cap,
503 + ``Retry-After`` draining, at the global cap or NATS away. After the 200 the
stream never turns into an error status; it ends with a ``close`` event.

Credentials, in this order: ``?ticket=`` (single use, :class:`~pushsvc.bus.tickets.Tickets`),
``Authorization: Bearer``, ``?token=``, the cookie ``PUSHSVC_AUTH_COOKIE``.

Position: ``Last-Event-ID`` (the browser's own reconnect) or ``last_event_id``
(query for ``/sse``, body field for ``/stream``; the header wins), an event id
``<epoch>:<seq>``: every channel of the stream resumes after ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from starlette.datastructures import Headers, QueryParams

from .. import metrics
from ..auth.callouts import CalloutUnavailable
from ..auth.credentials import handshake_token
from ..auth.tokens import AuthError, Principal
from ..bus import Unavailable
from ..bus.tickets import Tickets
from ..channels import InvalidChannel, is_pattern, validate_channel, validate_pattern
from ..core.admission import USER_LIMIT, Admission, Refusal
from ..core.client import ClientFactory
from ..protocol import CLOSE_SERVICE_RESTART, MAX_EPOCH_LENGTH, SubResume, position_error
from .sessions import StreamSessions
from .transport import Framing, StreamTransport

log = logging.getLogger("pushsvc.sse")

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]


class StreamBody(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of ``POST /stream``."""

    channels: list[str]
    last_event_id: str | None = None


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, retry: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry = status, code, retry


def parse_event_id(value: str) -> SubResume:
    """``<epoch>:<seq>`` -> the position every channel resumes from.

    Raises:
        ValueError: not of that form, or a bad seq / epoch.
    """
    epoch, sep, seq = value.strip().rpartition(":")
    if not sep or not seq.isdigit():
        raise ValueError("last event id must be <epoch>:<seq>")
    if len(epoch) > MAX_EPOCH_LENGTH:
        raise ValueError("epoch too long")
    since = int(seq)
    problem = position_error(since, epoch or None)
    if problem is not None:
        raise ValueError(problem)
    return SubResume(since=since, epoch=epoch or None)


class StreamEndpoint:
    """ASGI app for ``GET /sse`` (``kind="sse"``) or ``POST /stream`` (``kind="stream"``).

    Args:
        kind: ``"sse"`` or ``"stream"``.
        clients / admission: as for :class:`~pushsvc.ws.endpoint.WebSocketEndpoint`.
        sessions: the node's stream sessions (``POST /sse/commands`` finds them).
        tickets: the cluster's single-use tickets.
    """

    def __init__(
        self,
        kind: str,
        clients: ClientFactory,
        admission: Admission,
        sessions: StreamSessions,
        tickets: Tickets,
    ) -> None:
        self.kind = kind
        self.clients = clients
        self.settings = clients.settings
        self.auth = clients.auth
        self.admission = admission
        self.sessions = sessions
        self.tickets = tickets
        hub = clients.hub
        self.framing = Framing(kind, lambda: hub.epoch)
        self.unmarked = Framing(kind, lambda: hub.epoch, ids=False)
        self.content_type = (
            b"text/event-stream; charset=utf-8" if kind == "sse" else b"application/x-ndjson"
        )

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        assert scope["type"] == "http"
        headers = Headers(scope=scope)
        refusal = self.admission.check(headers.get("origin"))
        if refusal is not None:
            metrics.HANDSHAKES_REJECTED.labels(refusal.label).inc()
            await _answer(send, *_refusal_args(refusal))
            return
        self.admission.opened()
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            self.admission.closed()

    async def _serve(
        self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend, headers: Headers
    ) -> None:
        try:
            principal, channels, position = await self._admit(scope, receive, headers)
        except _Refused as exc:
            metrics.HANDSHAKES_REJECTED.labels(exc.code).inc()
            await _answer(send, exc.status, exc.code, str(exc), exc.retry)
            return
        if not self.admission.reserve(principal.sub):
            metrics.HANDSHAKES_REJECTED.labels(USER_LIMIT.label).inc()
            await _answer(send, *_refusal_args(USER_LIMIT))
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", self.content_type),
                        (b"cache-control", b"no-cache, no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            first = f"retry: {round(self.settings.sse_retry * 1000)}\n: pushsvc\n\n"
            if self.kind == "stream":
                first = ""
            await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
            transport = StreamTransport(self.kind, self.framing, self.unmarked, send, receive)
            secret = self.sessions.new_secret()
            client = self.clients.make(transport, principal, channels=channels, session=secret)
            if position is not None:
                client.resume_all(position)
            started = client.start()  # registers with the hub at its first step
        finally:
            self.admission.release(principal.sub)
        self.sessions.add(secret, client)
        transport.reader = asyncio.current_task()
        cycle = getattr(receive, "__self__", None)  # uvicorn's: ended at its shutdown
        if cycle is not None:
            with contextlib.suppress(AttributeError):
                cycle.pushsvc_shutdown = partial(
                    client.close, CLOSE_SERVICE_RESTART, "server shutting down"
                )
        try:
            await started
            while not client.closed:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
        except asyncio.CancelledError:
            if not client.closed:
                raise
        finally:
            self.sessions.remove(secret)
            client.gone()

    async def _admit(
        self, scope: dict[str, Any], receive: ASGIReceive, headers: Headers
    ) -> tuple[Principal, list[str], SubResume | None]:
        """Token, channels and position of a stream request; raises :class:`_Refused`."""
        query = QueryParams(scope.get("query_string", b""))
        last_id = headers.get("last-event-id")
        if self.kind == "sse":
            channels = query.getlist("channel")
            last_id = last_id or query.get("last_event_id")
        else:
            body = await _read_body(receive, self.settings.max_frame_bytes)
            try:
                parsed = msgspec.json.decode(body, type=StreamBody)
            except msgspec.DecodeError as exc:
                raise _Refused(400, "bad_request", f"body: {exc}") from None
            channels = parsed.channels
            last_id = last_id or parsed.last_event_id
        token = None
        ticket = query.get("ticket")
        if ticket:
            try:
                value = await self.tickets.consume(ticket)
            except Unavailable as exc:
                raise _Refused(503, "unavailable", str(exc), 5) from None
            if value is None:
                metrics.AUTH_FAILURES.labels("ticket").inc()
                raise _Refused(401, "unauthorized", "unknown, expired or used ticket")
            token = value.decode()
        else:
            token = handshake_token(headers, b"", self.settings.auth_cookie)
            token = token or query.get("token")
        if not token:
            metrics.AUTH_FAILURES.labels("missing").inc()
            raise _Refused(401, "unauthorized", "no token or ticket")
        client = scope.get("client")
        context = {
            "transport": self.kind,
            "origin": headers.get("origin"),
            "remote": client[0] if client else None,
        }
        try:
            principal = await self.auth.authenticate(token, context)
        except CalloutUnavailable as exc:  # the app's authorisation service is away
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise _Refused(503, "unavailable", str(exc), 5) from None
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise _Refused(401, "unauthorized", str(exc)) from None
        channels = await self._channels(principal, channels)
        position = None
        if last_id:
            try:
                position = parse_event_id(last_id)
            except ValueError as exc:
                raise _Refused(400, "bad_request", f"last event id: {exc}") from None
        return principal, channels, position

    async def _channels(self, principal: Principal, names: list[str]) -> list[str]:
        """Validate the stream's channels (grammar, wildcards, grants or the subscribe
        callout, the cap)."""
        limit = self.settings.max_subscriptions
        if not 1 <= len(names) <= limit:
            raise _Refused(400, "bad_request", f"give 1 to {limit} channels")
        out: list[str] = []
        for name in names:
            try:
                if is_pattern(name):
                    if not self.settings.wildcard_subscriptions:
                        raise InvalidChannel("wildcard subscriptions are off on this server")
                    channel = validate_pattern(name)
                else:
                    channel = validate_channel(name)
            except InvalidChannel as exc:
                raise _Refused(400, "invalid_channel", str(exc)) from None
            if not principal.can_subscribe(channel):
                try:
                    allowed = await self.auth.may_subscribe(principal, None, channel)
                except AuthError as exc:
                    raise _Refused(503, "unavailable", str(exc), 5) from None
                if not allowed:
                    raise _Refused(403, "forbidden", f"not allowed to subscribe to {channel}")
            out.append(channel)
        return list(dict.fromkeys(out))


def _refusal_args(refusal: Refusal) -> tuple[int, str, str, int | None]:
    code = {403: "forbidden", 429: "limit_exceeded", 503: "unavailable"}.get(
        refusal.status, "bad_request"
    )
    return refusal.status, code, refusal.reason, refusal.retry


async def _read_body(receive: ASGIReceive, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (else 413)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Refused(400, "bad_request", "request ended")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "too_large", f"body over {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _answer(send: ASGISend, status: int, code: str, message: str, retry: int | None) -> None:
    """A JSON error answer ``{"error", "message"}`` (never the token)."""
    headers = [(b"content-type", b"application/json")]
    if retry is not None:
        headers.append((b"retry-after", str(retry).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    body = msgspec.json.encode({"error": code, "message": message})
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
