"""``POST /sse/commands`` and ``POST /sse/ticket``: the two-way half of SSE / HTTP-streaming.

- ``POST /sse/commands`` ``{"session": S, "commands": [...]}``: the same command
  objects as WebSocket frames, answered on the stream in order, matched by ``id``
  (:class:`~pushsvc.sse.sessions.StreamSessions`). ``202`` once the owning node has
  taken them; ``404`` unknown or closed session (reconnect the stream); ``503``
  NATS away; ``413`` over ``PUSHSVC_MAX_FRAME_BYTES``; ``403`` a refused ``Origin``.
- ``POST /sse/ticket`` with ``Authorization: Bearer <JWT>``: a single-use ticket
  for ``GET /sse?ticket=T`` (an ``EventSource`` cannot send headers), valid
  ``PUSHSVC_TICKET_TTL`` seconds on any node: ``{"ticket", "expires_in"}``.
"""

from __future__ import annotations

import secrets

import msgspec
from fastapi import APIRouter, Request, Security
from fastapi.responses import Response

from .. import metrics
from ..auth.callouts import CalloutUnavailable
from ..auth.credentials import bearer_credential
from ..auth.tokens import Authenticator, AuthError
from ..bus import Unavailable
from ..bus.tickets import Tickets
from ..config.settings import Settings
from ..core.admission import Admission
from ..sse.sessions import CommandBatch, StreamSessions
from .errors import HTTPError, json_response
from .openapi import JWT_SCHEME, errors, json_body, ref


class Ticket(msgspec.Struct):
    """A single-use ticket for ``GET /sse?ticket=``; ``expires_in`` seconds."""

    ticket: str
    expires_in: float


class Accepted(msgspec.Struct):
    """The commands were taken by the session's node (answers come on the stream)."""

    accepted: int


_COMMANDS_RESPONSES = {
    202: json_body(ref(Accepted), "The session's node took the commands"),
    **errors(400, 403, 404, 413, 503),
}
_COMMANDS_BODY = {
    "required": True,
    "content": {"application/json": {"schema": ref(CommandBatch)}},
}
_TICKET_RESPONSES = {200: json_body(ref(Ticket), "A single-use ticket"), **errors(401, 503)}


def streams_router(
    settings: Settings,
    auth: Authenticator,
    admission: Admission,
    sessions: StreamSessions,
    tickets: Tickets,
) -> APIRouter:
    """Build the ``/sse/commands`` and ``/sse/ticket`` routes."""
    router = APIRouter()

    @router.post(
        "/sse/commands",
        operation_id="sseCommands",
        summary="Commands for an SSE / HTTP-streaming connection",
        status_code=202,
        response_model=None,
        responses=_COMMANDS_RESPONSES,
        openapi_extra={"requestBody": _COMMANDS_BODY},
    )
    async def commands(request: Request) -> Response:
        """Apply commands to a stream session; the answers arrive on its stream."""
        try:
            if not admission.origin_allowed(request.headers.get("origin")):
                raise HTTPError(403, "forbidden", "origin not allowed")
            body = await request.body()
            if len(body) > settings.max_frame_bytes:
                raise HTTPError(413, "too_large", f"body over {settings.max_frame_bytes} bytes")
            try:
                status = await sessions.apply(body)
            except msgspec.DecodeError as exc:
                raise HTTPError(400, "bad_request", f"body: {exc}") from None
            if status == 404:
                raise HTTPError(404, "not_found", "unknown or closed session: reconnect")
            if status == 503:
                raise HTTPError(503, "unavailable", "the session's node did not answer", 1)
            if status != 202:
                raise HTTPError(status, "bad_request", "commands refused")
        except HTTPError as exc:
            return exc.response()
        count = len(msgspec.json.decode(body).get("commands", []))
        return json_response(Accepted(count), 202)

    @router.post(
        "/sse/ticket",
        operation_id="sseTicket",
        summary="A single-use ticket for GET /sse",
        response_model=None,
        dependencies=[Security(JWT_SCHEME)],
        responses=_TICKET_RESPONSES,
    )
    async def ticket(request: Request) -> Response:
        """Mint a ticket for the bearer token (verified now and again at use)."""
        try:
            token = bearer_credential(request)
            client = request.client
            context = {
                "transport": "sse",
                "origin": request.headers.get("origin"),
                "remote": client.host if client else None,
            }
            try:
                await auth.authenticate(token, context)
            except CalloutUnavailable as exc:
                metrics.AUTH_FAILURES.labels(exc.reason).inc()
                raise HTTPError(503, "unavailable", str(exc), 5) from None
            except AuthError as exc:
                metrics.AUTH_FAILURES.labels(exc.reason).inc()
                raise HTTPError(401, "unauthorized", str(exc)) from None
            value = secrets.token_urlsafe(24)
            try:
                await tickets.create(value, token.encode())
            except Unavailable as exc:
                raise HTTPError(503, "unavailable", str(exc), 1) from None
        except HTTPError as exc:
            return exc.response()
        return json_response(Ticket(value, tickets.ttl))

    return router
