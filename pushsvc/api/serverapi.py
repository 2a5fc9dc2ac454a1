"""``POST /api/{op}``: the cluster-wide server API over HTTP, for backends.

The same operations, bodies and answers as NATS requests on ``<prefix>-api.<op>``
(:mod:`pushsvc.serverapi`; docs/server-api.md). ``Authorization: Bearer <API
key>`` (one of ``PUSHSVC_API_KEYS``): no credential or an unknown one is 401, a
valid JWT (connection or emit token) is 403 (the server API acts on every user's
connections: only API keys may call it). Errors are JSON
``{"error": code, "message": text}``: 400 bad body, 404 unknown op, 413 body over
``PUSHSVC_MAX_EMIT_BYTES``, 422 invalid channel or pattern, 503 with
``Retry-After`` when NATS (or the presence bucket) cannot answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Security
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from .. import metrics
from ..auth.credentials import bearer_credential
from ..auth.tokens import Authenticator, AuthError
from ..config.settings import Settings
from ..serverapi.cluster import ServerAPI
from ..serverapi.schemas import (
    OPS,
    ApiError,
    ChannelsReply,
    ConnectionsReply,
    Disconnected,
    InfoReply,
    PresenceReply,
    PresenceStatsReply,
    SubscribedCount,
    UnsubscribedCount,
)
from .errors import HTTPError
from .openapi import API_KEY_SCHEME, errors, json_body, ref

_BODY: dict[str, Any] = {
    "required": False,
    "description": "The operation's JSON object (docs/server-api.md); empty = {}",
    "content": {
        "application/json": {
            "schema": {"type": "object"},
            "examples": {
                "disconnect": {"value": {"user": "alice", "reconnect": False}},
                "subscribe": {"value": {"user": "alice", "channel": "news"}},
                "channels": {"value": {"pattern": "chat.>"}},
                "connections": {"value": {"user": "alice"}},
                "presence": {"value": {"channel": "chat.room1"}},
            },
        }
    },
}
_REPLIES = [
    Disconnected,
    SubscribedCount,
    UnsubscribedCount,
    ChannelsReply,
    InfoReply,
    ConnectionsReply,
    PresenceReply,
    PresenceStatsReply,
]


def server_api_router(settings: Settings, api: ServerAPI, auth: Authenticator) -> APIRouter:
    """Build ``POST /api/{op}`` over ``api`` (the node's :class:`ServerAPI`)."""
    router = APIRouter()

    def authorise(request: Request) -> None:
        credential = bearer_credential(request)
        if auth.is_api_key(credential):
            return
        try:
            try:
                auth.verify(credential)
            except AuthError:
                auth.verify(credential, purpose="emit")
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise HTTPError(401, "unauthorized", "unknown API key or invalid token") from None
        raise HTTPError(403, "forbidden", "the server API needs an API key (PUSHSVC_API_KEYS)")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_emit_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, "too_large", f"body larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise HTTPError(400, "bad_request", "client disconnected mid-body") from None
        return b"".join(chunks)

    @router.post(
        "/api/{op}",
        operation_id="serverApi",
        summary="Server API: act on connections cluster-wide (docs/server-api.md)",
        response_model=None,
        dependencies=[Security(API_KEY_SCHEME)],
        responses={
            200: json_body({"anyOf": [ref(r) for r in _REPLIES]}, "The operation's answer"),
            **errors(400, 401, 403, 404, 413, 422, 503),
        },
        openapi_extra={"requestBody": _BODY},
    )
    async def server_api(
        op: Annotated[str, Path(json_schema_extra={"enum": list(OPS)})], request: Request
    ) -> Response:
        """Run one server API operation on every node; answered once every live node
        answered or ``PUSHSVC_API_TIMEOUT`` passed (``missing_nodes``)."""
        try:
            authorise(request)
            body = await read_body(request)
            try:
                answer = await api.call(op, body)
            except ApiError as exc:
                raise HTTPError(exc.status, exc.code, str(exc), exc.retry_after) from None
        except HTTPError as exc:
            return exc.response()
        return Response(answer, media_type="application/json")

    return router
