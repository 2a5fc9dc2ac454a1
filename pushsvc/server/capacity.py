"""Open-file capacity of a server process: soft limit raised, connections counted, a margin kept.

Every connection is a file descriptor, and a process has at most its soft
``RLIMIT_NOFILE`` of them (getrlimit(2)). What happens at that limit without
this module (measured, docs/capacity.md "At the open-file limit"): uvloop's listener
(libuv) gets ``EMFILE`` from ``accept()`` and, to keep the listen backlog from
stalling, accepts each waiting connection on a spare descriptor and closes it at
once (libuv ``uv__emfile_trick``): clients see the TCP connection reset before
any HTTP answer, and nothing is logged. asyncio's own loop logs "socket.accept()
out of system resource" and stops accepting for a second.

So ``pushsvc serve``:

1. raises the soft limit to the hard one at start (:func:`raise_nofile_limit`;
   its worker processes inherit it);
2. each worker measures what it holds once started (:meth:`FdBudget.measure`:
   the listening socket, NATS, the event loop's descriptors...) and logs its
   capacity: the connections it can hold with :data:`reserve` descriptors to
   spare;
3. a WebSocket handshake that arrives while the worker already holds that many
   connections is refused ``503`` with ``Retry-After`` (pushsvc.ws.endpoint,
   reason ``capacity``), like ``PUSHSVC_MAX_CONNECTIONS``: the spare
   descriptors are what the refusals themselves, plain HTTP requests and NATS
   reconnects use. Only a burst of more simultaneous new connections than the
   margin can still meet the limit (then as above: reset, the client retries).

Connections are counted with uvicorn's own set of live connection protocols
(``server_state.connections``: one entry per TCP connection, HTTP or WebSocket),
handed over by :class:`pushsvc.server.httpprotocol.HttpToolsProtocol` on the
first connection (:meth:`FdBudget.watch`): a ``len()`` per handshake, no
``/proc`` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections import deque
from collections.abc import Sized
from operator import methodcaller
from typing import Any

from ..core.deadlines import Deadlines, deadlines

RESERVE_MIN = 32  # descriptors kept spare, at least
RESERVE_FRACTION = 0.01  # ... or this share of the limit, whichever is more
_INFINITY_TARGET = 1 << 20  # soft limit asked for when the hard one is unlimited (Linux nr_open)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (setrlimit(2)).

    An unprivileged process may raise its soft limit up to the hard one; the hard
    one is the administrator's (systemd ``LimitNOFILE=``, ``ulimit -Hn``,
    Kubernetes: the container runtime's). An unlimited hard limit gets 2**20.

    Returns:
        ``(before, after)``: the soft limit before and after (equal when it was
        already at the hard limit or the raise was refused).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _INFINITY_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds() -> int | None:
    """Descriptors this process has open now (``/proc/self/fd``), None where unknown."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the directory listing's own
    except OSError:
        return None


class FdBudget:
    """The connections one process can hold within its open-file limit.

    Attributes:
        limit: the soft ``RLIMIT_NOFILE`` (descriptors).
        baseline: descriptors held that are not connections (measured by
            :meth:`measure`; 0 before).
        reserve: descriptors kept spare: ``max(RESERVE_MIN, RESERVE_FRACTION * limit)``.
        capacity: connections this process accepts: ``limit - baseline - reserve``.
    """

    def __init__(self) -> None:
        self.limit = 0
        self.reserve = 0
        self.baseline = 0
        self.capacity = 0
        self._sets: list[Sized] = []  # the connection sets of every server in this process
        self._last: Sized | None = None
        self._read_limit()

    def _read_limit(self) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = _INFINITY_TARGET if soft == resource.RLIM_INFINITY else int(soft)
        self.reserve = max(RESERVE_MIN, int(self.limit * RESERVE_FRACTION))
        self.capacity = max(0, self.limit - self.baseline - self.reserve)

    def measure(self) -> int:
        """Read the limit, count what the process holds now as its baseline, and
        recompute :attr:`capacity`.

        Call once the process has started (NATS connected, listening), before it
        serves connections; again after changing the limit. Returns :attr:`capacity`.
        """
        held = open_fds()
        if held is not None:
            self.baseline = max(0, held - self.connections)
        self._read_limit()
        return self.capacity

    def watch(self, connections: Sized) -> None:
        """Count ``connections`` (a uvicorn server's set of live connection protocols)
        from now on; called for every new connection, so repeating it is cheap."""
        if connections is self._last:
            return
        self._last = connections
        if not any(known is connections for known in self._sets):
            self._sets.append(connections)

    @property
    def connections(self) -> int:
        """Connections open now (HTTP and WebSocket, of every server, the one asking included)."""
        return sum(map(len, self._sets))

    def full(self) -> bool:
        """True when a connection beyond :attr:`capacity` is asking (the caller refuses it)."""
        return self.connections > self.capacity


