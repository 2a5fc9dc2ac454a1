"""Cluster-wide ``occupied`` / ``vacated``: the first subscriber anywhere, the last one gone.

Each channel with subscribers somewhere has one entry in the node bucket,
``o.<channel>``: the JSON list of the node ids holding local subscribers. A node
whose first local subscriber joins adds its id, a node whose last one leaves
removes it; both by compare-and-set (:meth:`Bus.kv_update
<pushsvc.bus.kv.KeyValueStore.update>`), so of all nodes changing the entry at
once exactly one sees it go from empty to non-empty (and publishes ``occupied``)
or back (``vacated``), with ``Nats-Msg-Id`` = ``<type>.<channel>.<entry seq>``.
A node that died is removed from every entry by the node reporting its loss
(:mod:`pushsvc.lifecycle.lost`), which publishes the ``vacated`` it owes.

Per channel, this node's changes run one at a time and each makes the entry
match the node's current local count (a subscribe and an unsubscribe in quick
succession settle to the right state). Wildcard subscriptions are not channels:
they get no occupancy (as presence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from ..bus import Bus, Unavailable
from ..channels import is_pattern
from ..core.member import Member
from .events import Event, LifecycleEvents

log = logging.getLogger("pushsvc.lifecycle")


def occupancy_key(channel: str) -> str:
    """Node-bucket key of a channel's occupancy: ``o.<channel>``."""
    return f"o.{channel}"


def _ids(value: bytes | None) -> list[str]:
    if not value:
        return []
    try:
        return list(msgspec.json.decode(value, type=list[str]))
    except msgspec.DecodeError:
        return []


async def remove_node(
    bus: Bus, bucket: str, events: LifecycleEvents, channel: str, node_id: str, node: str
) -> None:
    """Take ``node_id`` out of ``channel``'s occupancy; ``vacated`` when it was the last.

    Raises:
        Unavailable: the bucket did not take the change.
    """

    def change(value: bytes | None) -> bytes | None:
        ids = [i for i in _ids(value) if i != node_id]
        return msgspec.json.encode(sorted(ids)) if ids else None

    before, after = await bus.kv_update(bucket, occupancy_key(channel), change)
    if before is not None and after is None and node_id in _ids(before):
        event = Event(type="vacated", time=round(time.time(), 6), node=node, channel=channel)
        events.emit(event, f"vacated.{channel}.{node_id}.{time.time_ns()}")


class Occupancy:
    """This node's part in every channel's cluster-wide occupancy.

    Args:
        bus: the node's bus (the node bucket).
        bucket: ``PUSHSVC_NODE_BUCKET``.
        events: where ``occupied``/``vacated`` are published.
        node_id: this node's id.
    """

    def __init__(self, bus: Bus, bucket: str, events: LifecycleEvents, node_id: str) -> None:
        self.bus = bus
        self.bucket = bucket
        self.events = events
        self.node_id = node_id
        self.enabled = bool({"occupied", "vacated"} & events.types)
        self._local: dict[str, int] = {}  # channel -> local subscribers
        self._locks: dict[str, list[Any]] = {}  # channel -> [Lock, users]
        self._tasks: set[asyncio.Task[None]] = set()

    def joined(self, member: Member, channel: str) -> None:
        """Hub observer: one more local subscriber of ``channel``."""
        if not self.enabled or is_pattern(channel):
            return
        count = self._local.get(channel, 0) + 1
        self._local[channel] = count
        if count == 1:
            self._spawn(self._sync(channel))

    def left(self, member: Member, channel: str) -> None:
        """Hub observer: one local subscriber fewer."""
        if not self.enabled or channel not in self._local:
            return
        count = self._local[channel] - 1
        if count > 0:
            self._local[channel] = count
            return
        del self._local[channel]
        self._spawn(self._sync(channel))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, channel: str) -> None:
        """Make ``o.<channel>`` hold this node's id exactly while it has local subscribers."""
        entry = self._locks.setdefault(channel, [asyncio.Lock(), 0])
        entry[1] += 1  # syncs of this channel running or waiting
        try:
            async with entry[0]:
                await self._apply(channel)
        except Unavailable as exc:
            log.warning("occupancy of %s not updated: %s", channel, exc)
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._locks.pop(channel, None)

    async def _apply(self, channel: str) -> None:
        node = self.events.node
        if channel not in self._local:
            await remove_node(self.bus, self.bucket, self.events, channel, self.node_id, node)
            return

        def change(value: bytes | None) -> bytes | None:
            ids = _ids(value)
            if self.node_id in ids:
                return value
            return msgspec.json.encode(sorted([*ids, self.node_id]))

        before, after = await self.bus.kv_update(self.bucket, occupancy_key(channel), change)
        if not _ids(before) and after is not None:
            event = Event(type="occupied", time=round(time.time(), 6), node=node, channel=channel)
            self.events.emit(event, f"occupied.{channel}.{self.node_id}.{time.time_ns()}")

    async def stop(self) -> None:
        """Wait for the pending changes (after the hub closed every connection, each
        channel was left: ``vacated`` where this node was the last)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
