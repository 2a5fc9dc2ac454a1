"""The server API's request and reply bodies, its error, and the rules on them.

JSON in, JSON out, the same over NATS (``<prefix>-api.<op>``) and HTTP
(``POST /api/<op>``); docs/server-api.md is the human-readable contract.
Errors are ``{"error": code, "message": text}`` (:class:`ApiError`).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from ..protocol import (
    APP_NO_RECONNECT_CODES,
    APP_RECONNECT_CODES,
    BAD_REQUEST,
    UNAVAILABLE,
    ClientInfo,
    Info,
    position_error,
)

NOT_FOUND = "not_found"
MAX_REASON_BYTES = 120  # a WebSocket close reason fits 123 bytes (RFC 6455 5.5: 125 - 2)
DEFAULT_REASON = "disconnected by the server"

#: HTTP status of each error code (the same codes as emit's JSON errors)
STATUS = {BAD_REQUEST: 400, NOT_FOUND: 404, "invalid_channel": 422, UNAVAILABLE: 503}


class ApiError(Exception):
    """A refused server API request; ``str(exc)`` is safe to show the caller.

    Args:
        code: ``bad_request``, ``not_found`` (unknown op), ``invalid_channel``,
            ``forbidden``, ``unavailable``, ...
        message: the reason.
        retry_after: seconds to wait before retrying (``unavailable``), or None.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        """The HTTP status for this error (400 when the code has no entry of its own)."""
        return STATUS.get(self.code, 400)

    def body(self) -> bytes:
        """``{"error": code, "message": text}`` as JSON bytes."""
        return msgspec.json.encode(ErrorBody(self.code, str(self)))


class ErrorBody(msgspec.Struct):
    """An error answer: ``{"error": code, "message": text}``."""

    error: str
    message: str


