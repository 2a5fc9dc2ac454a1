"""Stream sessions: ``POST /sse/commands`` reaches an SSE / HTTP-streaming connection.

A stream is one-way, so its client sends commands in ``POST /sse/commands``
(``{"session": S, "commands": [...]}``, the same command objects as WebSocket
frames); the answers arrive on the stream, matched by ``id``. ``S`` is the
secret of ``welcome.session``: ``<node id>.<random>``, never the public client id.
Any node takes the POST: a session of another process is reached over NATS
(:class:`~pushsvc.bus.nodes.NodeRequests`), so no sticky sessions are needed.
Commands of one session are applied in the order the POSTs reach the owning node
(one lock per session, FIFO).
"""

from __future__ import annotations

import asyncio
import re
import secrets

import msgspec

from ..bus import Unavailable
from ..bus.nodes import NodeRequests, NoResponder
from ..core.client import Client

OP = "commands"
_NODE_ID = re.compile(r"[0-9a-f]{6}")  # Hub.node_id: 3 random bytes as hex
REQUEST_TIMEOUT = 5.0  # seconds for the owning node to take a POST's commands


class CommandBatch(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /sse/commands``: the stream's ``session`` (``welcome.session``)
    and command objects as on WebSocket (docs/protocol.md, "Commands")."""

    session: str
    commands: list[msgspec.Raw]


class Taken(msgspec.Struct):
    """The owning node's answer: 202 taken, 404 unknown or closed session."""

    status: int


class StreamSessions:
    """This process's stream sessions by secret, and the command relay between processes.

    Args:
        node_id: this process's id (the hub's: hex, a NATS subject token).

    Attributes:
        requests: node-addressed NATS requests (None before the bus starts: local only).
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._clients: dict[str, Client] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.requests: NodeRequests | None = None

    def new_secret(self) -> str:
        """A session secret: ``<node id>.<random>`` (128 random bits)."""
        return f"{self.node_id}.{secrets.token_urlsafe(16)}"

    def add(self, secret: str, client: Client) -> None:
        """Make ``client`` reachable as ``secret``."""
        self._clients[secret] = client
        self._locks[secret] = asyncio.Lock()

    def remove(self, secret: str) -> None:
        """Forget ``secret`` (the stream ended)."""
        self._clients.pop(secret, None)
        self._locks.pop(secret, None)

    async def apply(self, body: bytes) -> int:
        """Apply a ``POST /sse/commands`` body; the HTTP status (202, 404, 503).

        Raises:
            msgspec.DecodeError: a malformed body (the route answers 400).
        """
        batch = msgspec.json.decode(body, type=CommandBatch)
        node, _, _ = batch.session.partition(".")
        if not _NODE_ID.fullmatch(node):
            return 404  # not a session this cluster made (and not a NATS subject token)
        if node == self.node_id or self.requests is None:
            return await self._local(batch)
        try:
            reply = await self.requests.request(node, OP, body, REQUEST_TIMEOUT)
        except NoResponder:
            return 404
        except Unavailable:
            return 503
        return msgspec.json.decode(reply, type=Taken).status

    async def serve_remote(self, body: bytes) -> bytes:
        """The NATS handler: a batch relayed by another node."""
        try:
            status = await self._local(msgspec.json.decode(body, type=CommandBatch))
        except msgspec.DecodeError:
            status = 400
        return msgspec.json.encode(Taken(status))

    async def _local(self, batch: CommandBatch) -> int:
        client = self._clients.get(batch.session)
        lock = self._locks.get(batch.session)
        if client is None or lock is None or client.closed:
            return 404
        async with lock:
            for raw in batch.commands:
                if client.closed:
                    break
                await client.handle_text(bytes(raw).decode())
        return 202
