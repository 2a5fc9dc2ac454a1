"""Lifecycle events: ``connect``, ``disconnect``, ``subscribe``, ``unsubscribe`` on NATS.

For the types in ``PUSHSVC_EVENTS`` the node publishes one JSON :class:`Event` per
change to ``<prefix>-events.<type>`` with ``Nats-Msg-Id`` (:mod:`pushsvc.bus.lifecycle`),
in the order the changes happened on this node (one writer task, one NATS
connection): a connection's ``connect`` comes before its ``subscribe``\\ s, which
come before its ``unsubscribe``\\ s and its ``disconnect``. With history on they
are also stored in ``PUSHSVC_EVENTS_STREAM`` for ``PUSHSVC_EVENTS_TTL`` seconds.

With ``disconnect`` on, the node also keeps a record of each connection in the
node bucket (``c.<node id>.<client>``, :mod:`pushsvc.serverapi.nodes`), deleted at
disconnect: what another node needs to report the connection's ``disconnect``
when this node dies (:mod:`pushsvc.lifecycle.lost`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Protocol, cast

import msgspec

from ..auth.tokens import Principal
from ..bus import Bus, Unavailable
from ..config.settings import Settings
from ..core.member import Member
from ..serverapi.nodes import connection_key

log = logging.getLogger("pushsvc.lifecycle")

CLOSE_LOST = 1006  # the code of a connection that ended without a close (RFC 6455 7.1.5)


class Event(msgspec.Struct, omit_defaults=True):
    """One lifecycle event: ``{type, time, node, client?, user?, channel?, transport?,
    info?, code?, reason?, duration?}`` (``time`` Unix seconds, ``duration`` seconds
    the connection lasted; ``code``/``reason`` of a ``disconnect``)."""

    type: str
    time: float
    node: str
    client: str | None = None
    user: str | None = None
    channel: str | None = None
    transport: str | None = None
    info: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    code: int | None = None
    reason: str | None = None
    duration: float | None = None


class Record(msgspec.Struct, omit_defaults=True):
    """A live connection's record in the node bucket (for ``node_lost``)."""

    client: str
    user: str
    node: str
    transport: str
    connected_at: float
    info: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Transport(Protocol):
    name: str


class Connection(Protocol):
    """What lifecycle events read of a connection (:class:`~pushsvc.core.client.Client`)."""

    id: str
    principal: Principal
    transport: _Transport
    connected_at: float
    close_code: int | None
    close_reason: str


def _info(principal: Principal) -> msgspec.Raw | msgspec.UnsetType:
    return msgspec.Raw(principal.info) if principal.info is not None else msgspec.UNSET


