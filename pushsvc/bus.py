"""The NATS side: connection, stream setup, refcounted live subscriptions, publish, history.

The bus never touches sockets. It hands every live message to one callback,
``on_message(channel, payload, seq)``, which ``app.py`` wires to the hub.

Subjects (``prefix`` = ``PUSHSVC_SUBJECT_PREFIX``, default ``push``):

- producers publish to ``<prefix>.<channel>``;
- with history on, the JetStream stream (``PUSHSVC_STREAM``) captures
  ``<prefix>.>`` and *republishes* every stored message to
  ``<prefix>-live.<channel>`` with the headers ``Nats-Sequence`` and
  ``Nats-Subject`` (NATS docs, "Streams: RePublish"). Nodes subscribe to the
  republished subjects, so even plain core publishes arrive with a stream
  sequence, and duplicates by ``Nats-Msg-Id`` are never republished;
- with history off (``PUSHSVC_HISTORY_TTL=0`` or no JetStream) nodes subscribe to
  ``<prefix>.<channel>`` directly and messages carry no sequence;
- revocations arrive on ``<prefix>-control.disconnect``.

Interest-based: a node holds one NATS subscription per channel with at least one
local subscriber; :meth:`Bus.release` of the last one unsubscribes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RePublish,
    StorageType,
    StreamConfig,
)

from .channels import subject_for
from .settings import Settings

log = logging.getLogger("pushsvc.bus")

MessageHandler = Callable[[str, bytes, int | None], None]
ControlHandler = Callable[[bytes], None]


class Unavailable(Exception):
    """NATS (or JetStream) cannot take or serve the request right now.

    Attributes:
        retry_after: seconds a client should wait before retrying.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class StoredMessage:
    """A message read back from the stream: stream ``seq`` and raw ``payload`` bytes."""

    seq: int
    payload: bytes


@dataclass
class History:
    """Result of :meth:`Bus.history`.

    Attributes:
        messages: stored messages of the channel with seq > since, oldest first.
        recovered: False when messages after ``since`` may have been removed from
            the stream (age or per-channel cap) or history is off.
        last_seq: the stream's last sequence when read (0 if empty/off).
        more: True when ``limit`` cut the result (page on with ``since`` = last seq).
    """

    messages: list[StoredMessage] = field(default_factory=list)
    recovered: bool = True
    last_seq: int = 0
    more: bool = False


@dataclass
class _LiveSub:
    refs: int = 0
    ready: asyncio.Future[None] | None = None
    sub: Subscription | None = None


