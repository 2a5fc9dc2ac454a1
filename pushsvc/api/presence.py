"""``GET /presence/{channel}``: who is subscribed to a channel, cluster-wide, for backends.

Authorised by ``Authorization: Bearer <JWT>`` whose ``presence`` grants cover the
channel (a connection token, as for ``/ws``, or an emit token with
``PUSHSVC_EMIT_AUDIENCE``/``PUSHSVC_EMIT_TYPE``), or a configured API key (any
channel). Answers 200 ``{"channel", "clients": [{"client", "user", "node",
"info"?}], "users", "clients_total", "truncated"?}`` (the list capped at
``PUSHSVC_PRESENCE_LIMIT``, the counts exact). Errors (JSON as the emit shim):
401, 403 (no ``presence`` grant), 422 (invalid channel), 400 ``bad_request`` when
the channel is outside ``PUSHSVC_PRESENCE_CHANNELS``, 503 with ``Retry-After``
when presence is unavailable (no JetStream, NATS away).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from ..auth.credentials import reader
from ..auth.tokens import Authenticator
from ..config.settings import Settings
from ..core.presence import PresenceRefused, PresenceRegistry
from ..protocol import ClientInfo
from .errors import HTTPError, json_response
from .openapi import CHANNEL_SCHEMA, SECURITY, errors, json_body, ref


class PresencePage(msgspec.Struct, omit_defaults=True):
    """Body of a presence answer (the ``presence`` frame without ``type``/``id``)."""

    channel: str
    clients: Annotated[
        list[ClientInfo],
        msgspec.Meta(description="present sessions, at most PUSHSVC_PRESENCE_LIMIT"),
    ]
    users: Annotated[int, msgspec.Meta(ge=0, description="distinct users present (exact)")]
    clients_total: Annotated[int, msgspec.Meta(ge=0, description="sessions present (exact)")]
    truncated: Annotated[bool, msgspec.Meta(description="clients lists fewer")] | None = None


def presence_router(
    settings: Settings, registry: PresenceRegistry, auth: Authenticator
) -> APIRouter:
    """Build the presence route (reads the KV bucket through ``registry``)."""
    router = APIRouter()

    @router.get(
        "/presence/{channel}",
        operation_id="presence",
        summary="Who is subscribed to a channel, on every node",
        response_model=None,
        dependencies=SECURITY,
        responses={
            200: json_body(ref(PresencePage), "Present sessions (list capped, counts exact)"),
            **errors(400, 401, 403, 422, 503),
        },
    )
    async def presence(
        channel: Annotated[str, Path(json_schema_extra=CHANNEL_SCHEMA)], request: Request
    ) -> Response:
        """Present sessions of ``channel`` on every node."""
        try:
            snap = await registry.read_for(reader(request, auth), channel, settings.presence_limit)
        except PresenceRefused as exc:
            return HTTPError(exc.status, exc.code, str(exc), exc.retry_after).response()
        except HTTPError as exc:
            return exc.response()
        body = PresencePage(
            channel,
            snap.clients,
            snap.users,
            snap.clients_total,
            True if snap.truncated else None,
        )
        return json_response(body)

    return router
