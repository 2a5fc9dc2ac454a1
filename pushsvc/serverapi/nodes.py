"""The registry of live nodes: who a cluster-wide request waits for.

Every node (every worker process) keeps one entry in the JetStream KV bucket
``PUSHSVC_NODE_BUCKET`` (default ``PUSHSVC_NODES``): key ``n.<node id>``,
value ``{"node", "id", "version", "started"}``, written with a per-message TTL of
:data:`NODE_TTL` seconds (``Nats-TTL``, nats-server 2.11+) and re-written every
third of it. A clean stop deletes the entry; a node that died stops re-writing,
and its entry expires within :data:`NODE_TTL` s: from then on requests no longer
wait for it (before that, it is listed in ``missing_nodes``). The expiry leaves a
delete marker (the bucket keeps them :data:`MARKER_TTL` s), which is how the
other nodes learn that a node was lost (:mod:`pushsvc.lifecycle.lost`). The
same bucket holds the connection records of :mod:`pushsvc.lifecycle` under
``c.<node id>.<client>`` (no TTL: deleted at disconnect, or by the node that
reports a lost node's connections).

With history off (no JetStream) there is no registry: :meth:`NodeRegistry.live`
returns None and a scattered request waits its whole timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import msgspec

from .._version import __version__
from ..bus import Bus, Unavailable
from .schemas import NodeRef

log = logging.getLogger("pushsvc.serverapi")

NODE_TTL = 6.0  # s a node's entry outlives its last refresh
MARKER_TTL = 3600.0  # s the bucket keeps the marker of an expired node entry


def node_key(node_id: str) -> str:
    """Registry key of a node: ``n.<node id>``."""
    return f"n.{node_id}"


def connection_key(node_id: str, client: str) -> str:
    """Key of a connection record: ``c.<node id>.<client>``."""
    return f"c.{node_id}.{client}"


class NodeEntry(msgspec.Struct):
    """One live node's entry: name, process id, version, start time (Unix seconds)."""

    node: str
    id: str
    version: str
    started: float


class NodeRegistry:
    """This node's registry entry, and reads of every node's.

    Args:
        bus: the node's bus (KV bucket access).
        bucket: ``PUSHSVC_NODE_BUCKET``.
        node: ``PUSHSVC_NODE_NAME``.
        node_id: this process's node id.
    """

    def __init__(self, bus: Bus, bucket: str, node: str, node_id: str) -> None:
        self.bus = bus
        self.bucket = bucket
        self.entry = NodeEntry(node, node_id, __version__, time.time())
        self._value = msgspec.json.encode(self.entry)
        self._writes = itertools.count()
        self._ready = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create (or open) the bucket, write this node's entry, keep it fresh.

        Never raises: without JetStream there is no registry (logged at debug).
        """
        if not self.bus.history_enabled:
            return
        try:
            await self._open()
            await self._put()
        except Unavailable as exc:
            log.warning("node registry %s is unavailable: %s", self.bucket, exc)
        self._task = asyncio.ensure_future(self._refresh())

    async def _open(self) -> None:
        await self.bus.key_value(
            self.bucket, 0, description="pushsvc live nodes", marker_ttl=MARKER_TTL
        )
        self._ready = True

    @property
    def ready(self) -> bool:
        """The bucket is open (JetStream on)."""
        return self._ready

    async def _put(self) -> None:
        await self.bus.kv_put(
            self.bucket,
            node_key(self.entry.id),
            self._value,
            ttl=NODE_TTL,
            msg_id=f"{self.entry.id}.{next(self._writes)}.{time.time():.3f}",
        )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(NODE_TTL / 3)
            if not self.bus.is_connected:
                continue
            try:
                if not self._ready:
                    await self._open()
                await self._put()
            except Unavailable as exc:
                log.debug("node registry refresh failed: %s", exc)

    async def stop(self) -> None:
        """Stop refreshing and delete this node's entry (others stop waiting for it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._ready:
            try:
                await self.bus.kv_delete(self.bucket, node_key(self.entry.id))
            except Unavailable:
                pass  # it expires within NODE_TTL

    async def live(self, timeout: float) -> dict[str, NodeRef] | None:
        """Every live node by id (this one included), or None without a registry.

        Raises nothing: a registry that does not answer in ``timeout`` s counts as
        none (the request then waits its whole timeout).
        """
        if not self._ready:
            return None
        try:
            entries = await self.bus.kv_entries(self.bucket, "n.*", timeout=timeout)
        except Unavailable:
            return None
        nodes: dict[str, NodeRef] = {}
        for _key, value in entries:
            try:
                entry = msgspec.json.decode(value, type=NodeEntry)
            except msgspec.DecodeError:
                continue
            nodes[entry.id] = NodeRef(entry.node, entry.id)
        nodes.setdefault(self.entry.id, NodeRef(self.entry.node, self.entry.id))
        return nodes
