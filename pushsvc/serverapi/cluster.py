"""The cluster-wide server API: one request in, every node acts, one answer out.

Subjects (``<prefix>`` = ``PUSHSVC_SUBJECT_PREFIX``):

- ``<prefix>-api.<op>``: what backends call (NATS request/reply). Every node
  serves it in the queue group ``pushsvc-api``, so exactly one node receives
  each request (NATS docs, "Queue Groups"), as ``POST /api/<op>`` does for HTTP;
- ``<prefix>-api-nodes.<op>``: the receiving node scatters the request there;
  every node (every worker process) answers for its own connections
  (:class:`~pushsvc.serverapi.local.LocalOps`) with a
  :class:`~pushsvc.serverapi.schemas.NodeReply`.

The receiving node waits for the live nodes of the registry
(:class:`~pushsvc.serverapi.nodes.NodeRegistry`) for at most
``PUSHSVC_API_TIMEOUT`` seconds, then sums the answers; live nodes that did not
answer are listed in ``missing_nodes``. ``presence`` and ``presence_stats`` read
the presence bucket (already cluster-wide) and are not scattered.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from ..bus import ERROR_HEADER, Bus, Reply, Request, Responder, Unavailable
from ..channels import InvalidChannel, validate_grant
from ..config.settings import Settings
from ..core.presence import PresenceRefused, PresenceRegistry
from ..protocol import BAD_REQUEST, INVALID_CHANNEL, UNAVAILABLE
from .local import LocalOps
from .nodes import NodeRegistry
from .schemas import (
    OPS,
    ApiError,
    ChannelEntry,
    ChannelRequest,
    ChannelsReply,
    ChannelsRequest,
    ConnectionsReply,
    Counted,
    Disconnected,
    ErrorBody,
    InfoReply,
    NodeChannels,
    NodeConnections,
    NodeInfo,
    NodeRef,
    NodeReply,
    PresenceReply,
    PresenceStatsReply,
    SubscribedCount,
    UnsubscribedCount,
    UserRequest,
    decode_request,
)

log = logging.getLogger("pushsvc.serverapi")

QUEUE = "pushsvc-api"  # the queue group serving <prefix>-api.*


class ServerAPI:
    """The server API of one node: NATS responders, scatter, aggregation.

    Args:
        settings: ``subject_prefix``, ``api_timeout`` (s), ``node_bucket``,
            ``presence_limit``.
        bus: the node's bus (request/reply, the node registry's bucket).
        local: this node's operations on its own connections.
        presence: the node's presence registry (``presence``, ``presence_stats``).
    """

    def __init__(
        self, settings: Settings, bus: Bus, local: LocalOps, presence: PresenceRegistry
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.local = local
        self.presence = presence
        prefix = settings.subject_prefix
        self.subject = f"{prefix}-api"
        self.nodes_subject = f"{prefix}-api-nodes"
        self.registry = NodeRegistry(bus, settings.node_bucket, local.node, local.node_id)
        self._responders: list[Responder] = []

    async def start(self) -> None:
        """Serve both subjects, then join the node registry.

        Raises:
            Unavailable: NATS refused the subscriptions.
        """
        requests = self.bus.requests
        self._responders = [
            await requests.serve(f"{self.nodes_subject}.*", self._on_node),
            await requests.serve(f"{self.subject}.*", self._on_request, queue=QUEUE),
        ]
        await self.registry.start()

    async def stop(self) -> None:
        """Leave the registry, stop answering (requests being answered finish)."""
        await self.registry.stop()
        for responder in self._responders:
            await responder.stop()
        self._responders = []

    # --- NATS ----------------------------------------------------------------------------
    async def _on_request(self, request: Request) -> Reply:
        """A backend's request on ``<prefix>-api.<op>``: the same answer as HTTP's,
        errors with header ``Pushsvc-Error: <code>``."""
        op = request.subject.rsplit(".", 1)[-1]
        try:
            return Reply(await self.call(op, request.data))
        except ApiError as exc:
            return Reply(exc.body(), {ERROR_HEADER: exc.code})

    async def _on_node(self, request: Request) -> Reply:
        """A scattered request: act on this node's connections, answer a NodeReply."""
        op = request.subject.rsplit(".", 1)[-1]
        reply = NodeReply(self.local.node, self.local.node_id)
        try:
            result = await self._local(op, decode_request(op, request.data))
            reply.result = msgspec.Raw(msgspec.json.encode(result))
        except ApiError as exc:
            reply.error = ErrorBody(exc.code, str(exc))
        return Reply(msgspec.json.encode(reply))

    async def _local(self, op: str, req: Any) -> msgspec.Struct:
        local = self.local
        if op == "disconnect":
            return local.disconnect(req)
        if op == "subscribe":
            return await local.subscribe(req)
        if op == "unsubscribe":
            return local.unsubscribe(req)
        if op == "channels":
            return local.channels(req)
        if op == "info":
            return local.info()
        if op == "connections":
            return local.connections(req)
        raise ApiError(BAD_REQUEST, f"{op} is not a per-node operation")

    # --- one call, whatever the way in -----------------------------------------------------
    async def call(self, op: str, body: bytes) -> bytes:
        """Run ``op`` with the JSON ``body`` on the whole cluster; the JSON answer.

        Raises:
            ApiError: unknown op (``not_found``), bad body (``bad_request``), bad
                channel (``invalid_channel``), NATS away (``unavailable``).
        """
        req = decode_request(op, body)
        if not OPS[op].scattered:
            return msgspec.json.encode(await self._presence(op, req))  # type: ignore[arg-type]
        if isinstance(req, ChannelsRequest) and req.pattern:
            try:
                validate_grant(req.pattern)
            except InvalidChannel as exc:
                raise ApiError(INVALID_CHANNEL, str(exc)) from None
        results, missing = await self._scatter(op, body)
        return msgspec.json.encode(_aggregate(op, req, results, missing))

    async def _scatter(self, op: str, body: bytes) -> tuple[list[NodeReply], list[NodeRef]]:
        """Ask every node; the replies and the live nodes that did not answer."""
        timeout = self.settings.api_timeout
        live = await self.registry.live(timeout / 2)
        try:
            raw = await self.bus.requests.scatter(
                f"{self.nodes_subject}.{op}",
                body or b"{}",
                timeout=timeout,
                expected=None if live is None else len(live),
            )
        except Unavailable as exc:
            raise ApiError(UNAVAILABLE, str(exc), exc.retry_after) from None
        replies: dict[str, NodeReply] = {}
        for reply in raw:
            try:
                node = msgspec.json.decode(reply.data, type=NodeReply)
            except msgspec.DecodeError:
                log.warning("ignored a malformed node reply to %s", op)
                continue
            if node.error is not None:
                log.warning("node %s/%s refused %s: %s", node.node, node.id, op, node.error)
                continue
            replies[node.id] = node
        missing = [ref for key, ref in sorted((live or {}).items()) if key not in replies]
        return list(replies.values()), missing

    async def _presence(self, op: str, req: ChannelRequest) -> msgspec.Struct:
        stats = op == "presence_stats"
        limit = 0 if stats else self.settings.presence_limit
        try:
            snap = await self.presence.read_for(None, req.channel, limit)
        except PresenceRefused as exc:
            raise ApiError(exc.code, str(exc), exc.retry_after) from None
        if stats:
            return PresenceStatsReply(req.channel, snap.clients_total, snap.users)
        return PresenceReply(
            req.channel,
            snap.clients,
            snap.users,
            snap.clients_total,
            True if snap.truncated else None,
        )


