"""What one node does for a server API operation, on its own connections.

:class:`LocalOps` acts on the hub's connections only; :mod:`pushsvc.serverapi.cluster`
scatters a request to every node and sums their answers. Nothing here waits on a
socket: closes, ``subscribed``/``unsubscribed`` frames and the rest go through each
connection's outbox.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Protocol, cast

import msgspec

from .._version import __version__
from ..auth.tokens import Principal
from ..bus import Unavailable
from ..channels import InvalidChannel, grant_covers, grant_matches, is_pattern
from ..config.settings import Settings
from ..core.hub import Hub
from ..protocol import INVALID_CHANNEL, LIMIT_EXCEEDED, UNAVAILABLE, Frame, Unsubscribed
from ..protocol import Error as ErrorFrame
from .schemas import (
    DEFAULT_REASON,
    ChannelsRequest,
    ChannelUsage,
    ConnectionInfo,
    Counted,
    DisconnectRequest,
    NodeChannels,
    NodeConnections,
    NodeInfo,
    SubscribeRequest,
    Target,
    UnsubscribeRequest,
    UserRequest,
)

#: ``unsubscribed.reason`` of a removal by the server API
SERVER_REASON = "server"


class _Transport(Protocol):
    name: str


class Connection(Protocol):
    """What the server API needs of a connection (:class:`~pushsvc.core.client.Client`)."""

    id: str
    principal: Principal
    channels: set[str]
    closed: bool
    transport: _Transport
    connected_at: float

    def send_frame(self, frame: Frame) -> None: ...
    def close(self, code: int, reason: str = "") -> None: ...
    def target(self, name: object) -> str: ...


class LocalOps:
    """The server API's operations on this node's connections.

    Args:
        settings: ``max_subscriptions``, ``node_name``.
        hub: the node's hub (its ``clients`` and ``users``; subscriptions).
        node_id: this process's id (the prefix of its client ids).
    """

    def __init__(self, settings: Settings, hub: Hub, node_id: str) -> None:
        self.settings = settings
        self.hub = hub
        self.node = settings.node_name or ""
        self.node_id = node_id
        self.started = time.time()

    def targets(self, target: Target) -> list[Connection]:
        """Open connections of ``target.user`` and/or the one ``target.client``."""
        if target.user:
            pool = self.hub.users.get(target.user, ())
        elif target.client and target.client.startswith(self.node_id + "-"):
            pool = self.hub.clients
        else:
            return []  # a client id of another process
        conns = cast("list[Connection]", list(pool))
        return [c for c in conns if not c.closed and (not target.client or c.id == target.client)]

    def disconnect(self, req: DisconnectRequest) -> Counted:
        """Close the target's connections with the request's close code (4011, 4012
        or the app's 4100-4999) and reason."""
        conns = self.targets(req)
        code, reason = req.close_code(), req.reason or DEFAULT_REASON
        for conn in conns:
            conn.close(code, reason)
        return Counted(len(conns))

    async def subscribe(self, req: SubscribeRequest) -> Counted:
        """Subscribe each target connection not yet subscribed to ``req.channel``.

        Each one gets ``subscribed`` (then the replay from ``since``, then live
        messages), exactly as after its own ``subscribe``, without a grant check:
        the backend decides. A connection at ``PUSHSVC_MAX_SUBSCRIPTIONS``, or one
        NATS could not subscribe, gets an ``error`` frame naming the channel (as a
        refused server-side subscription does) and is not counted.
        """
        conns = [c for c in self.targets(req) if req.channel not in c.channels]
        results = await asyncio.gather(*(self._subscribe_one(c, req) for c in conns))
        return Counted(sum(results))

    async def _subscribe_one(self, conn: Connection, req: SubscribeRequest) -> bool:
        channel = req.channel
        try:
            conn.target(channel)  # a pattern while wildcard subscriptions are off
        except InvalidChannel as exc:
            conn.send_frame(ErrorFrame(INVALID_CHANNEL, f"server subscription {channel}: {exc}"))
            return False
        limit = self.settings.max_subscriptions
        if len(conn.channels) >= limit:
            conn.send_frame(
                ErrorFrame(
                    LIMIT_EXCEEDED,
                    f"server subscription {channel}: at most {limit} subscriptions",
                )
            )
            return False
        try:
            await self.hub.subscribe(conn, channel, req.since, None, req.epoch)  # type: ignore[arg-type]
        except Unavailable as exc:
            conn.send_frame(ErrorFrame(UNAVAILABLE, f"server subscription {channel}: {exc}"))
            return False
        return not conn.closed and channel in conn.channels

    def unsubscribe(self, req: UnsubscribeRequest) -> Counted:
        """Remove ``req.channel`` from each target connection subscribed to it; each
        gets ``unsubscribed`` {``channel``, ``reason``: ``"server"``}."""
        count = 0
        for conn in self.targets(req):
            if req.channel in conn.channels:
                self.hub.unsubscribe(conn, req.channel)  # type: ignore[arg-type]
                conn.send_frame(Unsubscribed(channel=req.channel, reason=SERVER_REASON))
                count += 1
        return Counted(count)

    def _all(self) -> list[Connection]:
        return cast("list[Connection]", [c for c in self.hub.clients if not c.closed])

    def channels(self, req: ChannelsRequest) -> NodeChannels:
        """This node's channels (and wildcard subscriptions) ``req.pattern`` covers."""
        usage: dict[str, tuple[int, set[str]]] = {}
        pattern = req.pattern
        for conn in self._all():
            for channel in conn.channels:
                if pattern is not None and not (
                    grant_covers(pattern, channel)
                    if is_pattern(channel)
                    else grant_matches(pattern, channel)
                ):
                    continue
                clients, users = usage.get(channel, (0, set()))
                users.add(conn.principal.sub)
                usage[channel] = (clients + 1, users)
        return NodeChannels(
            {ch: ChannelUsage(n, sorted(users)) for ch, (n, users) in usage.items()}
        )

    def info(self) -> NodeInfo:
        """This node: name, id, version, uptime (s), connections, subscriptions, per transport."""
        conns = self._all()
        return NodeInfo(
            node=self.node,
            id=self.node_id,
            version=__version__,
            uptime=round(time.time() - self.started, 3),
            connections=len(conns),
            subscriptions=sum(len(c.channels) for c in conns),
            transports=dict(Counter(c.transport.name for c in conns)),
        )

    def connections(self, req: UserRequest) -> NodeConnections:
        """The open connections of ``req.user`` on this node."""
        found = []
        for conn in self.targets(Target(user=req.user)):
            info = conn.principal.info
            found.append(
                ConnectionInfo(
                    client=conn.id,
                    node=self.node,
                    transport=conn.transport.name,
                    channels=sorted(conn.channels),
                    connected_at=round(conn.connected_at, 3),
                    user=conn.principal.sub,
                    info=msgspec.Raw(info) if info is not None else msgspec.UNSET,
                )
            )
        return NodeConnections(found)
