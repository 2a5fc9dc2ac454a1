"""Channel events (join/leave): core NATS on ``<prefix>-joinleave.<channel>``, never stored.

A node publishes an event when one of its sessions joins or leaves a channel
that has events on (``PUSHSVC_JOIN_LEAVE_CHANNELS``) and holds one refcounted
subscription per such channel with local subscribers, so every node delivers
every node's events (:mod:`pushsvc.core.joinleave` builds and delivers the frames).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from ..channels import subject_for
from .connection import Connection
from .errors import Unavailable

#: ``(channel, payload)``: one event of a channel held with :meth:`Events.acquire`.
EventHandler = Callable[[str, bytes], None]


class Events:
    """The node's channel-event subscriptions and publishes.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.

    Attributes:
        prefix: ``<prefix>-joinleave``.
        on_event: called with ``(channel, payload)`` for every event of a channel
            held with :meth:`acquire`; must not block.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.prefix = f"{conn.prefix}-joinleave"
        self.on_event: EventHandler | None = None
        self._subs: dict[str, list[Any]] = {}  # channel -> [refs, Subscription | None]

    def subject(self, channel: str) -> str:
        """Subject of ``channel``'s events: ``<prefix>-joinleave.<channel>``."""
        return subject_for(self.prefix, channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        """Core-publish one event of ``channel`` (not stored, no ack awaited).

        Raises:
            Unavailable: NATS is not connected or refused the write.
        """
        nc = self.conn.client()
        try:
            await nc.publish(self.subject(channel), payload)
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"NATS did not take the event ({type(exc).__name__})") from None

    async def acquire(self, channel: str) -> None:
        """Take a reference on ``channel``'s event subscription, subscribing on the first.

        The SUB is written before any later PUB on this connection, so this node's
        own events published after this returns reach it (NATS processes a
        connection's protocol in order).

        Raises:
            Unavailable: NATS is not connected.
        """
        entry = self._subs.get(channel)
        if entry is not None:
            entry[0] += 1
            return
        nc = self.conn.client()
        entry = self._subs[channel] = [1, None]

        async def cb(msg: Msg) -> None:
            if self.on_event is not None:
                self.on_event(channel, msg.data)

        try:
            sub = await nc.subscribe(self.subject(channel), cb=cb)
        except nats.errors.Error as exc:
            if self._subs.get(channel) is entry:
                del self._subs[channel]
            raise Unavailable(f"NATS refused the subscription ({type(exc).__name__})") from None
        if self._subs.get(channel) is not entry:  # released meanwhile
            await self.conn.unsubscribe(sub)
            return
        entry[1] = sub

    async def release(self, channel: str) -> None:
        """Drop a reference; the last one unsubscribes ``channel``'s events."""
        entry = self._subs.get(channel)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self._subs[channel]
            if entry[1] is not None:
                await self.conn.unsubscribe(entry[1])