def _aggregate(op: str, req: Any, nodes: list[NodeReply], missing: list[NodeRef]) -> Any:
    """One answer from every node's part."""

    def parts(kind: type[Any]) -> list[Any]:
        return [msgspec.json.decode(n.result, type=kind) for n in nodes if len(n.result)]

    if op in ("disconnect", "subscribe", "unsubscribe"):
        total = sum(c.count for c in parts(Counted))
        reply = {"disconnect": Disconnected, "subscribe": SubscribedCount}
        return reply.get(op, UnsubscribedCount)(total, missing)
    if op == "channels":
        usage: dict[str, tuple[int, set[str]]] = {}
        for part in parts(NodeChannels):
            for channel, use in part.channels.items():
                clients, users = usage.get(channel, (0, set()))
                usage[channel] = (clients + use.clients, users | set(use.users))
        entries = [ChannelEntry(ch, n, len(u)) for ch, (n, u) in sorted(usage.items())]
        return ChannelsReply(entries, missing)
    if op == "info":
        infos = sorted(parts(NodeInfo), key=lambda i: (i.node, i.id))
        return InfoReply(infos, missing)
    assert isinstance(req, UserRequest)
    conns = [c for part in parts(NodeConnections) for c in part.connections]
    conns.sort(key=lambda c: c.connected_at)
    return ConnectionsReply(req.user, conns, missing)