_budget: FdBudget | None = None


def fd_budget() -> FdBudget:
    """This process's :class:`FdBudget` (one per process: the limit is per process)."""
    global _budget
    if _budget is None:
        _budget = FdBudget()
    return _budget


HANDSHAKES_IN_FLIGHT = 256  # connections between accept and an authenticated client, per process
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may hold a gate slot (request headers, auth)
_EXPIRED = methodcaller("gate_expired")  # what the deadline calls on a connection


class HandshakeGate:
    """At most :attr:`limit` connections of this process between TCP accept and the
    end of their handshake; the next ones wait, reading paused, in arrival order.

    A WebSocket's handshake ends when its client is authenticated (the auth frame
    included) or the connection is gone; a plain HTTP connection's when its first
    request's headers are in. Without the gate, a reconnect storm of a whole node
    (tens of thousands of connections in a second) gets every connection accepted
    and answered ``101`` at once, and the auth frames then wait behind the other
    handshakes for longer than ``PUSHSVC_AUTH_TIMEOUT``: closes 4001 by the
    thousand (docs/capacity.md, "Connect rate"). With it, the handshakes in
    flight finish in a fraction of a second each, the waiting connections cost
    only their descriptor, and the storm completes at the CPU's pace.

    A slot is held at most :data:`HANDSHAKE_TIMEOUT` seconds: then the
    connection's ``gate_expired()`` runs (the HTTP protocol closes a connection
    whose request headers are still not in, as nginx's ``client_header_timeout``
    and Go's ``ReadHeaderTimeout`` do; a WebSocket waiting for its auth frame
    only gives the slot back: ``PUSHSVC_AUTH_TIMEOUT`` closes it), so silent
    peers cannot keep the gate shut.

    Args:
        limit: handshakes in flight; default :data:`HANDSHAKES_IN_FLIGHT`.
    """

    def __init__(self, limit: int = HANDSHAKES_IN_FLIGHT) -> None:
        self.limit = limit
        self.active = 0
        self._waiting: deque[Any] = deque()  # connections paused until a slot frees

    @property
    def waiting(self) -> int:
        """Connections waiting for a slot (reading paused)."""
        return len(self._waiting)

    def enter(self, conn: Any) -> None:
        """A new connection (a protocol with ``transport``, ``gate_held`` and
        ``gate_admitted()``): it takes a slot (``gate_held`` True) or waits with
        reading paused until one frees (``gate_waiting`` True meanwhile).

        Called from ``connection_made``, where uvloop's ``pause_reading()`` does not
        hold (it starts reading after ``connection_made`` returns): a waiting
        protocol keeps what it receives unread until :meth:`release` admits it
        (:meth:`HttpToolsProtocol.data_received
        <pushsvc.server.httpprotocol.HttpToolsProtocol.data_received>`).
        """
        if self.active < self.limit and not self._waiting:
            self._grant(conn)
            return
        conn.gate_waiting = True
        conn.transport.pause_reading()
        self._waiting.append(conn)

    def release(self, conn: Any) -> None:
        """``conn``'s handshake is over (or it is gone): its slot goes to the oldest
        waiting connection still open. Nothing happens if it holds no slot."""
        if not conn.gate_held:
            return
        conn.gate_held = False
        self.active -= 1
        self._timers().clear(conn)
        waiting = self._waiting
        while waiting and self.active < self.limit:
            nxt = waiting.popleft()
            nxt.gate_waiting = False
            if nxt.transport.is_closing():
                continue
            self._grant(nxt)
            nxt.gate_admitted()

    def hand_over(self, old: Any, new: Any) -> None:
        """The slot of ``old`` (an HTTP protocol) goes to ``new`` (the WebSocket
        protocol of the same connection), with its deadline."""
        if not old.gate_held:
            return
        old.gate_held = False
        new.gate_held = True
        timers = self._timers()
        timers.clear(old)
        timers.set(new, HANDSHAKE_TIMEOUT)

    def _grant(self, conn: Any) -> None:
        self.active += 1
        conn.gate_held = True
        self._timers().set(conn, HANDSHAKE_TIMEOUT)

    def _timers(self) -> Deadlines:
        return deadlines(asyncio.get_running_loop(), "handshake", _EXPIRED)


_gate: HandshakeGate | None = None


def handshake_gate() -> HandshakeGate:
    """This process's :class:`HandshakeGate`."""
    global _gate
    if _gate is None:
        _gate = HandshakeGate()
    return _gate
