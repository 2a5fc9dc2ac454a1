"""Lifecycle events on NATS: ``<prefix>-events.<type>``, their stream, expiry markers.

- :meth:`LifecycleBus.publish` core-publishes one event with ``Nats-Msg-Id``, so
  the events stream (when set up) stores it once even when it is published twice
  (JetStream deduplication, NATS docs "Message Deduplication"); core subscribers
  get every publish, in the order this connection wrote them.
- :meth:`LifecycleBus.setup_stream` creates or updates the stream
  ``PUSHSVC_EVENTS_STREAM`` capturing ``<prefix>-events.>`` with ``max_age`` =
  ``PUSHSVC_EVENTS_TTL``, so a consumer that was down catches up.
- :meth:`LifecycleBus.expiries` runs a durable pull consumer shared by every node
  on a KV bucket's subjects and hands each *expiry* marker (``Nats-Marker-Reason``:
  an entry removed by its TTL, nats-server 2.11+ subject delete markers, ADR-43)
  to exactly one node: how a node that died is noticed by the others. A marker
  is acknowledged only after its handler returned, so a node dying while
  handling it leaves it to another (redelivered after ``ack_wait``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from .connection import Connection
from .errors import Unavailable

log = logging.getLogger("pushsvc.bus.lifecycle")

#: ``(key)``: a KV entry ``key`` expired (its writer stopped refreshing it)
ExpiryHandler = Callable[[str], Awaitable[None]]
ACK_WAIT = 30.0  # s before an unacknowledged marker goes to another node


class LifecycleBus:
    """The node's lifecycle-event publishes, the events stream, and expiry watching.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.

    Attributes:
        prefix: ``<prefix>-events``.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.prefix = f"{conn.prefix}-events"
        # each expiry consumer's fetch loop and its pull subscription
        self._watchers: list[tuple[asyncio.Task[None], JetStreamContext.PullSubscription]] = []

    def subject(self, kind: str) -> str:
        """``<prefix>-events.<kind>``."""
        return f"{self.prefix}.{kind}"

    async def publish(self, kind: str, payload: bytes, msg_id: str) -> None:
        """Core-publish one event of type ``kind`` with ``Nats-Msg-Id: msg_id``.

        Raises:
            Unavailable: NATS is not connected or refused the write.
        """
        nc = self.conn.client()
        try:
            await nc.publish(self.subject(kind), payload, headers={"Nats-Msg-Id": msg_id})
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"NATS did not take the event ({type(exc).__name__})") from None

    async def setup_stream(self, name: str, ttl: float) -> None:
        """Create (or update) the stream ``name`` storing ``<prefix>-events.>`` for
        ``ttl`` seconds (file storage, ``PUSHSVC_STREAM_REPLICAS`` replicas,
        duplicate window ``min(120, ttl)`` s).

        Raises:
            Unavailable: JetStream refused or did not answer.
        """
        js = self.conn.js
        if js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        config = StreamConfig(
            name=name,
            description="pushsvc lifecycle events",
            subjects=[f"{self.prefix}.>"],
            max_age=ttl,
            storage=StorageType.FILE,
            num_replicas=self.conn.settings.stream_replicas,
            duplicate_window=min(120.0, ttl),
        )
        try:
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # exists with another configuration
                    raise
                await js.update_stream(config)
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"events stream {name}: {exc.description}") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"events stream {name} not ready ({type(exc).__name__})") from None

    async def expiries(self, bucket: str, keys: str, durable: str, handler: ExpiryHandler) -> None:
        """Hand every expiry marker of ``bucket``'s ``keys`` to ``handler``, on one node.

        A durable pull consumer ``durable`` (created by the first node, new
        messages only) on the bucket's stream, filtered on ``$KV.<bucket>.<keys>``,
        fetched by every node: JetStream gives each message to one of them.
        Writes and deletes are acknowledged and skipped.

        Raises:
            Unavailable: JetStream refused the consumer.
        """
        js = self.conn.js
        if js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        subject = f"$KV.{bucket}.{keys}"
        config = ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            filter_subject=subject,
            max_ack_pending=1000,
        )
        try:
            psub = await js.pull_subscribe(subject, durable, stream=f"KV_{bucket}", config=config)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(
                f"expiry consumer on {bucket} failed ({type(exc).__name__})"
            ) from None
        prefix = len(f"$KV.{bucket}.")

        async def loop() -> None:
            while True:
                try:
                    msgs = await psub.fetch(64, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("expiry fetch on %s failed (%s)", bucket, type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    if (msg.headers or {}).get("Nats-Marker-Reason"):
                        try:
                            await handler(msg.subject[prefix:])
                        except Exception:
                            log.exception("expiry handler for %s failed", msg.subject)
                            continue  # not acknowledged: another node takes it
                    try:
                        await msg.ack()
                    except nats.errors.Error:
                        pass

        self._watchers.append((asyncio.ensure_future(loop()), psub))

    async def stop(self) -> None:
        """Stop fetching expiry markers (the durable consumer stays for the others).

        The pull subscriptions' inboxes are unsubscribed too: an answer to the
        fetch the stop cancelled (a message, or JetStream's 408 at the fetch's
        expiry) would otherwise wait in the inbox's queue, and the connection's
        drain waits for that queue to empty, up to its whole timeout (and then
        nats-py logs its cancelled drain as an ERROR).
        """
        watchers, self._watchers = self._watchers, []
        for task, _ in watchers:
            task.cancel()
        await asyncio.gather(*(task for task, _ in watchers), return_exceptions=True)
        for _, psub in watchers:
            try:
                await psub.unsubscribe()
            except nats.errors.Error:
                pass  # closing or closed: the server forgets the inbox anyway
