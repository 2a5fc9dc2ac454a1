"""Admission: who may open a connection, whatever the transport (one rule, one place).

Checks, in order (OWASP WebSocket Security Cheat Sheet), for ``GET /ws``,
``GET /sse`` and ``POST /stream`` alike:

1. a present ``Origin`` against ``PUSHSVC_ALLOWED_ORIGINS`` (exact match) -> 403
   (no ``Origin`` header: a non-browser client, checked by its token only);
2. draining -> 503 (``Retry-After``);
3. ``PUSHSVC_MAX_CONNECTIONS`` connections on the node, every transport's
   together, *including* WebSockets still waiting for their auth frame, or the
   process's open-file capacity reached (``at_capacity``,
   :mod:`pushsvc.server.capacity`) -> 503 (``Retry-After``);
4. after the token: ``PUSHSVC_MAX_CONNECTIONS_PER_USER`` -> 429 (WebSocket auth
   frame: close 4008). A slot is reserved from the check until the client
   registers with the hub, so parallel handshakes of one user cannot overshoot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config.settings import Settings
from .hub import Hub

RETRY_AFTER = 5  # seconds, in Retry-After of 503 answers (RFC 9110 10.2.3)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection refused before it opened.

    Attributes:
        status: the HTTP status (403, 429, 503).
        reason: client-safe text for the body (never a token).
        label: the ``pushsvc_handshakes_rejected_total`` reason label.
        retry: seconds for ``Retry-After``, or None.
    """

    status: int
    reason: str
    label: str
    retry: int | None = None


ORIGIN_REFUSED = Refusal(403, "origin not allowed", "origin")
DRAINING = Refusal(503, "server is draining", "draining", RETRY_AFTER)
AT_CAPACITY = Refusal(503, "connection limit reached", "capacity", RETRY_AFTER)
USER_LIMIT = Refusal(429, "too many connections", "user_limit")


def _never() -> bool:
    return False


def normalise_origin(origin: str) -> str:
    """An allowlist entry as browsers serialise an Origin (RFC 6454 6.2).

    Scheme and host are lower case and there is no trailing ``/``; the port stays
    (a non-default port is part of the origin). Incoming ``Origin`` headers are
    compared to these entries byte for byte.
    """
    return origin.strip().rstrip("/").lower()


class Admission:
    """The node's connection caps and origin allowlist, shared by every transport.

    Args:
        settings: ``allowed_origins``, ``max_connections``, ``max_connections_per_user``.
        hub: counts the users' registered connections.
        accepting: returns False while the node drains.
        at_capacity: returns True when the process holds every connection its
            open-file limit allows (:meth:`pushsvc.server.capacity.FdBudget.full`);
            None: no such limit is checked.

    Attributes:
        open_connections: connections between admission and close, every
            transport, authenticated or not (the global cap).
    """

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        accepting: Callable[[], bool],
        at_capacity: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.accepting = accepting
        self.at_capacity = at_capacity or _never
        self.allowed_origins = frozenset(normalise_origin(o) for o in settings.allowed_origins)
        self.open_connections = 0
        self._reserved: dict[str, int] = {}  # per user: admitted, not yet registered

    def origin_allowed(self, origin: str | None) -> bool:
        """True when ``origin`` may connect (no allowlist, no header, or listed).

        Browsers always send ``Origin`` on a WebSocket handshake (RFC 6455 4.1, Fetch)
        and on a cross-origin fetch/EventSource, so a missing header means a
        non-browser client, which cross-site hijacking cannot involve: it is accepted
        (its token is still required), as NATS's same_origin and gorilla/websocket
        do. A present Origin not in the list, ``null`` included, is not.
        """
        return not self.allowed_origins or origin is None or origin in self.allowed_origins

    def check(self, origin: str | None) -> Refusal | None:
        """Checks 1-3 of the module docstring; None when the connection may open."""
        if not self.origin_allowed(origin):
            return ORIGIN_REFUSED
        if not self.accepting():
            return DRAINING
        if self.open_connections >= self.settings.max_connections or self.at_capacity():
            return AT_CAPACITY
        return None

    def opened(self) -> None:
        """Count one more open connection (after :meth:`check` passed)."""
        self.open_connections += 1

    def closed(self) -> None:
        """Count one connection less."""
        self.open_connections -= 1

    def reserve(self, sub: str) -> bool:
        """Hold one of ``sub``'s ``max_connections_per_user`` slots; False when full.

        Registered clients and admissions in flight both count.
        """
        held = self.hub.user_connections(sub) + self._reserved.get(sub, 0)
        if held >= self.settings.max_connections_per_user:
            return False
        self._reserved[sub] = self._reserved.get(sub, 0) + 1
        return True

    def release(self, sub: str) -> None:
        """Give back a slot of :meth:`reserve` (the client registered, or never will)."""
        left = self._reserved.get(sub, 0) - 1
        if left > 0:
            self._reserved[sub] = left
        else:
            self._reserved.pop(sub, None)
