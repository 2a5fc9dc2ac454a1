"""HTTP emit shim: ``POST /emit`` and ``POST /emit/{channel}`` publish into NATS.

- ``POST /emit`` JSON ``{"channel": C, "data": ANY}`` (``payload`` is an alias of
  ``data``) or a batch ``{"messages": [{"channel":..., "data":...}, ...]}``;
- ``POST /emit/{channel}``: the raw request body is the payload (bytes as sent);
- ``Authorization: Bearer <JWT with a matching publish grant | API key>``;
- ``Idempotency-Key: K`` becomes the NATS header ``Nats-Msg-Id`` (batch item i:
  ``K:i``), so a retried emit inside the dedupe window is stored and delivered once
  and answered with the original ``seq``;
- an emit by JWT carries the NATS header ``Pushsvc-User: <sub>`` (delivered as the
  message's ``publisher``); an emit by API key carries none;
- ``exclude_client`` (body field, per message) or the request header
  ``Pushsvc-Exclude-Client: <client>`` names one connection (``welcome.client``)
  not to deliver to; it becomes the NATS header of the same name.

Answers: 202 ``{"channel", "seq"}`` (batch: ``{"results": [...]}``) only after
NATS (JetStream, with history on) acknowledged the message. Errors are JSON
``{"error": code, "message": reason}``: 400 malformed, 401 no/bad credential,
403 no publish grant, 413 body over ``PUSHSVC_MAX_EMIT_BYTES`` (also for chunked
bodies), 415 a ``Content-Encoding`` other than ``identity`` (bodies are not
decoded, so a gzip body would be published as its compressed bytes; RFC 9110
15.5.16: the answer carries ``Accept-Encoding: identity``), 422 invalid channel,
429 with ``Retry-After`` (per-principal token bucket), 503 with ``Retry-After``
when NATS did not take it. The OpenAPI description of all this is declared here
with the helpers of :mod:`pushsvc.api.openapi`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from msgspec import Meta
from starlette.requests import ClientDisconnect

from .. import metrics
from ..auth.credentials import bearer_credential
from ..auth.tokens import Authenticator, AuthError, Principal
from ..bus import Unavailable
from ..channels import InvalidChannel, validate_channel
from ..config.settings import Settings
from ..core.hub import Hub
from ..core.ratelimit import BucketRegistry
from ..protocol import EXCLUDE_HEADER, USER_HEADER
from .errors import HTTPError, json_response
from .openapi import (
    CHANNEL_SCHEMA,
    SECURITY,
    Channel,
    Seq,
    amend,
    declare,
    errors,
    json_body,
    ref,
)

MAX_BATCH = 1000
MAX_CLIENT_ID = 64  # characters of an exclude_client (client ids are much shorter)
_CLIENT_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


# the schema of POST /emit's body (the route parses it as EmitItem, keeping data raw)
class EmitMessage(msgspec.Struct):
    """One message of ``POST /emit``: ``data`` (or its alias ``payload``) is any JSON value."""

    channel: Channel
    data: Annotated[Any, msgspec.Meta(description="the message, any JSON value")] = None
    payload: Annotated[
        Any, msgspec.Meta(description="alias of data (used when data is absent)")
    ] = None
    exclude_client: Annotated[
        str | None,
        msgspec.Meta(
            description="a connection (welcome.client) not to deliver to, e.g. the one "
            "whose action caused the emit (Pusher's socket_id exclusion)"
        ),
    ] = None


# needs data or payload: 400 "missing field 'data'" otherwise
amend(EmitMessage, anyOf=[{"required": ["data"]}, {"required": ["payload"]}])


class EmitBatch(msgspec.Struct):
    """A batch for ``POST /emit``: published in order, each item answered with its seq."""

    messages: Annotated[list[EmitMessage], Meta(min_length=1, max_length=MAX_BATCH)]


class EmitResult(msgspec.Struct):
    """Answer to an accepted emit: ``seq`` is the stream sequence (null with history off)."""

    channel: str
    seq: Seq | None


class EmitBatchResult(msgspec.Struct):
    """Answer to an accepted batch, one result per item in order."""

    results: list[EmitResult]


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        json_schema_extra=declare({"type": "string"}),
        description="Becomes the NATS header Nats-Msg-Id (batch item i: KEY:i): a retry with "
        "the same key inside the dedupe window is stored and delivered once and answered "
        "with the original seq.",
    ),
]
ExcludeClient = Annotated[
    str | None,
    Header(
        alias="Pushsvc-Exclude-Client",
        json_schema_extra=declare({"type": "string", "maxLength": MAX_CLIENT_ID}),
        description="A connection (welcome.client) the message is not delivered to "
        "(a body's exclude_client wins for its message).",
    ),
]
ChannelParam = Annotated[str, Path(json_schema_extra=CHANNEL_SCHEMA)]
ERRORS = errors(400, 401, 403, 413, 415, 422, 429, 503)
_EMIT_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"anyOf": [ref(EmitMessage), ref(EmitBatch)]},
            "examples": {
                "one": {"value": {"channel": "chat.room1", "data": {"text": "hello"}}},
                "batch": {"value": {"messages": [{"channel": "news", "data": 1}]}},
            },
        }
    },
}
_RAW_BODY: dict[str, Any] = {
    "required": True,
    "description": "The payload, bytes as sent (mapped into the message's data as "
    "docs/protocol.md says: JSON embedded, other UTF-8 as a string, other bytes base64). "
    "The Content-Type is not interpreted.",
    "content": {
        "application/json": {"schema": {}},
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "*/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


class EmitItem(msgspec.Struct):
    """One message of an emit body."""

    channel: str
    data: msgspec.Raw = msgspec.Raw()  # empty when absent
    payload: msgspec.Raw = msgspec.Raw()
    exclude_client: str | None = None


class EmitError(HTTPError):
    """An emit refused; its response also counts in ``pushsvc_emits_total``."""

    def response(self) -> JSONResponse:
        """The JSON error response (and the metric)."""
        metrics.EMITS.labels(str(self.status)).inc()
        return super().response()


class Emits:
    """The steps of one emit, in order: :meth:`authorise`, :meth:`read_body`,
    :meth:`check` each channel, :meth:`publish`. Each refusal is an :class:`EmitError`.

    Args:
        settings: ``max_emit_bytes`` (bytes) and limits.
        hub: publishes through the node's bus.
        auth: verifies API keys and emit JWTs.
        buckets: per-principal emit token buckets.
    """

    def __init__(
        self, settings: Settings, hub: Hub, auth: Authenticator, buckets: BucketRegistry
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.auth = auth
        self.buckets = buckets

    async def authorise(self, request: Request) -> tuple[Principal, dict[str, str] | None]:
        """The emit's principal and the NATS headers naming it (None for an API key).

        Raises:
            EmitError: 400 malformed ``Authorization``, 401 no or bad credential,
                429 the principal's token bucket is empty.
        """
        try:
            credential = bearer_credential(request)
        except HTTPError as exc:  # re-raised as an emit refusal (counted as one)
            raise EmitError(exc.status, exc.code, str(exc)) from None
        try:
            principal = self.auth.verify_emit(credential)
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise EmitError(401, "unauthorized", str(exc)) from None
        wait = self.buckets.take(principal.sub)
        if wait:
            metrics.RATE_LIMITED.inc()
            raise EmitError(429, "rate_limited", "too many emits", retry_after=wait)
        stamp = None if self.auth.is_api_key(credential) else {USER_HEADER: principal.sub}
        return principal, stamp

    async def read_body(self, request: Request) -> bytes:
        """The request body, at most ``max_emit_bytes`` bytes (chunked bodies too).

        Raises:
            EmitError: 413 too large, 415 a ``Content-Encoding`` other than identity,
                400 the client went away mid-body.
        """
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise EmitError(
                415,
                "unsupported_media_type",
                "Content-Encoding not supported: send the body uncompressed",
                headers={"Accept-Encoding": "identity"},
            )
        limit = self.settings.max_emit_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise EmitError(413, "too_large", f"body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise EmitError(413, "too_large", f"body larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # a client mistake, not a server error: no traceback
            raise EmitError(400, "bad_request", "client disconnected mid-body") from None
        return b"".join(chunks)

    @staticmethod
    def check(principal: Principal, channel: str) -> str:
        """``channel``, validated, if ``principal`` may publish to it.

        Raises:
            EmitError: 422 invalid channel, 403 no publish grant for it.
        """
        try:
            channel = validate_channel(channel)
        except InvalidChannel as exc:
            raise EmitError(422, "invalid_channel", str(exc)) from None
        if not principal.can_publish(channel):
            raise EmitError(403, "forbidden", f"not allowed to publish to {channel}")
        return channel

    async def publish(
        self,
        channel: str,
        payload: bytes,
        msg_id: str | None,
        stamp: dict[str, str] | None,
        exclude: str | None,
    ) -> int | None:
        """Publish one message; its stream sequence (None with history off).

        Raises:
            EmitError: 503 (with ``Retry-After``) when NATS did not take it.
        """
        headers = stamp
        if exclude is not None:
            headers = {**(stamp or {}), EXCLUDE_HEADER: _client_id(exclude)}
        try:
            return await self.hub.publish(channel, payload, msg_id, headers)
        except Unavailable as exc:
            raise EmitError(503, "unavailable", str(exc), retry_after=exc.retry_after) from None

    async def publish_items(
        self,
        principal: Principal,
        stamp: dict[str, str] | None,
        items: list[EmitItem],
        batch: bool,
        key: str | None,
        exclude_client: str | None,
    ) -> list[EmitResult]:
        """Check every item's channel, then publish the items in order.

        ``key`` (the ``Idempotency-Key``) becomes each message's ``Nats-Msg-Id``:
        ``K`` for a single message, ``K:i`` for batch item ``i``.

        Raises:
            EmitError: from :meth:`check` (nothing published then) or :meth:`publish`
                (its message says how many items NATS already has).
        """
        checked = [
            (self.check(principal, item.channel), _payload(item), _client_id(item.exclude_client))
            for item in items
        ]
        results: list[EmitResult] = []
        for i, (channel, payload, exclude) in enumerate(checked):
            msg_id = None if key is None else (f"{key}:{i}" if batch else key)
            try:
                seq = await self.publish(channel, payload, msg_id, stamp, exclude or exclude_client)
            except EmitError as exc:
                if results:  # say exactly what NATS already has
                    exc.args = (f"{exc}; the first {len(results)} messages were accepted",)
                raise
            results.append(EmitResult(channel, seq))
        return results


def emit_router(
    settings: Settings, hub: Hub, auth: Authenticator, buckets: BucketRegistry
) -> APIRouter:
    """Build the emit routes (arguments: see :class:`Emits`)."""
    router = APIRouter()
    steps = Emits(settings, hub, auth, buckets)

    @router.post(
        "/emit",
        status_code=202,
        operation_id="emit",
        summary="Publish JSON messages",
        response_model=None,
        dependencies=SECURITY,
        responses={
            202: json_body(
                {"anyOf": [ref(EmitResult), ref(EmitBatchResult)]},
                "Accepted: NATS (JetStream, with history on) has the message(s)",
            ),
            **ERRORS,
        },
        openapi_extra={"requestBody": _EMIT_BODY},
    )
    async def emit(
        request: Request,
        idempotency_key: IdempotencyKey = None,
        exclude_client: ExcludeClient = None,
    ) -> Response:
        """Publish one JSON message, or a batch, into NATS.

        Answered 202 only once NATS has every message; a batch interrupted by a 503
        says how many items were accepted.
        """
        try:
            principal, stamp = await steps.authorise(request)
            items, batch = _parse(await steps.read_body(request))
            results = await steps.publish_items(
                principal, stamp, items, batch, idempotency_key, exclude_client
            )
        except EmitError as exc:
            return exc.response()
        metrics.EMITS.labels("202").inc(len(results))
        return _accepted(EmitBatchResult(results) if batch else results[0])

    @router.post(
        "/emit/{channel}",
        status_code=202,
        operation_id="emitRaw",
        summary="Publish the raw body to a channel",
        response_model=None,
        dependencies=SECURITY,
        responses={202: json_body(ref(EmitResult), "Accepted: NATS has the message"), **ERRORS},
        openapi_extra={"requestBody": _RAW_BODY},
    )
    async def emit_raw(
        channel: ChannelParam,
        request: Request,
        idempotency_key: IdempotencyKey = None,
        exclude_client: ExcludeClient = None,
    ) -> Response:
        """Publish the raw request body to ``channel``."""
        try:
            principal, stamp = await steps.authorise(request)
            channel = steps.check(principal, channel)
            body = await steps.read_body(request)
            seq = await steps.publish(channel, body, idempotency_key, stamp, exclude_client)
        except EmitError as exc:
            return exc.response()
        metrics.EMITS.labels("202").inc()
        return _accepted(EmitResult(channel, seq))

    return router


def _accepted(body: EmitResult | EmitBatchResult) -> Response:
    """The 202 answer with ``body`` as JSON."""
    return json_response(body, 202)


def _parse(body: bytes) -> tuple[list[EmitItem], bool]:
    """Decode an emit body into items; ``batch`` is True for ``{"messages": [...]}``."""
    try:
        obj = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):
        raise EmitError(400, "bad_request", "body must be a JSON object") from None
    try:
        if "messages" in obj:
            items = msgspec.json.decode(obj["messages"], type=list[EmitItem])
            if not items or len(items) > MAX_BATCH:
                raise EmitError(400, "bad_request", f"messages must hold 1..{MAX_BATCH} items")
            return items, True
        return [msgspec.json.decode(body, type=EmitItem)], False
    except msgspec.ValidationError as exc:
        raise EmitError(400, "bad_request", str(exc)) from None
    except (msgspec.DecodeError, RecursionError):
        raise EmitError(400, "bad_request", "body must be a JSON object") from None


def _client_id(value: str | None) -> str | None:
    """Check an ``exclude_client`` (body field or header): 1..64 of ``[A-Za-z0-9_.-]``.

    Raises:
        EmitError: 400 when it is not a possible client id.
    """
    if value is None:
        return None
    if not 0 < len(value) <= MAX_CLIENT_ID or not _CLIENT_ID_CHARS.issuperset(value):
        raise EmitError(
            400, "bad_request", f"exclude_client must be 1..{MAX_CLIENT_ID} of [A-Za-z0-9_.-]"
        )
    return value


def _payload(item: EmitItem) -> bytes:
    raw = item.data if len(item.data) else item.payload
    if not len(raw):
        raise EmitError(400, "bad_request", "missing field 'data'")
    return bytes(raw)
