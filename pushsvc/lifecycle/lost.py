"""A node that died: its connections' ``disconnect`` (reason ``node_lost``) and ``vacated``.

A node's registry entry (``n.<node id>`` in the node bucket,
:mod:`pushsvc.serverapi.nodes`) expires :data:`~pushsvc.serverapi.nodes.NODE_TTL`
seconds after its last refresh and leaves an expiry marker. Every node fetches
those markers from one durable consumer (:meth:`LifecycleBus.expiries
<pushsvc.bus.lifecycle.LifecycleBus.expiries>`), so each marker reaches one
surviving node, which then:

1. reads the lost node's connection records (``c.<node id>.*``) and publishes one
   ``disconnect`` per connection, ``code`` 1006, ``reason`` ``node_lost``, with
   ``Nats-Msg-Id: disconnect.<client>`` (the id the lost node would have used: a
   connection is reported once in the events stream even if its node was only cut
   off and reports it too), then deletes the records;
2. removes the lost node from every channel's occupancy, publishing ``vacated``
   for channels it was the last node of.

The marker is acknowledged only then; a survivor dying meanwhile leaves it to
another after ``ack_wait``. The bound: the entry's TTL (6 s after its last
refresh, at most 2 s before the crash) plus the server's expiry check and one
fetch: within about 7 s of the crash.
"""

from __future__ import annotations

import logging
import time

import msgspec

from ..bus import Bus, Unavailable
from ..serverapi.nodes import connection_key
from .events import CLOSE_LOST, Event, LifecycleEvents, Record
from .occupancy import _ids, remove_node

log = logging.getLogger("pushsvc.lifecycle")

DURABLE = "pushsvc-node-lost"  # the shared consumer of node-entry expiries
NODE_LOST = "node_lost"


class NodeLost:
    """Reports the connections and channels of nodes that died.

    Args:
        bus: the node's bus.
        bucket: ``PUSHSVC_NODE_BUCKET``.
        events: where the events are published.
        node_id: this node's id (its own entry's expiry is not a loss to report).
    """

    def __init__(self, bus: Bus, bucket: str, events: LifecycleEvents, node_id: str) -> None:
        self.bus = bus
        self.bucket = bucket
        self.events = events
        self.node_id = node_id

    async def start(self) -> None:
        """Take part in the shared consumer (history on, ``disconnect`` or ``vacated``
        on). Never raises: without it, losses are not reported (logged)."""
        wanted = {"disconnect", "vacated"} & self.events.types
        if not wanted or not self.bus.history_enabled:
            return
        try:
            await self.bus.lifecycle.expiries(self.bucket, "n.*", DURABLE, self.lost)
        except Unavailable as exc:
            log.warning("lost nodes will not be reported: %s", exc)

    async def lost(self, key: str) -> None:
        """The registry entry ``key`` (``n.<node id>``) expired: report that node.

        Raises:
            Unavailable: the bucket could not be read or changed (the marker is
                then handled again, by this node or another).
        """
        node_id = key.removeprefix("n.")
        if node_id == self.node_id:
            return  # this node was cut off from NATS for a while: it is alive
        timeout = self.bus.settings.publish_timeout * 2
        records = await self.bus.kv_entries(self.bucket, f"c.{node_id}.*", timeout=timeout)
        now = time.time()
        node = ""
        for _key, value in records:
            try:
                record = msgspec.json.decode(value, type=Record)
            except msgspec.DecodeError:
                continue
            node = record.node
            event = Event(
                type="disconnect",
                time=round(now, 6),
                node=record.node,
                client=record.client,
                user=record.user,
                transport=record.transport,
                info=record.info,
                code=CLOSE_LOST,
                reason=NODE_LOST,
                duration=round(now - record.connected_at, 3),
            )
            self.events.emit(event, f"disconnect.{record.client}")
            await self.bus.kv_post(
                self.bucket, connection_key(node_id, record.client), b"", delete=True
            )
        if {"vacated", "occupied"} & self.events.types:
            occupied = await self.bus.kv_entries(self.bucket, "o.>", timeout=timeout)
            for okey, value in occupied:
                if node_id in _ids(value):
                    channel = okey.removeprefix("o.")
                    await remove_node(self.bus, self.bucket, self.events, channel, node_id, node)
        log.warning("node %s lost: reported %d connection(s)", node or node_id, len(records))
