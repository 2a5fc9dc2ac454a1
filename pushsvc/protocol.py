"""Wire contract v1: client commands, server frames, error codes and close codes.

Sans-I/O: this module only turns bytes into Structs and back; docs/protocol.md is
the human-readable version of the same contract.

Client -> server: one JSON object per WebSocket text frame, tagged by ``op``.
Server -> client: JSON objects tagged by ``type``; one text frame may carry
several objects separated by ``\\n`` (the server batches), so every object the
server encodes is guaranteed to contain no raw newline.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Annotated, Final

import msgspec

# --- close codes (RFC 6455 7.4.1 for 1xxx, 4000-4999 private use) ------------
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_FORBIDDEN: Final = 4003
CLOSE_RATE_LIMITED: Final = 4008
CLOSE_SLOW_CONSUMER: Final = 4009
CLOSE_HEARTBEAT_TIMEOUT: Final = 4010
CLOSE_DISCONNECTED: Final = 4011  # the server API's disconnect: do not reconnect
CLOSE_DISCONNECTED_RECONNECT: Final = 4012  # the server API's disconnect with reconnect
#: close codes an application chooses for the server API's ``disconnect``: clients
#: reconnect after 4100-4499 and stop after 4500-4999 (docs/protocol.md, "Close codes")
APP_RECONNECT_CODES: Final = range(4100, 4500)
APP_NO_RECONNECT_CODES: Final = range(4500, 5000)

#: close codes after which a client should not reconnect on its own (docs/protocol.md,
#: "Close codes"): fix the client (1009) or its credentials/permissions (4003), or
#: the backend said so (4011); and every code of :data:`APP_NO_RECONNECT_CODES`
NO_RECONNECT: Final = frozenset({CLOSE_TOO_BIG, CLOSE_FORBIDDEN, CLOSE_DISCONNECTED})


def reconnects(code: int) -> bool:
    """Whether a client reconnects (with backoff, then resumes) after close ``code``.

    The close-code table of docs/protocol.md: not after :data:`NO_RECONNECT` nor
    an application code in 4500-4999; after every other code.
    """
    return code not in NO_RECONNECT and code not in APP_NO_RECONNECT_CODES


class Disconnect(msgspec.Struct, frozen=True):
    """Why the server closes a connection, transport-neutral.

    WebSocket carries ``code`` and ``reason`` in its close frame (RFC 6455 5.5.1;
    the reason cut to 120 bytes); SSE and HTTP-streaming send the whole struct as a
    ``close`` event / frame before the body ends.

    Attributes:
        code: a close code of docs/protocol.md (1xxx: RFC 6455 7.4.1; 4000-4999).
        reason: human-readable, client-safe (never a token).
        reconnect: whether the client should reconnect (with backoff) and resume.
    """

    code: int
    reason: str = ""
    reconnect: bool = True

    @classmethod
    def of(cls, code: int, reason: str = "") -> Disconnect:
        """The disconnect for ``code``, ``reconnect`` from the close-code table
        (:func:`reconnects`)."""
        return cls(code, reason, reconnects(code))


# --- NATS headers pushsvc stamps (docs/protocol.md, "NATS side") ---------------
#: the verified user (JWT ``sub``) behind a message a client published or a JWT emit,
#: and behind an ``rpc`` request; read back into ``publisher.user``
USER_HEADER: Final = "Pushsvc-User"
#: the connection (``welcome.client``) that published a message or made an ``rpc`` call
CLIENT_HEADER: Final = "Pushsvc-Client"
NODE_HEADER: Final = "Pushsvc-Node"  # the node that took an ``rpc`` call
INFO_HEADER: Final = "Pushsvc-Info"  # the caller's ``info`` claim (``rpc``)
#: a connection (``welcome.client``) a message is not delivered to (its own no-echo publish)
EXCLUDE_HEADER: Final = "Pushsvc-Exclude-Client"


# --- error codes carried by ``error`` frames ------------------------------------
BAD_REQUEST: Final = "bad_request"
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
INVALID_CHANNEL: Final = "invalid_channel"
RATE_LIMITED: Final = "rate_limited"
LIMIT_EXCEEDED: Final = "limit_exceeded"
UNAVAILABLE: Final = "unavailable"
NOT_FOUND: Final = "not_found"  # rpc: no service answers the method
TOO_LARGE: Final = "too_large"  # rpc: the reply (or request) does not fit a frame

RequestId = int | str | None
MAX_EPOCH_LENGTH: Final = 64  # characters of an ``epoch`` a client may send back
#: the largest stream sequence, hence the largest ``since`` (WebSocket and HTTP
#: history alike): JetStream sequences are unsigned 64-bit (the JetStream API's
#: ``seq``/``last_seq`` are uint64 in nats-server and its JSON schemas). msgspec
#: decodes JSON integers of any size, so this bound is the one check.
MAX_SEQ: Final = 2**64 - 1


def position_error(since: int | None, epoch: str | None) -> str | None:
    """Why a resume position (``since``, ``epoch``) is malformed, or None when it is fine.

    ``since`` is a stream sequence in ``0..MAX_SEQ``; ``epoch`` an opaque string of
    1..``MAX_EPOCH_LENGTH`` characters (docs/protocol.md, "epoch"). The one rule for
    ``subscribe``, the auth frame's ``subs`` and ``GET /history``.
    """
    if since is not None and not 0 <= since <= MAX_SEQ:
        return f"since must be in 0..{MAX_SEQ}"
    if epoch is not None and not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        return f"epoch must be 1..{MAX_EPOCH_LENGTH} characters"
    return None


# --- client commands ------------------------------------------------------------
class SubResume(msgspec.Struct, forbid_unknown_fields=False):
    """Where to resume one server-side subscription: ``{"since":N?,"epoch":E?}``,
    as the same fields of ``subscribe``."""

    since: int | None = None
    epoch: str | None = None


class Auth(msgspec.Struct, tag_field="op", tag="auth"):
    """``{"op":"auth","token":T,"subs":{C:{"since":N}}?}``: the first frame; answered by
    ``welcome``. ``subs`` resumes server-side subscriptions (token ``subs`` claim)."""

    token: str
    subs: dict[str, SubResume] | None = None


class Subscribe(msgspec.Struct, tag_field="op", tag="subscribe"):
    """``{"op":"subscribe","channel":C,"since":N?,"epoch":E?,"id":I?}``.

    ``since`` is a stream sequence: replay what came after it (history on);
    ``epoch`` is the stream epoch ``since`` belongs to (from ``welcome`` or
    ``subscribed``): a position of another epoch is answered ``recovered: false``
    with a replay of everything the current epoch holds for the channel.
    """

    channel: str
    since: int | None = None
    id: RequestId = None
    epoch: str | None = None


class Unsubscribe(msgspec.Struct, tag_field="op", tag="unsubscribe"):
    """``{"op":"unsubscribe","channel":C,"id":I?}``."""

    channel: str
    id: RequestId = None


class Publish(msgspec.Struct, tag_field="op", tag="publish", omit_defaults=True):
    """``{"op":"publish","channel":C,"data":ANY,"id":I?,"echo":B?}``; ``data`` is kept
    as raw JSON. ``echo: false``: not delivered back to this connection (every other
    subscriber, the same user's other connections included, gets it)."""

    channel: str
    data: msgspec.Raw
    id: RequestId = None
    echo: bool = True


class Refresh(msgspec.Struct, tag_field="op", tag="refresh"):
    """``{"op":"refresh","token":T,"id":I?}``: replace the session's token (same ``sub``)."""

    token: str
    id: RequestId = None


class Pong(msgspec.Struct, tag_field="op", tag="pong"):
    """``{"op":"pong"}``: answer to a server ``ping``."""


class Presence(msgspec.Struct, tag_field="op", tag="presence"):
    """``{"op":"presence","channel":C,"id":I?}``: who is subscribed to ``C``, cluster-wide.

    Needs a ``presence`` grant and a channel in ``PUSHSVC_PRESENCE_CHANNELS``.
    """

    channel: str
    id: RequestId = None


class PresenceStats(msgspec.Struct, tag_field="op", tag="presence_stats"):
    """``{"op":"presence_stats","channel":C,"id":I?}``: counts only (clients, users)."""

    channel: str
    id: RequestId = None


class Rpc(msgspec.Struct, tag_field="op", tag="rpc"):
    """``{"op":"rpc","method":M,"data":ANY?,"id":I}``: a NATS request to ``<prefix>-rpc.<M>``.

    ``method`` follows the channel grammar (no wildcards); ``data`` (default
    ``null``) is the request body as raw JSON; ``id`` is required (several calls
    may be in flight; answers come in the order the services reply). Needs an
    ``rpc`` grant covering ``M``. Answered ``rpc_result`` or ``error``.
    """

    method: str
    id: int | str
    data: msgspec.Raw = msgspec.Raw(b"null")


Command = Auth | Subscribe | Unsubscribe | Publish | Refresh | Pong | Presence | PresenceStats | Rpc


# --- server frames ----------------------------------------------------------------
class Welcome(msgspec.Struct, tag_field="type", tag="welcome", omit_defaults=True):
    """Sent after a successful auth. ``ping_interval`` seconds, ``exp`` Unix seconds.

    ``epoch``: the stream epoch (history on), to send back with ``since``.
    ``subs``: channels the server subscribes the session to (their ``subscribed``
    answers follow).
    ``node`` names the pushsvc node serving the socket (``PUSHSVC_NODE_NAME``).
    ``session``: SSE and HTTP-streaming only, the secret that addresses the
    connection in ``POST /sse/commands`` (never the public ``client`` id).
    """

    client: str
    user: str
    ping_interval: float
    exp: float
    epoch: str | None = None
    subs: list[str] = msgspec.field(default_factory=list)  # server-side subscriptions
    node: str | None = None
    session: str | None = None


class PublishedBy(msgspec.Struct, omit_defaults=True):
    """Who published a message, stamped by the server from the NATS headers
    ``Pushsvc-User`` / ``Pushsvc-Client``: ``user`` (the publisher's JWT ``sub``) and
    ``client`` (the publishing connection; absent for an emit)."""

    user: str
    client: str | None = None


def publisher_of(headers: Mapping[str, str] | None) -> PublishedBy | None:
    """The ``publisher`` a NATS message's headers name (``Pushsvc-User``,
    ``Pushsvc-Client``), or None when it carries no ``Pushsvc-User``."""
    if not headers:
        return None
    user = headers.get(USER_HEADER)
    return PublishedBy(user, headers.get(CLIENT_HEADER) or None) if user else None


class Message(msgspec.Struct, tag_field="type", tag="message", omit_defaults=True):
    """A delivery. ``seq`` is the JetStream stream sequence (absent with history off);
    ``pattern`` is set when a wildcard subscription delivered it (``channel`` is concrete);
    ``publisher`` when a client (or a JWT emit) published it."""

    channel: str
    data: msgspec.Raw
    seq: int | None = None
    encoding: str | None = None
    pattern: str | None = None  # the wildcard subscription that delivered it
    publisher: PublishedBy | None = None


class Ping(msgspec.Struct, tag_field="type", tag="ping"):
    """Application heartbeat; the client answers ``{"op":"pong"}``."""


class Error(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    """A refused command. ``retry_after`` seconds (with ``rate_limited``)."""

    code: str
    message: str
    id: RequestId = None
    retry_after: float | None = None


class Subscribed(msgspec.Struct, tag_field="type", tag="subscribed", omit_defaults=True):
    """Answer to subscribe. ``recovered`` is set when ``since`` was given.

    ``epoch``: the stream epoch the channel's sequences belong to (history on).
    """

    channel: str
    id: RequestId = None
    recovered: bool | None = None
    epoch: str | None = None


class Unsubscribed(msgspec.Struct, tag_field="type", tag="unsubscribed", omit_defaults=True):
    """Answer to unsubscribe, or a server-side removal (``reason``: e.g. ``forbidden``)."""

    channel: str
    id: RequestId = None
    reason: str | None = None


class Published(msgspec.Struct, tag_field="type", tag="published", omit_defaults=True):
    """Answer to publish once NATS accepted it; ``seq`` with history on."""

    id: RequestId = None
    seq: int | None = None


class Refreshed(msgspec.Struct, tag_field="type", tag="refreshed", omit_defaults=True):
    """Answer to refresh: the new ``exp`` (Unix seconds)."""

    exp: float
    id: RequestId = None


class RpcResult(msgspec.Struct, tag_field="type", tag="rpc_result", omit_defaults=True):
    """Answer to ``rpc``: the service's reply body as ``data`` (JSON embedded as is,
    other text as a string, other bytes base64 with ``encoding: "base64"``)."""

    id: RequestId
    data: msgspec.Raw
    encoding: str | None = None


NO_INFO: Final = msgspec.UNSET  # an absent ``info`` (omitted when encoding)
Info = Annotated[
    msgspec.Raw,
    msgspec.Meta(
        description="the token's info claim (a JSON object, at most 1 KiB)",
        extra_json_schema={"type": "object"},
    ),
]


class Close(msgspec.Struct, tag_field="type", tag="close"):
    """The last frame of an SSE / HTTP-streaming response: why it ends (:class:`Disconnect`)."""

    code: int
    reason: str
    reconnect: bool


class Position(msgspec.Struct, tag_field="type", tag="position"):
    """A resume point of an SSE / HTTP-streaming response on several channels.

    ``id`` is ``<epoch>:<seq>``: every message of the connection's channels up to
    ``seq`` has been written before it (the node's watermark,
    :mod:`pushsvc.core.watermark`). On ``text/event-stream`` it is an id-only block
    (``id: <epoch>:<seq>`` and a blank line, WHATWG HTML 9.2.6: it sets the last
    event id and dispatches nothing); on NDJSON this frame as a line.
    """

    id: str


class ClientInfo(msgspec.Struct, omit_defaults=True):
    """One present session: ``client`` id, ``user`` (JWT ``sub``), ``node`` serving it,
    ``info`` (the token's ``info`` claim, a JSON object) when the token had one."""

    client: Annotated[str, msgspec.Meta(description="session id (welcome.client)")]
    user: Annotated[str, msgspec.Meta(description="the session's JWT sub")]
    node: Annotated[str, msgspec.Meta(description="PUSHSVC_NODE_NAME of the serving node")]
    info: Info | msgspec.UnsetType = NO_INFO


class PresenceResult(msgspec.Struct, tag_field="type", tag="presence", omit_defaults=True):
    """Answer to ``presence``: ``clients`` (at most ``PUSHSVC_PRESENCE_LIMIT``),
    exact ``users`` (distinct) and ``clients_total`` counts, ``truncated`` when the
    list was cut."""

    channel: str
    clients: list[ClientInfo]
    users: int
    clients_total: int
    truncated: bool | None = None
    id: RequestId = None


class PresenceStatsResult(
    msgspec.Struct, tag_field="type", tag="presence_stats", omit_defaults=True
):
    """Answer to ``presence_stats``: ``clients`` and distinct ``users`` present."""

    channel: str
    clients: int
    users: int
    id: RequestId = None


class Join(msgspec.Struct, tag_field="type", tag="join", omit_defaults=True):
    """Session ``client`` of ``user`` subscribed to ``channel`` (on any node)."""

    channel: str
    client: str
    user: str
    info: Info | msgspec.UnsetType = NO_INFO


class Leave(msgspec.Struct, tag_field="type", tag="leave", omit_defaults=True):
    """Session ``client`` of ``user`` unsubscribed from ``channel`` or disconnected."""

    channel: str
    client: str
    user: str
    info: Info | msgspec.UnsetType = NO_INFO


Frame = (
    Welcome
    | Message
    | Ping
    | Error
    | Subscribed
    | Unsubscribed
    | Published
    | Refreshed
    | PresenceResult
    | PresenceStatsResult
    | Join
    | Leave
    | RpcResult
    | Close
    | Position
)

_command_decoder = msgspec.json.Decoder(Command)
_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(Frame)


class ProtocolError(ValueError):
    """A client frame is not a valid command. ``str(exc)`` is safe to show the client."""


def decode_command(data: bytes | str) -> Command:
    """Parse one client frame.

    Raises:
        ProtocolError: not JSON, not an object, unknown ``op``, wrong field types or
            nesting deeper than msgspec's limit.
    """
    try:
        return _command_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(_short(str(exc))) from None
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None


def _short(message: str) -> str:
    return message if len(message) <= 200 else message[:200] + "..."


def encode_frame(frame: Frame) -> bytes:
    """Encode a server frame to compact JSON bytes (no raw newline)."""
    return _encoder.encode(frame)


def decode_frame(data: bytes | str) -> Frame:
    """Parse one server frame (used by clients, tests and the bench)."""
    return _frame_decoder.decode(data)


PING_FRAME: Final = encode_frame(Ping()).decode()


def payload_to_data(payload: bytes) -> tuple[msgspec.Raw, str | None]:
    """Map NATS payload bytes to the ``data`` field of a ``message`` frame.

    Wire contract v1: valid JSON is embedded as JSON (re-encoded compactly when it
    contains newlines, so frames can be joined by ``\\n``); other UTF-8 text becomes
    a JSON string; other bytes are base64 with ``encoding: "base64"``.

    Returns:
        ``(raw_json, encoding)`` where ``encoding`` is None or ``"base64"``.
    """
    if payload:
        try:
            if b"\n" in payload or b"\r" in payload:
                return msgspec.Raw(_encoder.encode(msgspec.json.decode(payload))), None
            msgspec.json.decode(payload, type=msgspec.Raw)
            return msgspec.Raw(payload), None
        except (msgspec.DecodeError, RecursionError):
            pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return msgspec.Raw(_encoder.encode(base64.b64encode(payload).decode())), "base64"
    return msgspec.Raw(_encoder.encode(text)), None