class LifecycleEvents:
    """This node's lifecycle-event publisher (hub observers -> ordered NATS writes).

    Args:
        settings: ``events`` (types on), ``events_stream``, ``events_ttl`` (s),
            ``node_bucket``, ``node_name``.
        bus: the node's bus.
        node_id: this node's id (the prefix of its client ids).

    Wire :meth:`connected`, :meth:`disconnected`, :meth:`joined` and :meth:`left`
    to the hub; :meth:`start` after the bus, :meth:`stop` before it closes.
    """

    def __init__(self, settings: Settings, bus: Bus, node_id: str) -> None:
        self.settings = settings
        self.bus = bus
        self.node = settings.node_name or ""
        self.node_id = node_id
        self.types = frozenset(settings.events)
        self.records = "disconnect" in self.types
        self._queue: deque[tuple[str, bytes, str] | tuple[str, bytes | None]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set by the writer whenever the queue is empty
        self._writer: asyncio.Task[None] | None = None
        self._serial = itertools.count(1)

    @property
    def enabled(self) -> bool:
        """True when at least one event type is on."""
        return bool(self.types)

    async def start(self) -> None:
        """Set up the events stream (history on) and start the writer. Never raises."""
        if not self.enabled:
            return
        self.records = self.records and self.bus.history_enabled  # records live in KV
        if self.bus.history_enabled:
            try:
                await self.bus.lifecycle.setup_stream(
                    self.settings.events_stream, self.settings.events_ttl
                )
            except Unavailable as exc:
                log.warning("events stream is unavailable (events stay live only): %s", exc)
        self._writer = asyncio.ensure_future(self._write())

    async def stop(self) -> None:
        """Write what is queued (at most ``publish_timeout`` s), then stop the writer."""
        if self._writer is None:
            return
        if self._queue:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.publish_timeout)
            except TimeoutError:
                log.warning("%d lifecycle event(s) not published at stop", len(self._queue))
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._writer = None

    # --- hub observers -------------------------------------------------------------
    def connected(self, member: Member) -> None:
        """A connection was registered: ``connect`` (and its record)."""
        if not self.enabled:
            return
        conn = cast("Connection", member)
        p = conn.principal
        if self.records:
            record = Record(
                conn.id, p.sub, self.node, conn.transport.name, conn.connected_at, _info(p)
            )
            self._queue.append((connection_key(self.node_id, conn.id), msgspec.json.encode(record)))
            self._wake.set()
        self._emit("connect", conn, msg_id=f"connect.{conn.id}")

    def disconnected(self, member: Member) -> None:
        """A connection is gone: ``disconnect`` with its code, reason and duration."""
        if not self.enabled:
            return
        conn = cast("Connection", member)
        code = conn.close_code if conn.close_code is not None else CLOSE_LOST
        reason = conn.close_reason or (
            "connection closed" if conn.close_code else "connection lost"
        )
        self._emit(
            "disconnect",
            conn,
            msg_id=f"disconnect.{conn.id}",
            code=code,
            reason=reason,
            duration=round(time.time() - conn.connected_at, 3),
        )
        if self.records:
            self._queue.append((connection_key(self.node_id, conn.id), None))
            self._wake.set()

    def joined(self, member: Member, channel: str) -> None:
        """``member`` subscribed to ``channel``: ``subscribe``."""
        if "subscribe" in self.types:
            conn = cast("Connection", member)
            self._emit("subscribe", conn, channel=channel)

    def left(self, member: Member, channel: str) -> None:
        """``member`` left ``channel`` (unsubscribe or disconnect): ``unsubscribe``."""
        if "unsubscribe" in self.types:
            conn = cast("Connection", member)
            self._emit("unsubscribe", conn, channel=channel)

    def emit(self, event: Event, msg_id: str) -> None:
        """Queue one event built elsewhere (``occupied``, ``vacated``, ``node_lost``)."""
        if event.type in self.types:
            self._queue.append((event.type, msgspec.json.encode(event), msg_id))
            self._wake.set()

    def _emit(
        self,
        kind: str,
        conn: Connection,
        *,
        msg_id: str | None = None,
        channel: str | None = None,
        code: int | None = None,
        reason: str | None = None,
        duration: float | None = None,
    ) -> None:
        if kind not in self.types:
            return
        p = conn.principal
        event = Event(
            type=kind,
            time=round(time.time(), 6),
            node=self.node,
            client=conn.id,
            user=p.sub,
            channel=channel,
            transport=conn.transport.name,
            info=_info(p),
            code=code,
            reason=reason,
            duration=duration,
        )
        self.emit(event, msg_id or f"{kind}.{conn.id}.{next(self._serial)}")

    # --- the writer --------------------------------------------------------------------
    async def _write(self) -> None:
        """Publish the queue in order: events, and record writes/deletes (core publishes)."""
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            try:
                if len(item) == 3:
                    kind, payload, msg_id = item  # type: ignore[misc]
                    await self.bus.lifecycle.publish(kind, payload, msg_id)
                else:
                    key, value = item  # type: ignore[misc]
                    bucket = self.settings.node_bucket
                    await self.bus.kv_post(bucket, key, value or b"", delete=value is None)
            except Unavailable:
                await asyncio.sleep(0.2)  # NATS away: keep the order, retry
                continue
            self._queue.popleft()
