"""``GET /history/{channel}?since=N&epoch=E&limit=L``: recent messages for backends.

Authorised like a subscribe: ``Authorization: Bearer <JWT>`` whose ``channels``
grants cover the channel (the JWT may be a connection token, as for ``/ws``, or an
emit token with ``PUSHSVC_EMIT_AUDIENCE``/``PUSHSVC_EMIT_TYPE``; a ``publish``
grant is not enough), or a configured API key (any channel). Answers 200
``{"channel", "epoch", "recovered", "last_seq", "more", "messages": [...]}`` (each
message ``{"seq", "data", "encoding"?, "publisher"?}``)
with messages of seq > ``since`` (default 0), oldest first, at most ``limit``
(default and maximum ``PUSHSVC_HISTORY_SIZE``). ``epoch`` is the stream epoch
``since`` belongs to; a position of another epoch (or, without ``epoch``, a
``since`` past the stream's last sequence) is answered from the start of the
current epoch with ``recovered`` false, as a WebSocket resume is. Errors as the
emit shim: 400 (``since`` or ``limit`` not an integer >= 0 / >= 1, ``epoch`` longer
than 64 characters), 401, 403, 422 (invalid channel), and 503
with ``Retry-After`` when history is off or NATS cannot answer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from ..auth.credentials import reader
from ..auth.tokens import Authenticator, AuthError
from ..bus import Bus, Unavailable
from ..channels import InvalidChannel, validate_channel
from ..config.settings import Settings
from ..protocol import MAX_SEQ, PublishedBy, payload_to_data, position_error, publisher_of
from .errors import HTTPError, json_response
from .openapi import CHANNEL_SCHEMA, SECURITY, declare, errors, json_body, ref


class HistoryItem(msgspec.Struct, omit_defaults=True):
    """One stored message as returned by the history endpoint."""

    seq: Annotated[int, msgspec.Meta(ge=1)]
    data: Annotated[msgspec.Raw, msgspec.Meta(description="the payload mapped as on /ws")]
    encoding: Literal["base64"] | None = None
    publisher: PublishedBy | None = None


class HistoryPage(msgspec.Struct):
    """Body of a history answer."""

    channel: str
    recovered: Annotated[bool, msgspec.Meta(description="nothing after since is missing")]
    last_seq: Annotated[int, msgspec.Meta(ge=0, description="the stream's last sequence")]
    more: Annotated[bool, msgspec.Meta(description="limit cut the page: ask again")]
    messages: list[HistoryItem]
    epoch: str | None = None


def history_router(settings: Settings, bus: Bus, auth: Authenticator) -> APIRouter:
    """Build the history route (reads the JetStream stream through the bus)."""
    router = APIRouter()

    # since/limit are parsed here (400 with the error body, not FastAPI's 422), so
    # the integer schema is only declared.
    @router.get(
        "/history/{channel}",
        operation_id="history",
        summary="Stored messages of a channel",
        response_model=None,
        dependencies=SECURITY,
        responses={
            200: json_body(ref(HistoryPage), "Stored messages after since, oldest first"),
            **errors(400, 401, 403, 422, 503),
        },
    )
    async def history(
        channel: Annotated[str, Path(json_schema_extra=CHANNEL_SCHEMA)],
        request: Request,
        since: str | None = Query(
            None,
            description="answer messages with seq > since",
            json_schema_extra=declare({"type": "integer", "minimum": 0, "maximum": MAX_SEQ}),
        ),
        limit: str | None = Query(
            None,
            description="at most this many (default and maximum PUSHSVC_HISTORY_SIZE)",
            json_schema_extra=declare({"type": "integer", "minimum": 1, "maximum": MAX_SEQ}),
        ),
        epoch: str | None = Query(
            None,
            description="the stream epoch since belongs to (from welcome/subscribed/history)",
            json_schema_extra=declare({"type": "string", "minLength": 1, "maxLength": 64}),
        ),
    ) -> Response:
        """Stored messages of ``channel`` after ``since``."""
        try:
            principal = reader(request, auth)
            try:
                channel = validate_channel(channel)
            except InvalidChannel as exc:
                raise HTTPError(422, "invalid_channel", str(exc)) from None
            if not (principal is None or principal.can_subscribe(channel)):
                try:  # the subscribe callout may allow what the grants do not
                    allowed = await auth.may_subscribe(principal, None, channel)
                except AuthError as exc:
                    raise HTTPError(503, "unavailable", str(exc), retry_after=5) from None
                if not allowed:
                    raise HTTPError(403, "forbidden", f"not allowed to read {channel}")
            after = 0 if since is None else _count(since, "since", 0)
            if (problem := position_error(None, epoch)) is not None:
                raise HTTPError(400, "bad_request", problem)
            most = None if limit is None else _count(limit, "limit", 1)
            cap = settings.history_size
            try:
                page = await bus.history(channel, after, min(most or cap, cap), epoch=epoch)
            except Unavailable as exc:
                raise HTTPError(503, "unavailable", str(exc), retry_after=exc.retry_after) from None
        except HTTPError as exc:
            return exc.response()
        items = []
        for m in page.messages:
            data, encoding = payload_to_data(m.payload)
            items.append(
                HistoryItem(m.seq, data, encoding=encoding, publisher=publisher_of(m.headers))
            )
        body = HistoryPage(
            channel, page.recovered, page.last_seq, page.more, items, epoch=page.epoch
        )
        return json_response(body)

    return router


def _count(value: str, name: str, minimum: int) -> int:
    """Parse a query parameter as an integer in ``minimum``..``MAX_SEQ`` (2^64-1, stream
    sequences are uint64; see :data:`pushsvc.protocol.MAX_SEQ`).

    Raises:
        HTTPError: 400 ``bad_request`` naming the parameter.
    """
    number = int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None
    if number is None or not minimum <= number <= MAX_SEQ:
        raise HTTPError(
            400, "bad_request", f"{name} must be an integer from {minimum} to {MAX_SEQ}"
        )
    return number