class Bus:
    """One NATS connection for a pushsvc node.

    Args:
        settings: NATS URL(s), prefix, stream and history settings, timeouts.
        on_message: called with ``(channel, payload, seq)`` for every live message
            of a channel this node holds; must not block (it runs on the NATS
            subscription's task).
        on_control: called with the raw payload of each control message.
    """

    def __init__(
        self,
        settings: Settings,
        on_message: MessageHandler,
        on_control: ControlHandler | None = None,
    ) -> None:
        self.settings = settings
        self.prefix = settings.subject_prefix
        self.live_prefix = f"{self.prefix}-live"
        self.control_subject = f"{self.prefix}-control.disconnect"
        self._on_message = on_message
        self._on_control = on_control
        self.nc: NatsClient | None = None
        self.js = None
        self.history_enabled = settings.history
        self._subs: dict[str, _LiveSub] = {}
        self._control_sub: Subscription | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.connected = asyncio.Event()
        self.closing = False
        self.on_state_change: Callable[[bool], None] | None = None

    # --- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect (bounded by ``connect_timeout`` s) and set up the stream.

        After start, nats-py reconnects forever and resubscribes by itself.

        Raises:
            Unavailable: NATS could not be reached within ``connect_timeout``.
        """
        servers = self.settings.nats_servers
        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers,
                    name="pushsvc",
                    connect_timeout=max(1, int(self.settings.connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    ping_interval=10,
                    max_outstanding_pings=3,
                    error_cb=self._error_cb,
                    disconnected_cb=self._disconnected_cb,
                    reconnected_cb=self._reconnected_cb,
                    closed_cb=self._closed_cb,
                ),
                timeout=self.settings.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise Unavailable(
                f"cannot reach NATS at {', '.join(servers)} within "
                f"{self.settings.connect_timeout:g} s ({type(exc).__name__})"
            ) from None
        self.connected.set()
        self.js = self.nc.jetstream(timeout=self.settings.publish_timeout)
        if self.history_enabled:
            self.history_enabled = await self._ensure_stream()
        if self._on_control is not None:
            self._control_sub = await self.nc.subscribe(self.control_subject, cb=self._control_cb)

    async def _error_cb(self, exc: Exception) -> None:
        log.warning("NATS: %s: %s", type(exc).__name__, exc)

    async def _disconnected_cb(self) -> None:
        self.connected.clear()
        if not self.closing:
            log.warning("NATS disconnected; reconnecting (emits answer 503 meanwhile)")

    async def _reconnected_cb(self) -> None:
        self.connected.set()
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        log.info("NATS reconnected to %s; subscriptions restored", url)
        if self.settings.history and self.js is not None:
            # A restarted server with a fresh store has no stream: create it again.
            self.history_enabled = await self._ensure_stream() or self.history_enabled

    async def _closed_cb(self) -> None:
        self.connected.clear()

    async def close(self) -> None:
        """Drain the NATS connection (pending deliveries finish, then close)."""
        self.closing = True
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except (TimeoutError, nats.errors.Error):
                await nc.close()
        self.connected.clear()

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up."""
        return self.nc is not None and self.nc.is_connected

    async def _ensure_stream(self) -> bool:
        """Create or update the history stream; False when JetStream is unavailable."""
        s = self.settings
        config = StreamConfig(
            name=s.stream,
            subjects=[f"{self.prefix}.>"],
            max_age=s.history_ttl,
            max_msgs_per_subject=s.history_size,
            duplicate_window=min(s.dedupe_window, s.history_ttl),
            storage=StorageType.FILE,
            num_replicas=s.stream_replicas,
            republish=RePublish(src=f"{self.prefix}.>", dest=f"{self.live_prefix}.>"),
            allow_direct=True,
        )
        assert self.js is not None
        try:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # stream name already in use with a different config
                    raise
                await self.js.update_stream(config)
        except nats.js.errors.ServiceUnavailableError:
            log.warning("JetStream is not enabled on this NATS: history is off (live only)")
            return False
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            log.warning("JetStream did not answer: history is off (live only)")
            return False
        log.info(
            "stream %s ready: %s.> -> %s.>, ttl %gs, %d per channel",
            s.stream,
            self.prefix,
            self.live_prefix,
            s.history_ttl,
            s.history_size,
        )
        return True

    # --- live subscriptions (refcounted) -----------------------------------------
    def live_subject(self, channel: str) -> str:
        """The subject this node subscribes to for ``channel``."""
        prefix = self.live_prefix if self.history_enabled else self.prefix
        return subject_for(prefix, channel)

    def holds(self, channel: str) -> bool:
        """True when this node holds a NATS subscription for ``channel``."""
        live = self._subs.get(channel)
        return live is not None and live.sub is not None

    @property
    def subscription_count(self) -> int:
        """Number of live channel subscriptions held in NATS."""
        return sum(1 for s in self._subs.values() if s.sub is not None)

    async def acquire(self, channel: str) -> None:
        """Take a reference on ``channel``'s live subscription, subscribing on the first.

        Returns once NATS has confirmed the subscription (a flush round trip), so
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
            if self.nc is None or not self.nc.is_connected:
                raise Unavailable("NATS is not connected")
            cb = self._make_callback(channel)
            live.sub = await self.nc.subscribe(self.live_subject(channel), cb=cb)
            await self.nc.flush(timeout=self.settings.publish_timeout)
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
            task = asyncio.ensure_future(self._unsubscribe(live.sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
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
            await self._unsubscribe(sub)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass  # connection closing: the server forgets the subscription anyway

    def _make_callback(self, channel: str) -> Callable[[Msg], Awaitable[None]]:
        on_message = self._on_message
        if self.history_enabled:

            async def cb(msg: Msg) -> None:
                headers = msg.headers
                seq = headers.get("Nats-Sequence") if headers else None
                on_message(channel, msg.data, int(seq) if seq else None)

        else:

            async def cb(msg: Msg) -> None:
                on_message(channel, msg.data, None)

        return cb

    async def _control_cb(self, msg: Msg) -> None:
        if self._on_control is not None:
            self._on_control(msg.data)

    # --- publish -------------------------------------------------------------------
    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> int | None:
        """Publish ``payload`` to ``channel`` and wait until NATS has it.

        With history on this is a JetStream publish: returns the stream sequence
        after the ack (for a duplicate ``msg_id`` inside the dedupe window, the
        original sequence). With history off it is a core publish followed by a
        flush round trip; returns None.

        Raises:
            Unavailable: not connected, no ack within ``publish_timeout`` s, or
                JetStream refused the message.
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        subject = subject_for(self.prefix, channel)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            if self.history_enabled:
                assert self.js is not None
                ack = await self.js.publish(
                    subject,
                    payload,
                    timeout=self.settings.publish_timeout,
                    stream=self.settings.stream,
                    headers=headers,
                )
                return ack.seq
            await nc.publish(subject, payload, headers=headers)
            await nc.flush(timeout=self.settings.publish_timeout)
            return None
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"JetStream refused the message: {exc.description}") from None
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise Unavailable(f"NATS did not take the message ({type(exc).__name__})") from None

    # --- history -------------------------------------------------------------------
    async def history(self, channel: str, since: int, limit: int | None = None) -> History:
        """Stored messages of ``channel`` with seq > ``since``, oldest first, at most ``limit``.

        ``recovered`` is False when something after ``since`` may be gone: the
        stream's first sequence is past ``since + 1`` (max age), or the channel is
        at its per-channel cap and every retained message is newer than ``since``.
        JetStream would silently start at its first sequence in both cases; this
        detects and reports it. A ``since`` at or past the stream's last
        sequence means "nothing missed".

        Raises:
            Unavailable: history is off, or NATS/JetStream did not answer.
        """
        if not self.history_enabled or self.js is None:
            raise Unavailable("history is off")
        limit = limit or self.settings.history_size
        subject = subject_for(self.prefix, channel)
        stream = self.settings.stream
        try:
            info = await self.js.stream_info(stream, subjects_filter=subject)
            state = info.state
            if since >= state.last_seq:
                return History([], True, state.last_seq)
            count = (state.subjects or {}).get(subject, 0)
            if count == 0:
                return History([], state.first_seq <= since + 1, state.last_seq)
            psub = await self.js.pull_subscribe(
                subject,
                stream=stream,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=since + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=30.0,
                    mem_storage=True,
                    num_replicas=1,
                    max_deliver=1,
                ),
            )
            cinfo = await psub.consumer_info()
            pending = cinfo.num_pending
            try:
                messages: list[StoredMessage] = []
                want = min(pending, limit)
                while len(messages) < want:
                    batch = await psub.fetch(
                        batch=min(want - len(messages), 256),
                        timeout=self.settings.publish_timeout,
                    )
                    for m in batch:
                        messages.append(StoredMessage(m.metadata.sequence.stream, m.data))
            finally:
                try:
                    await psub.unsubscribe()
                    await self.js.delete_consumer(stream, cinfo.name)
                except (nats.errors.Error, nats.js.errors.Error):
                    pass  # the consumer is ephemeral: inactive_threshold removes it
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"history read failed ({type(exc).__name__})") from None
        lost_by_age = state.first_seq > since + 1
        lost_by_cap = count >= self.settings.history_size and pending >= count
        return History(
            messages, not (lost_by_age or lost_by_cap), state.last_seq, pending > len(messages)
        )
