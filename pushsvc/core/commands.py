"""Command handlers: subscribe, unsubscribe, publish, presence, refresh, server-side subs.

Transport-agnostic: a WebSocket frame and a ``POST /sse/commands`` entry reach the
same handler (:func:`handle`) through :meth:`pushsvc.core.client.Client.handle_text`,
which has decoded the command and charged the user's token bucket. Every answer
and refusal goes to the connection's outbox, matched by the command's ``id``.
"""

from __future__ import annotations

from typing import Protocol

from .. import metrics
from ..auth.tokens import Authenticator, AuthError, Principal
from ..bus import Unavailable
from ..channels import InvalidChannel, validate_channel
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    CLOSE_UNAUTHORIZED,
    FORBIDDEN,
    INVALID_CHANNEL,
    LIMIT_EXCEEDED,
    UNAVAILABLE,
    Command,
    Frame,
    Presence,
    PresenceResult,
    PresenceStats,
    PresenceStatsResult,
    Publish,
    Published,
    Refresh,
    Refreshed,
    SubResume,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    position_error,
)
from .hub import Hub
from .presence import PresenceRefused, PresenceRegistry


class Connection(Protocol):
    """What a command handler needs of a connection (:class:`~pushsvc.core.client.Client`)."""

    id: str
    principal: Principal
    channels: set[str]
    closed: bool
    hub: Hub
    auth: Authenticator
    settings: Settings
    presence: PresenceRegistry | None

    def send(self, frame: str, nbytes: int) -> None: ...
    def send_frame(self, frame: Frame) -> None: ...
    def close(self, code: int, reason: str = "") -> None: ...
    def refuse(self, code: str, message: str, req_id: object, *, charge: bool = False) -> None: ...
    def target(self, name: object) -> str: ...
    def reprincipal(self, principal: Principal) -> None: ...
    def resume_position(self, channel: str) -> SubResume | None: ...


async def handle(conn: Connection, cmd: Command) -> None:
    """Run one decoded, charged command (not ``auth`` or ``pong``: the client's own)."""
    if isinstance(cmd, Subscribe):
        await subscribe(conn, cmd)
    elif isinstance(cmd, Unsubscribe):
        unsubscribe(conn, cmd)
    elif isinstance(cmd, Publish):
        await publish(conn, cmd)
    elif isinstance(cmd, Refresh):
        refresh(conn, cmd)
    elif isinstance(cmd, Presence | PresenceStats):
        await presence(conn, cmd)


async def subscribe(conn: Connection, cmd: Subscribe) -> None:
    """``subscribe``: grammar, grant, duplicates, the subscription cap, the position, then the hub.

    Refusals (``error`` with the command's ``id``): ``invalid_channel``,
    ``forbidden``, ``bad_request`` (already subscribed; bad ``since``/``epoch``),
    ``limit_exceeded`` (``PUSHSVC_MAX_SUBSCRIPTIONS``), ``unavailable`` (NATS could
    not confirm the subscription).
    """
    try:
        channel = conn.target(cmd.channel)
    except InvalidChannel as exc:
        conn.refuse(INVALID_CHANNEL, str(exc), cmd.id)
        return
    if not conn.principal.can_subscribe(channel):
        conn.refuse(FORBIDDEN, f"not allowed to subscribe to {channel}", cmd.id)
        return
    if channel in conn.channels:
        conn.refuse(BAD_REQUEST, f"already subscribed to {channel}", cmd.id)
        return
    limit = conn.settings.max_subscriptions
    if len(conn.channels) >= limit:
        conn.refuse(LIMIT_EXCEEDED, f"at most {limit} subscriptions per connection", cmd.id)
        return
    if (problem := position_error(cmd.since, cmd.epoch)) is not None:
        conn.refuse(BAD_REQUEST, problem, cmd.id)
        return
    try:
        await conn.hub.subscribe(conn, channel, cmd.since, cmd.id, cmd.epoch)
    except Unavailable as exc:
        conn.refuse(UNAVAILABLE, str(exc), cmd.id)


