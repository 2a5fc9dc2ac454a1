"""Node-addressed requests: reach the process that holds a connection, over NATS.

Every pushsvc process subscribes to ``<prefix>-node.<node id>.<op>`` (core NATS
request/reply, NATS docs "Request-Reply"), where the node id is random per
process. A connection is addressed by ``<node id>.<secret>``: any node that gets
a request for it (``POST /sse/commands``) answers it locally or sends it to the
owning process, so no sticky sessions are needed behind a load balancer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .connection import Connection
from .errors import Unavailable

log = logging.getLogger("pushsvc.bus")

#: a request handler: request body -> reply body
RequestHandler = Callable[[bytes], Awaitable[bytes]]


class NoResponder(Exception):
    """No process answers for that node id (it is gone)."""


class NodeRequests:
    """This process's node-addressed request subjects, and requests to other processes.

    Args:
        conn: the node's shared connection.
        node_id: this process's random id (``[a-z0-9]`` only, a NATS subject token).
    """

    def __init__(self, conn: Connection, node_id: str) -> None:
        self.conn = conn
        self.node_id = node_id
        self._subs: list[Subscription] = []

    def subject(self, node_id: str, op: str) -> str:
        """``<prefix>-node.<node_id>.<op>``."""
        return f"{self.conn.prefix}-node.{node_id}.{op}"

    async def serve(self, op: str, handler: RequestHandler) -> None:
        """Answer requests for ``op`` addressed to this process with ``handler``.

        Raises:
            Unavailable: NATS is not connected.
        """
        nc = self.conn.nc
        if nc is None:
            raise Unavailable("NATS is not connected")

        async def cb(msg: Msg) -> None:
            try:
                reply = await handler(msg.data)
            except Exception:
                log.exception("node request %s failed", op)
                reply = b'{"status":500}'
            if msg.reply:
                try:
                    await msg.respond(reply)
                except nats.errors.Error:
                    pass  # the requester is gone or NATS dropped: it times out

        self._subs.append(await nc.subscribe(self.subject(self.node_id, op), cb=cb))

    async def request(self, node_id: str, op: str, body: bytes, timeout: float) -> bytes:
        """Send ``body`` to process ``node_id``'s ``op``; its reply body.

        Raises:
            NoResponder: no process has that id (NATS "no responders").
            Unavailable: NATS is not connected or the reply did not come within
                ``timeout`` seconds.
        """
        nc = self.conn.nc
        if nc is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            msg = await nc.request(self.subject(node_id, op), body, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoResponder(node_id) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"node {node_id} did not answer ({type(exc).__name__})") from None
        return msg.data
