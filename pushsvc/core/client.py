"""One authenticated connection, whatever its transport: state, lifecycle, limits.

A :class:`Client` owns what every transport needs (centrifuge's ``client.go``):
the principal, the subscription set, the user's command token bucket and the
strikes against it, heartbeat and token-expiry deadlines, the server-side
subscriptions at ``welcome``, and closing with a transport-neutral
:class:`~pushsvc.protocol.Disconnect`. Outbound frames go through its
:class:`~pushsvc.core.outbox.Outbox`; the transport (``pushsvc.ws``,
``pushsvc.sse``) only frames and writes. Commands are decoded here and handled
by :mod:`pushsvc.core.commands`.

Heartbeat, auth expiry and pong deadlines are coarse (:mod:`pushsvc.core.deadlines`:
one loop timer per 0.1 s tick for every connection), not tasks or per-connection
timers.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from operator import methodcaller
from types import MappingProxyType

from .. import metrics
from ..auth.tokens import Authenticator, Principal
from ..channels import InvalidChannel, is_pattern, personal_channel, validate_channel
from ..channels import validate_pattern as _validate_pattern
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_RATE_LIMITED,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    PING_FRAME,
    RATE_LIMITED,
    Auth,
    Disconnect,
    Error,
    Pong,
    ProtocolError,
    SubResume,
    Welcome,
    decode_command,
)
from . import commands
from .deadlines import deadlines
from .hub import Hub
from .outbox import Outbox, fan_out
from .presence import PresenceRegistry
from .ratelimit import BucketRegistry, TokenBucket
from .rpc import Calls
from .transport import Transport

log = logging.getLogger("pushsvc.client")

_ids = itertools.count(1)
_NO_RESUME: Mapping[str, SubResume] = MappingProxyType({})
# what the deadlines call on a client (by name: a subclass's override is honoured)
_PING, _PONG_MISSED, _EXPIRED = (methodcaller(n) for n in ("_ping", "_pong_missed", "_expired"))
_PING_BYTES = len(PING_FRAME)


class Client(Outbox):
    """One authenticated connection over any :class:`~pushsvc.core.transport.Transport`.

    Args:
        transport: the connection's transport (framing and writes).
        principal: the verified token's principal.
        hub: the node's hub (subscriptions, publish).
        auth: verifies refresh tokens.
        bucket: the user's command token bucket (shared by the user's connections).
        settings: limits and timers (seconds, bytes).
        resume_subs: channel -> ``since``/``epoch`` for the server-side
            subscriptions (:meth:`server_subscriptions`): the WebSocket auth frame's
            ``subs`` map, or an SSE stream's position.
        presence: the node's presence registry (reads for the ``presence`` and
            ``presence_stats`` commands); None: presence is off for this client.
        channels: channels (or patterns) the connection asked for when it opened
            (SSE ``?channel=``, ``POST /stream`` ``channels``; grants checked by the
            endpoint), subscribed after the token's server-side subscriptions.
        session: the secret addressing the connection for ``POST /sse/commands``
            (sent in ``welcome``), or None (WebSocket: commands come on the socket).

    Attributes:
        id: the public client id (``welcome.client``, presence): never an address
            for commands.
        channels: channels and patterns this client is subscribed to.
        outbox: its outbound buffer (bounded; 4009 on overflow): the client itself.
        close_code: the close code once closed.
        close_reason: the close reason once closed by the server.
        connected_at: when the connection was accepted (Unix seconds).
    """

    __slots__ = (
        "__weakref__",
        "_expiries",
        "_extra",
        "_pings",
        "_pongs",
        "_resume",
        "_strikes",
        "auth",
        "bucket",
        "calls",
        "close_code",
        "close_reason",
        "connected_at",
        "hub",
        "presence",
        "principal",
        "session",
        "settings",
    )

    def __init__(
        self,
        transport: Transport,
        principal: Principal,
        hub: Hub,
        auth: Authenticator,
        bucket: TokenBucket,
        settings: Settings,
        *,
        resume_subs: Mapping[str, SubResume] | None = None,
        presence: PresenceRegistry | None = None,
        channels: list[str] | None = None,
        session: str | None = None,
    ) -> None:
        super().__init__(
            f"{hub.node_id}-{next(_ids)}",
            transport,
            max_bytes=settings.send_queue_bytes,
            coalesce_bytes=settings.coalesce_bytes,
            send_timeout=settings.send_timeout,
        )
        self.session = session
        self._extra = tuple(channels) if channels else ()
        self.principal = principal
        self.hub = hub
        self.auth = auth
        self.bucket = bucket
        self.settings = settings
        self.presence = presence
        self.close_code: int | None = None
        self.close_reason = ""
        self.connected_at = time.time()
        loop = self._loop
        # deadlines (pushsvc.core.deadlines): next ping, the pong awaited, the token's expiry
        self._pings = deadlines(loop, "ping", _PING)
        self._pongs = deadlines(loop, "pong", _PONG_MISSED)
        self._expiries = deadlines(loop, "expiry", _EXPIRED)
        self._strikes = 0  # command refusals in a row on this connection
        # server-side subs to resume (most connections have none: one shared empty map)
        self._resume = dict(resume_subs) if resume_subs else _NO_RESUME
        self.calls = Calls()  # rpc calls waiting for their service's reply

    # --- outbound (send, send_frame, buffered_bytes: the Outbox's) ------------------------
    @property
    def outbox(self) -> Outbox:
        """The connection's outbox: the client itself (its :class:`Outbox` base)."""
        return self

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Register with the hub, send ``welcome``, arm the deadlines, subscribe server-side.

        The caller has accepted the connection and registered nothing; :meth:`gone`
        (or :meth:`close`) always unregisters.
        """
        self.hub.add_client(self)
        self.send_frame(
            Welcome(
                client=self.id,
                user=self.principal.sub,
                ping_interval=self.settings.ping_interval,
                exp=self.principal.exp,
                node=self.settings.node_name,
                epoch=self.hub.epoch,
                subs=(server_subs := self.server_subscriptions()),
                session=self.session,
            )
        )
        self._schedule_ping()
        self._schedule_expiry()
        if server_subs:
            self.hub.watermark.track(self, planned=len(server_subs))
            try:
                await self._server_subscribe(server_subs)
            finally:
                self.hub.watermark.started(self)

    def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` (see protocol.py); idempotent, never blocks.

        Releases the outbox and the client's channels at once; the transport tells
        the peer (:meth:`Transport.close`) in the background, bounded in time.
        """
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        metrics.CLOSES.labels(str(code)).inc()
        # a drain closes every connection with 1012: one line per socket only at debug
        level = logging.DEBUG if code == CLOSE_SERVICE_RESTART else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "session closed",
                extra={
                    "client": self.id,
                    "code": code,
                    "reason": reason,
                    "channels": len(self.channels),
                    "transport": self.transport.name,
                },
            )
        self._cancel_timers()
        self.calls.cancel()
        self._shut()
        self.hub.remove_client(self)
        self.transport.close(Disconnect.of(code, reason))

    def gone(self) -> None:
        """The peer went away (or the transport stopped reading): forget the client."""
        if not self.closed and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "client disconnected",
                extra={"client": self.id, "channels": len(self.channels)},
            )
        self.closed = True
        self._cancel_timers()
        self.calls.cancel()
        self._shut()
        self.hub.remove_client(self)

    def _cancel_timers(self) -> None:
        self._pings.clear(self)
        self._pongs.clear(self)
        self._expiries.clear(self)

    def _schedule_ping(self) -> None:
        self._pings.set(self, self.settings.ping_interval)

    def _ping(self) -> None:
        """The ping deadline: send ``ping``, await a ``pong`` (if the transport needs one).

        The ping goes out as a fan-out of one: written pre-framed to the wire when
        nothing is pending (no buffer, flush callback or ASGI send), else queued
        behind what is. An idle node's CPU is mostly heartbeats (docs/capacity.md).
        """
        if self.closed:
            return
        fan_out((self.outbox,), PING_FRAME, _PING_BYTES)
        if self.transport.expects_pong and self not in self._pongs:
            self._pongs.set(self, self.settings.pong_timeout)
        self._schedule_ping()

    def pong(self) -> None:
        """A ``pong`` came: free when it answers a ping, else it costs a command token.

        Called for every pong: by :meth:`handle_text`, or by the transport for the
        pongs it recognises itself (the WebSocket transport's canonical
        ``{"op":"pong"}``, :meth:`pushsvc.ws.transport.WebSocketTransport.take_pongs`).
        """
        if self in self._pongs:
            self._pongs.clear(self)
        elif not self.closed:  # unsolicited: free for a client answering pings, charged for a flood
            self.charge(None)

    def _pong_missed(self) -> None:
        self.close(CLOSE_HEARTBEAT_TIMEOUT, "no pong")

    def _expired(self) -> None:
        self.close(CLOSE_UNAUTHORIZED, "token expired")

    def _schedule_expiry(self) -> None:
        self._expiries.set(self, self.auth.expires_in(self.principal))

    def reprincipal(self, principal: Principal) -> None:
        """Take a refreshed token's ``principal`` (same ``sub``) and re-arm the expiry."""
        self.principal = principal
        self._schedule_expiry()

    # --- inbound -----------------------------------------------------------------------
    async def handle_text(self, text: str | None) -> None:
        """Handle one client frame: a text holding one JSON command (None: a binary frame).

        Rules (wire contract v1; OWASP WebSocket cheat sheet: validate every
        message, limit rates):

        - binary frames, non-JSON, non-objects, unknown ``op``, wrong field types
          and nesting deeper than msgspec allows get ``error`` ``bad_request``
          and cost one command token, so malformed floods are rate limited too;
        - ``subscribe``/``unsubscribe``/``publish``/``refresh``/``presence``/``rpc`` (and a
          repeated ``auth``) cost one token of the user's bucket; refused ones get
          ``rate_limited`` with ``retry_after`` seconds and count as strikes;
        - ``pong`` answering a ping is free; an unsolicited one costs a token;
        - a frame longer than ``max_frame_bytes`` closes 1009 (normally uvicorn's
          ``ws_max_size`` does this first, counting bytes after reassembly).

        Never raises for client mistakes (no traceback is logged for them).
        """
        if text is None:
            self.refuse(BAD_REQUEST, "binary frames are not supported", None, charge=True)
            return
        if len(text) > self.settings.max_frame_bytes:
            self.close(CLOSE_TOO_BIG, "frame too big")
            return
        try:
            cmd = decode_command(text)
        except ProtocolError as exc:
            self.refuse(BAD_REQUEST, str(exc), None, charge=True)
            return
        if isinstance(cmd, Pong):
            self.pong()
            return
        if isinstance(cmd, Auth):
            self.refuse(BAD_REQUEST, "already authenticated", None, charge=True)
            return
        metrics.COMMANDS.labels(type(cmd).__name__.lower()).inc()
        if not self.charge(cmd.id):
            return
        await commands.handle(self, cmd)

    def refuse(self, code: str, message: str, req_id: object, *, charge: bool = False) -> None:
        """Answer ``error``; with ``charge`` the frame also costs a command token."""
        self.send_frame(Error(code=code, message=message, id=req_id))  # type: ignore[arg-type]
        if charge:
            self.charge(None)

    def charge(self, req_id: object) -> bool:
        """Take one token from the user's command bucket (shared by all their connections).

        Returns:
            True when granted. When refused, answers ``error`` ``rate_limited``
            with ``retry_after`` (seconds) and returns False; the refusal is this
            connection's strike, and a connection refused more than
            ``PUSHSVC_RATE_LIMIT_STRIKES`` times in a row is closed with 4008.
            Strikes are counted per connection, so a user's well-behaved socket is
            not closed for the flood of their other one.
        """
        wait = self.bucket.take()
        if not wait:
            self._strikes = 0
            return True
        self._strikes += 1
        metrics.RATE_LIMITED.inc()
        if self._strikes > self.settings.rate_limit_strikes:
            self.close(CLOSE_RATE_LIMITED, "rate limit exceeded repeatedly")
            return False
        self.send_frame(
            Error(
                code=RATE_LIMITED,
                message="too many commands",
                id=req_id,  # type: ignore[arg-type]
                retry_after=round(wait, 3),
            )
        )
        return False

    def target(self, name: object) -> str:
        """A subscription target: a channel, or a pattern when wildcards are on.

        Raises:
            InvalidChannel: malformed, or a pattern with
                ``PUSHSVC_WILDCARD_SUBSCRIPTIONS=false``.
        """
        if is_pattern(name):
            if not self.settings.wildcard_subscriptions:
                raise InvalidChannel("wildcard subscriptions are off on this server")
            return _validate_pattern(name)
        return validate_channel(name)

    def server_subscriptions(self) -> list[str]:
        """Channels the server subscribes this client to at ``welcome``, in order.

        The token's ``subs`` claim (Centrifugo's server-side subscriptions),
        preceded by ``user.<sub>`` with ``PUSHSVC_AUTO_SUBSCRIBE_PERSONAL`` and
        followed by the channels the connection opened with (SSE, HTTP-streaming).
        """
        subs = list(self.principal.subs)
        if self.settings.auto_subscribe_personal:
            subs.insert(0, personal_channel(self.principal.sub))
        return list(dict.fromkeys([*subs, *self._extra]))

    def resume_all(self, position: SubResume) -> None:
        """Resume every channel subscribed at ``welcome`` from one stream position
        (an SSE / HTTP-streaming stream's last event id): the token's server-side
        subscriptions and the channels the stream opened with. Call before :meth:`start`."""
        self._resume = dict.fromkeys(self.server_subscriptions(), position)

    def resume_position(self, channel: str) -> SubResume | None:
        """The position a server-side subscription to ``channel`` resumes from, if any."""
        return self._resume.get(channel)

    async def _server_subscribe(self, channels: list[str]) -> None:
        await commands.server_subscribe(self, channels)


class ClientFactory:
    """Makes a :class:`Client` for any transport's endpoint: the node's parts every client holds.

    Args:
        settings / hub / auth / buckets / presence: as for :class:`Client` (``buckets``
            gives each user's command token bucket).
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        auth: Authenticator,
        buckets: BucketRegistry,
        presence: PresenceRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.auth = auth
        self.buckets = buckets
        self.presence = presence

    def make(
        self,
        transport: Transport,
        principal: Principal,
        *,
        resume_subs: Mapping[str, SubResume] | None = None,
        channels: list[str] | None = None,
        session: str | None = None,
    ) -> Client:
        """A client of ``principal`` over ``transport`` (see :class:`Client` for the rest)."""
        return Client(
            transport,
            principal,
            self.hub,
            self.auth,
            self.buckets.get(principal.sub),
            self.settings,
            resume_subs=resume_subs,
            presence=self.presence,
            channels=channels,
            session=session,
        )
