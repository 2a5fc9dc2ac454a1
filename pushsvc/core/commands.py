"""Command handlers: subscribe, unsubscribe, publish, presence, refresh, rpc, server-side subs.

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
from ..channels import InvalidChannel, is_valid_channel, validate_channel
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    CLIENT_HEADER,
    CLOSE_UNAUTHORIZED,
    EXCLUDE_HEADER,
    FORBIDDEN,
    INVALID_CHANNEL,
    LIMIT_EXCEEDED,
    UNAVAILABLE,
    USER_HEADER,
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
    Rpc,
    SubResume,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    position_error,
)
from .hub import Hub
from .presence import PresenceRefused, PresenceRegistry
from .rpc import Calls
from .rpc import rpc as rpc_call


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
    calls: Calls

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
        await refresh(conn, cmd)
    elif isinstance(cmd, Presence | PresenceStats):
        await presence(conn, cmd)
    elif isinstance(cmd, Rpc):
        rpc_call(conn, cmd)  # answered by the call's own task (pushsvc.core.rpc)


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
    try:
        allowed = await may_read(conn, conn.principal, channel)
    except AuthError as exc:  # the subscribe callout did not answer
        conn.refuse(UNAVAILABLE, str(exc), cmd.id)
        return
    if not allowed:
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


async def may_read(conn: Connection, principal: Principal, channel: str) -> bool:
    """``principal`` may subscribe to (or read the presence of) ``channel``: its grants
    cover it, or the subscribe callout (``PUSHSVC_SUBSCRIBE_AUTH_SUBJECT``) says yes.

    Raises:
        AuthError: the callout did not answer (``callout_unavailable``).
    """
    return principal.can_subscribe(channel) or await conn.auth.may_subscribe(
        principal, conn.id, channel
    )


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
    """``publish``: answered ``published`` with the stream seq once NATS has it.

    The NATS message carries ``Pushsvc-User`` (the token's ``sub``) and
    ``Pushsvc-Client`` (this connection), set here and never taken from the
    client: delivered frames and history reads show them as ``publisher``. With
    ``echo: false`` it also carries ``Pushsvc-Exclude-Client`` naming this
    connection, which the hub does not hand it to (history still holds it).
    """
    try:
        channel = validate_channel(cmd.channel)
    except InvalidChannel as exc:
        conn.refuse(INVALID_CHANNEL, str(exc), cmd.id)
        return
    if not conn.principal.can_publish(channel):
        conn.refuse(FORBIDDEN, f"not allowed to publish to {channel}", cmd.id)
        return
    stamp = {USER_HEADER: conn.principal.sub, CLIENT_HEADER: conn.id}
    if not cmd.echo:
        stamp[EXCLUDE_HEADER] = conn.id
    try:
        seq = await conn.hub.publish(channel, bytes(cmd.data), headers=stamp)
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
    reader: Principal | None = conn.principal
    if isinstance(channel, str) and not conn.principal.can_see_presence(channel):
        try:  # the subscribe callout may allow it (then read without the grant check)
            if is_valid_channel(channel) and await conn.auth.may_subscribe(
                conn.principal, conn.id, channel
            ):
                reader = None
        except AuthError as exc:
            conn.refuse(UNAVAILABLE, str(exc), cmd.id)
            return
    try:
        snap = await conn.presence.read_for(reader, channel, limit)
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


async def refresh(conn: Connection, cmd: Refresh) -> None:
    """``refresh``: a new token for the same user; channels it no longer grants (nor
    the subscribe callout allows) are left.

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
        try:
            allowed = await may_read(conn, principal, channel)
        except AuthError:  # the callout is away: keep what it allowed before
            allowed = True
        if conn.closed:
            return
        if not allowed and channel in conn.channels:
            conn.hub.unsubscribe(conn, channel)
            conn.send_frame(Unsubscribed(channel=channel, reason=FORBIDDEN))
    conn.send_frame(Refreshed(exp=principal.exp, id=cmd.id))
