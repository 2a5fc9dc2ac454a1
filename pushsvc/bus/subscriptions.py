"""Live subscriptions: one refcounted NATS subscription per channel or pattern held.

Interest-based: a node holds one NATS subscription per channel with at least one
local subscriber; :meth:`LiveSubscriptions.release` of the last one
unsubscribes. With history on the node subscribes to the stream's republished
subjects ``<prefix>-live.<channel>`` (messages carry ``Nats-Sequence`` and
``Nats-Time-Stamp``); with history off to ``<prefix>.<channel>`` directly.

Each subscription's callback is the delivery hot path: it hands the message
straight to the hub's handler (``on_message`` / :attr:`~LiveSubscriptions.on_pattern_message`),
with nothing in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..channels import channel_for, is_pattern, pattern_reaches, subject_for
from .connection import Connection, confirm
from .errors import Unavailable
from .stream import stream_time

#: a message's NATS headers as nats-py gives them (None: no headers): the hub reads
#: pushsvc's own (``Pushsvc-User``...: :func:`pushsvc.protocol.publisher_of`)
Headers = dict[str, str] | None
#: ``(channel, payload, seq, stamp, headers)``: ``stamp`` is the message's stream
#: time (Unix seconds, from the republished ``Nats-Time-Stamp`` header) or None.
MessageHandler = Callable[[str, bytes, int | None, float | None, Headers], None]
#: ``(pattern, channel, payload, seq, stamp, headers)``: a message of a wildcard
#: subscription.
PatternHandler = Callable[[str, str, bytes, int | None, float | None, Headers], None]


@dataclass
class _LiveSub:
    refs: int = 0
    ready: asyncio.Future[None] | None = None
    sub: Subscription | None = None


class LiveSubscriptions:
    """The node's refcounted live subscriptions, channel (or pattern) -> NATS subscription.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.
        on_message: called with ``(channel, payload, seq, stamp, headers)`` for
            every live message of a channel held; must not block (it runs on the
            NATS subscription's task).

    Attributes:
        on_pattern_message: called with ``(pattern, channel, payload, seq, stamp,
            headers)`` for every live message of a wildcard subscription; must
            not block.
    """

    def __init__(self, conn: Connection, on_message: MessageHandler) -> None:
        self.conn = conn
        self._on_message = on_message
        self.on_pattern_message: PatternHandler | None = None
        #: called after a live message when its subscription has no other message
        #: waiting (nats-py's ``Subscription.pending_msgs`` is 0): the messages of
        #: one NATS read have all been handed over, so the hub can write them now
        #: instead of a loop iteration later. Must not block.
        self.on_drained: Callable[[], None] | None = None
        self._subs: dict[str, _LiveSub] = {}

    def subject(self, channel: str) -> str:
        """The subject this node subscribes to for ``channel``."""
        conn = self.conn
        return subject_for(conn.live_prefix if conn.history_enabled else conn.prefix, channel)

    def holds(self, channel: str) -> bool:
        """True when this node holds a NATS subscription for ``channel``."""
        live = self._subs.get(channel)
        return live is not None and live.sub is not None

    def drained(self) -> bool:
        """True when no live subscription has a message waiting in nats-py's queue.

        nats-py parses the connection's messages in the order the server sent them
        and queues each on its subscription (``Subscription.pending_msgs``); when
        every queue is empty, every message read so far has been handed to the hub.
        """
        for live in self._subs.values():
            sub = live.sub
            if sub is not None and sub.pending_msgs:
                return False
        return True

    @property
    def count(self) -> int:
        """Number of live channel subscriptions held in NATS."""
        return sum(1 for s in self._subs.values() if s.sub is not None)

    async def acquire(self, channel: str) -> None:
        """Take a reference on ``channel``'s live subscription, subscribing on the first.

        Returns once NATS has confirmed the subscription (see :func:`confirm`), so
        every message published after this returns is delivered.

        Raises:
            Unavailable: NATS is down or did not confirm in time.
        """
        live = self._subs.get(channel)
        if live is None:
            live = self._subs[channel] = _LiveSub()
        live.refs += 1
        if live.sub is not None:
            return
        if live.ready is not None:
            await asyncio.shield(live.ready)
            return
        live.ready = asyncio.get_running_loop().create_future()
        try:
            nc = self.conn.client()
            cb = self._make_callback(channel, live)
            live.sub = await nc.subscribe(self.subject(channel), cb=cb)
            await confirm(nc, self.conn.settings.publish_timeout)
        except Unavailable as exc:
            self._fail_acquire(channel, live, exc)
            raise
        except (nats.errors.Error, TimeoutError) as exc:
            err = Unavailable(f"NATS did not confirm the subscription ({type(exc).__name__})")
            self._fail_acquire(channel, live, err)
            raise err from None
        live.ready.set_result(None)
        live.ready = None
        if live.refs == 0:  # released while subscribing
            await self._drop(channel, live)

    def _fail_acquire(self, channel: str, live: _LiveSub, exc: Exception) -> None:
        assert live.ready is not None
        live.ready.set_exception(exc)
        live.ready.exception()  # mark retrieved
        live.ready = None
        live.refs -= 1
        if live.sub is not None:
            self.conn.spawn(self.conn.unsubscribe(live.sub))
            live.sub = None
        if live.refs <= 0:
            self._subs.pop(channel, None)

    async def release(self, channel: str) -> None:
        """Drop a reference; the last one unsubscribes ``channel`` in NATS."""
        live = self._subs.get(channel)
        if live is None:
            return
        live.refs -= 1
        if live.refs <= 0 and live.ready is None:
            await self._drop(channel, live)

    async def _drop(self, channel: str, live: _LiveSub) -> None:
        self._subs.pop(channel, None)
        if live.sub is not None:
            sub, live.sub = live.sub, None
            await self.conn.unsubscribe(sub)

    def _make_callback(self, channel: str, live: _LiveSub) -> Callable[[Msg], Awaitable[None]]:
        if is_pattern(channel):
            return self._make_pattern_callback(channel, live)
        on_message = self._on_message
        drained = self._drained(live)
        if self.conn.history_enabled:

            async def cb(msg: Msg) -> None:
                headers = msg.headers
                if headers:
                    seq = headers.get("Nats-Sequence")
                    stamp = stream_time(headers.get("Nats-Time-Stamp"))
                    on_message(channel, msg.data, int(seq) if seq else None, stamp, headers)
                else:
                    on_message(channel, msg.data, None, None, None)
                drained()

        else:

            async def cb(msg: Msg) -> None:
                on_message(channel, msg.data, None, None, msg.headers)
                drained()

        return cb

    def _drained(self, live: _LiveSub) -> Callable[[], None]:
        """After each message of ``live``: :attr:`on_drained` once none is waiting."""

        def drained() -> None:
            sub = live.sub
            if (sub is None or not sub.pending_msgs) and self.on_drained is not None:
                self.on_drained()

        return drained

    def _make_pattern_callback(
        self, pattern: str, live: _LiveSub
    ) -> Callable[[Msg], Awaitable[None]]:
        """Callback of a wildcard subscription: the concrete channel comes from the subject.

        Personal channels are skipped unless the pattern starts with ``user``
        (:func:`~pushsvc.channels.pattern_reaches`).
        """
        conn = self.conn
        prefix = conn.live_prefix if conn.history_enabled else conn.prefix
        history = conn.history_enabled
        drained = self._drained(live)

        async def cb(msg: Msg) -> None:
            channel = channel_for(prefix, msg.subject)
            if channel is None or not pattern_reaches(pattern, channel):
                drained()
                return
            seq = stamp = None
            headers = msg.headers
            if history and headers:
                raw = headers.get("Nats-Sequence")
                seq = int(raw) if raw else None
                stamp = stream_time(headers.get("Nats-Time-Stamp"))
            if self.on_pattern_message is not None:
                self.on_pattern_message(pattern, channel, msg.data, seq, stamp, headers)
            drained()

        return cb