# --- requests -----------------------------------------------------------------------
class Target(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which connections: those of ``user`` (JWT ``sub``), or the one ``client``
    (``welcome.client``), or both (both must match)."""

    user: str | None = None
    client: str | None = None

    def check(self) -> None:
        """Raises :class:`ApiError` ``bad_request`` when neither is given."""
        if not self.user and not self.client:
            raise ApiError(BAD_REQUEST, "give user or client")


class DisconnectRequest(Target, kw_only=True, forbid_unknown_fields=True):
    """``disconnect``: close the target's connections on every node.

    ``code``: an application close code, 4100-4499 (clients reconnect) or
    4500-4999 (they do not); without it 4011 (``reconnect`` false) or 4012.
    """

    reason: str | None = None
    reconnect: bool = False
    code: int | None = None

    def close_code(self) -> int:
        """The close code to send (see the class docstring)."""
        if self.code is not None:
            return self.code
        return 4012 if self.reconnect else 4011

    def check(self) -> None:
        """Target given, ``code`` in 4100-4999, ``reason`` at most 120 UTF-8 bytes.

        Raises:
            ApiError: ``bad_request`` naming the field.
        """
        super().check()
        if self.code is not None and not (
            self.code in APP_RECONNECT_CODES or self.code in APP_NO_RECONNECT_CODES
        ):
            raise ApiError(
                BAD_REQUEST,
                "code must be in 4100-4499 (clients reconnect) or 4500-4999 (they do not)",
            )
        if self.reason is not None and len(self.reason.encode()) > MAX_REASON_BYTES:
            raise ApiError(BAD_REQUEST, f"reason must be at most {MAX_REASON_BYTES} bytes")


class SubscribeRequest(Target, kw_only=True, forbid_unknown_fields=True):
    """``subscribe``: subscribe the target's live connections to ``channel``
    (a channel or pattern), from ``since``/``epoch`` as the client command would."""

    channel: str
    since: int | None = None
    epoch: str | None = None

    def check(self) -> None:
        """Target given, position well-formed; raises :class:`ApiError` ``bad_request``."""
        super().check()
        if (problem := position_error(self.since, self.epoch)) is not None:
            raise ApiError(BAD_REQUEST, problem)


class UnsubscribeRequest(Target, kw_only=True, forbid_unknown_fields=True):
    """``unsubscribe``: remove ``channel`` (as subscribed) from the target's connections."""

    channel: str


class ChannelsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``channels``: active channels, those ``pattern`` (NATS wildcards) covers."""

    pattern: str | None = None


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    """``info``: no fields."""


class ChannelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``presence`` / ``presence_stats``: one channel."""

    channel: str


class UserRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``connections``: one user (JWT ``sub``)."""

    user: str


# --- replies --------------------------------------------------------------------------
class NodeRef(msgspec.Struct):
    """A node: ``node`` (``PUSHSVC_NODE_NAME``) and ``id`` (its process id, the prefix
    of its client ids)."""

    node: str
    id: str


class Counted(msgspec.Struct, omit_defaults=True):
    """What one node did: ``count`` connections acted on."""

    count: int = 0


class NodeInfo(msgspec.Struct):
    """One node of ``info``: ``uptime`` seconds, ``connections``, ``subscriptions``,
    ``transports`` (connections per transport: ``ws``, ``sse``, ``stream``)."""

    node: str
    id: str
    version: str
    uptime: float
    connections: int
    subscriptions: int
    transports: dict[str, int]


class ChannelUsage(msgspec.Struct):
    """One node's part of ``channels``: subscribed connections and their users."""

    clients: int
    users: list[str]


class NodeChannels(msgspec.Struct):
    """One node's ``channels`` answer: channel -> its usage there."""

    channels: dict[str, ChannelUsage]


class ConnectionInfo(msgspec.Struct, omit_defaults=True):
    """One connection of ``connections``: ``connected_at`` Unix seconds, ``channels``
    (and patterns) it is subscribed to, ``info`` the token's ``info`` claim."""

    client: str
    node: str
    transport: str
    channels: list[str]
    connected_at: float
    user: str = ""
    info: Info | msgspec.UnsetType = msgspec.UNSET


class NodeConnections(msgspec.Struct):
    """One node's ``connections`` answer."""

    connections: list[ConnectionInfo]


class NodeReply(msgspec.Struct, omit_defaults=True):
    """A node's answer to a scattered request: who it is and its ``result`` (raw JSON
    of the op's per-node Struct), or its ``error``."""

    node: str
    id: str
    result: msgspec.Raw = msgspec.Raw()  # empty: none (msgspec.Raw is not a union member)
    error: ErrorBody | None = None


MissingNodes = Annotated[
    list[NodeRef],
    msgspec.Meta(
        description="live nodes (in the node registry) that did not answer within "
        "PUSHSVC_API_TIMEOUT seconds"
    ),
]


class Disconnected(msgspec.Struct):
    """``disconnect``'s answer: connections closed on every node."""

    disconnected: int
    missing_nodes: MissingNodes


class SubscribedCount(msgspec.Struct):
    """``subscribe``'s answer: connections newly subscribed."""

    subscribed: int
    missing_nodes: MissingNodes


class UnsubscribedCount(msgspec.Struct):
    """``unsubscribe``'s answer: connections that were subscribed and no longer are."""

    unsubscribed: int
    missing_nodes: MissingNodes


class ChannelEntry(msgspec.Struct):
    """One active channel: subscribed ``clients`` and distinct ``users``, cluster-wide."""

    channel: str
    clients: int
    users: int


class ChannelsReply(msgspec.Struct):
    """``channels``'s answer, sorted by channel."""

    channels: list[ChannelEntry]
    missing_nodes: MissingNodes


class InfoReply(msgspec.Struct):
    """``info``'s answer: every node that answered."""

    nodes: list[NodeInfo]
    missing_nodes: MissingNodes


class ConnectionsReply(msgspec.Struct):
    """``connections``'s answer: the user's connections on every node."""

    user: str
    connections: list[ConnectionInfo]
    missing_nodes: MissingNodes


class PresenceReply(msgspec.Struct, omit_defaults=True):
    """``presence``'s answer: as ``GET /presence/{channel}``."""

    channel: str
    clients: list[ClientInfo]
    users: int
    clients_total: int
    truncated: bool | None = None


class PresenceStatsReply(msgspec.Struct):
    """``presence_stats``'s answer."""

    channel: str
    clients: Annotated[int, msgspec.Meta(ge=0)]
    users: Annotated[int, msgspec.Meta(ge=0)]


class Op(msgspec.Struct, frozen=True):
    """One operation: its request type and whether it is scattered to every node."""

    request: type[msgspec.Struct]
    scattered: bool


#: every operation, by name (the last token of ``<prefix>-api.<op>``, ``/api/<op>``)
OPS: dict[str, Op] = {
    "disconnect": Op(DisconnectRequest, True),
    "subscribe": Op(SubscribeRequest, True),
    "unsubscribe": Op(UnsubscribeRequest, True),
    "channels": Op(ChannelsRequest, True),
    "info": Op(Empty, True),
    "connections": Op(UserRequest, True),
    "presence": Op(ChannelRequest, False),
    "presence_stats": Op(ChannelRequest, False),
}


def decode_request(op: str, body: bytes) -> msgspec.Struct:
    """Decode and check the body of ``op`` (empty body: ``{}``).

    Raises:
        ApiError: ``not_found`` for an unknown op, ``bad_request`` for a body that
            is not the op's JSON object or breaks its rules.
    """
    spec = OPS.get(op)
    if spec is None:
        raise ApiError(NOT_FOUND, f"unknown operation {op!r}; one of {', '.join(OPS)}")
    try:
        request = msgspec.json.decode(body.strip() or b"{}", type=spec.request)
    except msgspec.ValidationError as exc:
        raise ApiError(BAD_REQUEST, str(exc)) from None
    except (msgspec.DecodeError, RecursionError):
        raise ApiError(BAD_REQUEST, "body must be a JSON object") from None
    check = getattr(request, "check", None)
    if check is not None:
        check()
    return request
