"""``GET /history/{channel}?since=N&limit=L``: recent messages for backends.

Authorised like a subscribe: ``Authorization: Bearer <JWT>`` whose ``channels``
grants cover the channel (or an API key). Answers 200
``{"channel", "recovered", "last_seq", "more", "messages": [{"seq", "data", "encoding"?}]}``
with messages of seq > ``since`` (default 0), oldest first, at most ``limit``
(default and maximum ``PUSHSVC_HISTORY_SIZE``). Errors as the emit shim: 401, 403,
422, and 503 with ``Retry-After`` when history is off or NATS cannot answer.
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from .auth import Authenticator, AuthError
from .bus import Bus, Unavailable
from .channels import InvalidChannel, validate_channel
from .emit import EmitError
from .protocol import payload_to_data
from .settings import Settings


class HistoryItem(msgspec.Struct, omit_defaults=True):
    """One stored message as returned by the history endpoint."""

    seq: int
    data: msgspec.Raw
    encoding: str | None = None


class HistoryPage(msgspec.Struct):
    """Body of a history answer."""

    channel: str
    recovered: bool
    last_seq: int
    more: bool
    messages: list[HistoryItem]


def history_router(settings: Settings, bus: Bus, auth: Authenticator) -> APIRouter:
    """Build the history route (reads the JetStream stream through the bus)."""
    router = APIRouter()

    @router.get("/history/{channel}")
    async def history(
        channel: str,
        request: Request,
        since: int = Query(0, ge=0),
        limit: int | None = Query(None, ge=1),
    ) -> Response:
        """Stored messages of ``channel`` after ``since``."""
        try:
            header = request.headers.get("authorization", "")
            scheme, _, credential = header.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise EmitError(401, "unauthorized", "missing Authorization: Bearer token")
            try:
                principal = auth.verify_emit(credential.strip())
            except AuthError as exc:
                raise EmitError(401, "unauthorized", str(exc)) from None
            try:
                channel = validate_channel(channel)
            except InvalidChannel as exc:
                raise EmitError(422, "invalid_channel", str(exc)) from None
            is_api_key = principal.publish == (">",) and principal.sub.startswith("apikey:")
            if not (is_api_key or principal.can_subscribe(channel)):
                raise EmitError(403, "forbidden", f"not allowed to read {channel}")
            cap = settings.history_size
            try:
                page = await bus.history(channel, since, min(limit or cap, cap))
            except Unavailable as exc:
                raise EmitError(503, "unavailable", str(exc), retry_after=exc.retry_after) from None
        except EmitError as exc:
            return exc.response()
        items = []
        for m in page.messages:
            data, encoding = payload_to_data(m.payload)
            items.append(HistoryItem(seq=m.seq, data=data, encoding=encoding))
        body = HistoryPage(channel, page.recovered, page.last_seq, page.more, items)
        return Response(msgspec.json.encode(body), media_type="application/json")

    return router