async def server_subscribe(conn: Connection, channels: list[str]) -> None:
    """Subscribe to the server-side subscriptions, each answered ``subscribed``.

    A channel with a resume position (the auth frame's ``subs`` map, an SSE
    stream's id) resumes from its ``since`` (with ``recovered``, then the replay)
    exactly as a ``subscribe`` with ``since`` would. Refusals are ``error`` frames
    naming the channel (no ``id``): over ``PUSHSVC_MAX_SUBSCRIPTIONS``
    (``limit_exceeded``), a pattern while wildcard subscriptions are off
    (``invalid_channel``), a bad ``since`` or ``epoch`` (``bad_request``;
    subscribed live instead), NATS away (``unavailable``).
    """
    limit = conn.settings.max_subscriptions
    for channel in channels:
        if conn.closed:
            return
        try:
            conn.target(channel)
        except InvalidChannel as exc:
            conn.refuse(INVALID_CHANNEL, f"server-side subscription {channel}: {exc}", None)
            continue
        if len(conn.channels) >= limit:
            conn.refuse(
                LIMIT_EXCEEDED,
                f"server-side subscription {channel}: at most {limit} subscriptions per connection",
                None,
            )
            continue
        position = conn.resume_position(channel)
        since = position.since if position is not None else None
        epoch = position.epoch if position is not None else None
        if (problem := position_error(since, epoch)) is not None:
            conn.refuse(BAD_REQUEST, f"subs.{channel}.{problem}", None)
            since = epoch = None
        try:
            await conn.hub.subscribe(conn, channel, since, None, epoch)
        except Unavailable as exc:
            conn.refuse(UNAVAILABLE, f"server-side subscription {channel}: {exc}", None)


def unsubscribe(conn: Connection, cmd: Unsubscribe) -> None:
    """``unsubscribe``: answered ``unsubscribed`` (also when it was not subscribed)."""
    try:
        channel = conn.target(cmd.channel)
    except InvalidChannel as exc:
        conn.refuse(INVALID_CHANNEL, str(exc), cmd.id)
        return
    conn.hub.unsubscribe(conn, channel)
    conn.send_frame(Unsubscribed(channel=channel, id=cmd.id))


async def publish(conn: Connection, cmd: Publish) -> None:
    """``publish``: answered ``published`` with the stream seq once NATS has it."""
    try:
        channel = validate_channel(cmd.channel)
    except InvalidChannel as exc:
        conn.refuse(INVALID_CHANNEL, str(exc), cmd.id)
        return
    if not conn.principal.can_publish(channel):
        conn.refuse(FORBIDDEN, f"not allowed to publish to {channel}", cmd.id)
        return
    try:
        seq = await conn.hub.publish(channel, bytes(cmd.data))
    except Unavailable as exc:
        conn.refuse(UNAVAILABLE, str(exc), cmd.id)
        return
    conn.send_frame(Published(id=cmd.id, seq=seq))


async def presence(conn: Connection, cmd: Presence | PresenceStats) -> None:
    """Answer ``presence`` / ``presence_stats`` through the registry's one rule
    (:meth:`~pushsvc.core.presence.PresenceRegistry.read_for`).

    Refusals: ``invalid_channel``; ``forbidden`` without a ``presence`` grant;
    ``bad_request`` when the channel is outside ``PUSHSVC_PRESENCE_CHANNELS``
    (or the node has no registry); ``unavailable`` without JetStream or when
    the bucket does not answer.
    """
    channel = cmd.channel
    if conn.presence is None:
        conn.refuse(BAD_REQUEST, f"presence is not enabled for {channel}", cmd.id)
        return
    stats = isinstance(cmd, PresenceStats)
    limit = 0 if stats else conn.settings.presence_limit
    try:
        snap = await conn.presence.read_for(conn.principal, channel, limit)
    except PresenceRefused as exc:
        conn.refuse(exc.code, str(exc), cmd.id)
        return
    if stats:
        conn.send_frame(
            PresenceStatsResult(
                channel=channel, clients=snap.clients_total, users=snap.users, id=cmd.id
            )
        )
        return
    conn.send_frame(
        PresenceResult(
            channel=channel,
            clients=snap.clients,
            users=snap.users,
            clients_total=snap.clients_total,
            truncated=True if snap.truncated else None,
            id=cmd.id,
        )
    )


def refresh(conn: Connection, cmd: Refresh) -> None:
    """``refresh``: a new token for the same user; channels it no longer grants are left.

    A bad token, or one for another user, closes with 4001.
    """
    try:
        principal = conn.auth.verify(cmd.token)
    except AuthError as exc:
        metrics.AUTH_FAILURES.labels(exc.reason).inc()
        conn.close(CLOSE_UNAUTHORIZED, f"refresh failed: {exc}")
        return
    if principal.sub != conn.principal.sub:
        conn.close(CLOSE_UNAUTHORIZED, "refresh token is for another user")
        return
    conn.reprincipal(principal)
    for channel in sorted(conn.channels):
        if not principal.can_subscribe(channel):
            conn.hub.unsubscribe(conn, channel)
            conn.send_frame(Unsubscribed(channel=channel, reason=FORBIDDEN))
    conn.send_frame(Refreshed(exp=principal.exp, id=cmd.id))
