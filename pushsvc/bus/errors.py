"""The bus's errors: what callers of :class:`~pushsvc.bus.Bus` catch.

:class:`Unavailable` is the one error every bus operation raises when NATS or
JetStream cannot serve it; the HTTP and WebSocket layers turn it into a 503 or an
``unavailable`` error frame with ``retry_after`` (docs/protocol.md).
"""

from __future__ import annotations


class Unavailable(Exception):
    """NATS (or JetStream) cannot take or serve the request right now.

    Attributes:
        retry_after: seconds a client should wait before retrying.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamConfigError(Unavailable):
    """The history stream exists with settings that cannot be changed in place.

    Examples: another storage type, subjects overlapping another stream. Raised at
    start (the node does not start) with a message naming the stream and the reason.
    """


class NoJetStream(Exception):
    """Nothing answers the JetStream API: JetStream is not enabled on this NATS.

    Internal to the bus: start turns it into "history is off (live only)".
    """
