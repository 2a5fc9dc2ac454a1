"""Bus: the one object the node talks to for NATS, composed of the bus's parts.

:class:`Bus` starts and closes the node's NATS side (connection, stream, control
subscription, stream watcher), resumes after a reconnect (verify the stream,
then :attr:`Bus.on_resumed`), and offers the operations of its parts under one
name: live subscriptions (:mod:`.subscriptions`), publish (:mod:`.publish`),
history reads (:mod:`.reads`), KV buckets (:mod:`.kv`) and channel events
(:mod:`.events`). The parts share one :class:`~pushsvc.bus.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..config.settings import Settings
from .connection import Connection
from .errors import Unavailable
from .events import EventHandler, Events
from .kv import KeyValueStore
from .lifecycle import LifecycleBus
from .publish import publish
from .reads import Reader
from .requests import Requests
from .stream import Streams
from .subscriptions import LiveSubscriptions, MessageHandler, PatternHandler

log = logging.getLogger("pushsvc.bus")

ControlHandler = Callable[[bytes], None]
ResumeHandler = Callable[[bool], Awaitable[None]]


class Bus:
    """One NATS connection for a pushsvc node.

    Args:
        settings: NATS URL(s), prefix, stream and history settings, timeouts.
        on_message: called with ``(channel, payload, seq, stamp, headers)`` for
            every live message of a channel this node holds (``stamp``: stream time,
            Unix seconds, or None; ``headers``: the NATS headers or None); must
            not block (it runs on the NATS subscription's
            task).
        on_control: called with the raw payload of each control message.
        name: the NATS connection name (shown by ``nats server report
            connections`` and ``/connz``); default ``pushsvc/<node>``.

    Attributes:
        conn: the shared :class:`~pushsvc.bus.connection.Connection`.
        streams: the history stream (:class:`~pushsvc.bus.stream.Streams`).
        live: live subscriptions (:class:`~pushsvc.bus.subscriptions.LiveSubscriptions`).
        reader: history reads (:class:`~pushsvc.bus.reads.Reader`).
        kv: KV buckets (:class:`~pushsvc.bus.kv.KeyValueStore`).
        events: channel events (:class:`~pushsvc.bus.events.Events`).
        requests: request/reply: serve, request, scatter
            (:class:`~pushsvc.bus.requests.Requests`).
        lifecycle: lifecycle events, their stream, expiry markers
            (:class:`~pushsvc.bus.lifecycle.LifecycleBus`).
        on_disconnected: called (synchronously) when the NATS connection drops.
        on_resumed: awaited after a reconnect once the stream is verified, with
            ``True`` when the stream was re-created (NATS lost its store:
            sequences restarted).

    Operations (the parts' methods, bound):

    - live subscriptions: ``holds(channel)``, ``acquire(channel)``,
      ``release(channel)`` (:class:`~pushsvc.bus.subscriptions.LiveSubscriptions`);
    - history: ``history(channel, since, limit, *, seen, epoch)``,
      ``channel_last_seq(channel)`` (:class:`~pushsvc.bus.reads.Reader`);
    - KV buckets: ``key_value(bucket, ttl, *, storage, description)``,
      ``scan_kv(bucket, keys)``, ``kv_put(bucket, key, value, *, ttl, msg_id)``,
      ``kv_entries(bucket, keys, *, timeout)``, ``kv_delete(bucket, key)``,
      ``kv_post(bucket, key, value, *, delete)``, ``kv_update(bucket, key, change)``
      (:class:`~pushsvc.bus.kv.KeyValueStore`);
    - channel events: ``events_subject(channel)``, ``publish_event(channel,
      payload)``, ``acquire_events(channel)``, ``release_events(channel)``
      (:class:`~pushsvc.bus.events.Events`);
    - :meth:`publish`.

    Each raises :class:`~pushsvc.bus.errors.Unavailable` when NATS or JetStream
    cannot serve it.
    """

    def __init__(
        self,
        settings: Settings,
        on_message: MessageHandler,
        on_control: ControlHandler | None = None,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.conn = Connection(settings, name or f"pushsvc/{settings.node_name or 'pushsvc'}")
        self.streams = Streams(self.conn)
        self.live = LiveSubscriptions(self.conn, on_message)
        self.reader = Reader(self.conn, self.streams)
        self.kv = KeyValueStore(self.conn)
        self.events = Events(self.conn)
        self.requests = Requests(self.conn)
        self.lifecycle = LifecycleBus(self.conn)
        self.control_subject = f"{self.conn.prefix}-control.disconnect"
        self._on_control = on_control
        self._control_sub: Subscription | None = None
        self.on_disconnected: Callable[[], None] | None = None
        self.on_resumed: ResumeHandler | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # the parts' operations under the names the node uses (bound methods: no
        # extra call on the way)
        self.holds = self.live.holds
        self.acquire = self.live.acquire
        self.release = self.live.release
        self.history = self.reader.history
        self.channel_last_seq = self.reader.channel_last_seq
        self.key_value = self.kv.key_value
        self.bucket = self.kv.bucket
        self.scan_kv = self.kv.scan
        self.kv_put = self.kv.put
        self.kv_entries = self.kv.entries
        self.kv_delete = self.kv.delete
        self.kv_post = self.kv.post
        self.kv_update = self.kv.update
        self.events_subject = self.events.subject
        self.publish_event = self.events.publish
        self.acquire_events = self.events.acquire
        self.release_events = self.events.release

    # --- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect (bounded by ``connect_timeout`` s) and set up the stream.

        After start, nats-py reconnects forever (every 0.5 s) and resubscribes by
        itself; after each reconnect the stream is verified again and
        :attr:`on_resumed` is awaited (see :meth:`_resume`).

        Raises:
            natsconn.NatsRefused: NATS refused the credentials or TLS (at once,
                without retrying).
            Unavailable: NATS could not be reached within ``connect_timeout`` s, or
                JetStream did not set up the stream within that time.
            StreamConfigError: the stream exists with settings that cannot be
                changed in place (history on).
        """
        conn = self.conn
        await conn.open(on_lost=self._lost, on_back=self._back)
        if conn.history_enabled:
            try:
                self.streams.check_server()
                conn.history_enabled = await self.streams.setup()
            except Unavailable:
                await self.close()
                raise
        if self._on_control is not None:
            nc = conn.nc
            assert nc is not None
            self._control_sub = await nc.subscribe(self.control_subject, cb=self._control_cb)
        if conn.history_enabled:
            self._watch_task = asyncio.ensure_future(self.streams.watch(self._resume_task_running))

    def _lost(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None
        if self.on_disconnected is not None:
            self.on_disconnected()

    def _back(self) -> None:
        if self._resume_task is not None:
            self._resume_task.cancel()
        self._resume_task = self.conn.spawn(self._resume())

    async def _resume(self) -> None:
        """After a reconnect: verify the stream (history on), then tell the hub.

        See :meth:`Streams.verify_after_reconnect
        <pushsvc.bus.stream.Streams.verify_after_reconnect>`; when it gives up
        (the connection dropped again) the next reconnect resumes instead.
        """
        reset = False
        if self.conn.history_enabled:
            verified = await self.streams.verify_after_reconnect()
            if verified is None:
                return
            reset = verified
        if self.on_resumed is not None:
            try:
                await self.on_resumed(reset)
            except Exception:
                log.exception("resume after reconnect failed")

    def _resume_task_running(self) -> bool:
        return self._resume_task is not None and not self._resume_task.done()

    async def _control_cb(self, msg: Msg) -> None:
        if self._on_control is not None:
            self._on_control(msg.data)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain the NATS connection (pending deliveries finish, then close).

        The drain is bounded by ``timeout`` seconds; after it the connection is closed.
        """
        self.conn.closing = True
        for task in (self._resume_task, self._watch_task):
            if task is not None:
                task.cancel()
        self._resume_task = self._watch_task = None
        await self.conn.close(timeout)

    # --- shared state --------------------------------------------------------------
    @property
    def nc(self) -> NatsClient | None:
        """The nats-py client (None before start and after close)."""
        return self.conn.nc

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up."""
        return self.conn.is_connected

    @property
    def history_enabled(self) -> bool:
        """History on: the stream is set up (turned off at start when NATS has no
        JetStream; may be turned off before :meth:`start` for a live-only probe)."""
        return self.conn.history_enabled

    @history_enabled.setter
    def history_enabled(self, value: bool) -> None:
        self.conn.history_enabled = value

    @property
    def epoch(self) -> str | None:
        """The stream's epoch (:func:`~pushsvc.bus.stream.epoch_of`); None with
        history off or before start."""
        return self.streams.epoch

    @property
    def stream_reset(self) -> bool:
        """True once this process saw the stream re-created under it."""
        return self.streams.stream_reset

    @property
    def on_epoch_changed(self) -> Callable[[str], None] | None:
        """Called (synchronously) with the new epoch when the stream turns out to
        have been re-created (deleted and created again, or NATS lost its store)."""
        return self.streams.on_epoch_changed

    @on_epoch_changed.setter
    def on_epoch_changed(self, handler: Callable[[str], None] | None) -> None:
        self.streams.on_epoch_changed = handler

    @property
    def on_pattern_message(self) -> PatternHandler | None:
        """Called with ``(pattern, channel, payload, seq, stamp, headers)`` for every live
        message of a wildcard subscription (:meth:`acquire` of a pattern); must
        not block."""
        return self.live.on_pattern_message

    @on_pattern_message.setter
    def on_pattern_message(self, handler: PatternHandler | None) -> None:
        self.live.on_pattern_message = handler

    def drained(self) -> bool:
        """True when every live message NATS delivered so far has been handed over
        (see :meth:`LiveSubscriptions.drained
        <pushsvc.bus.subscriptions.LiveSubscriptions.drained>`)."""
        return self.live.drained()

    @property
    def on_drained(self) -> Callable[[], None] | None:
        """Called after a live message when its NATS subscription has no other
        message waiting (see :attr:`LiveSubscriptions.on_drained
        <pushsvc.bus.subscriptions.LiveSubscriptions.on_drained>`); must not block."""
        return self.live.on_drained

    @on_drained.setter
    def on_drained(self, handler: Callable[[], None] | None) -> None:
        self.live.on_drained = handler

    @property
    def on_event(self) -> EventHandler | None:
        """Called with ``(channel, payload)`` for every channel event (join/leave)
        of a channel held with :meth:`acquire_events`; must not block."""
        return self.events.on_event

    @on_event.setter
    def on_event(self, handler: EventHandler | None) -> None:
        self.events.on_event = handler

    @property
    def subscription_count(self) -> int:
        """Number of live channel subscriptions held in NATS."""
        return self.live.count

    # --- publish ---------------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        payload: bytes,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> int | None:
        """Publish ``payload`` to ``channel`` (with NATS ``headers``); the stream
        sequence, or None with history off. See :func:`pushsvc.bus.publish.publish`.

        Raises:
            Unavailable: not connected, no ack within ``publish_timeout`` s, or
                JetStream refused the message.
        """
        return await publish(self.conn, self.streams, channel, payload, msg_id, headers)
