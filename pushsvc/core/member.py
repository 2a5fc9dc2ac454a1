"""What the hub, presence and join/leave need of a connection: :class:`Member`.

A protocol, so that the delivery side (:mod:`pushsvc.core.hub`,
:mod:`pushsvc.core.presence`, :mod:`pushsvc.core.joinleave`) never imports the
connection (:mod:`pushsvc.core.client` imports them): data flows one way.
"""

from __future__ import annotations

from typing import Protocol

from ..auth.tokens import Principal
from ..protocol import Frame
from .outbox import Outbox
from .transport import Transport


class Member(Protocol):
    """A connection as a channel member.

    Attributes:
        id: the public client id.
        principal: who the token speaks for (``sub``, grants, ``info``).
        channels: channels and patterns it is subscribed to (the hub adds and
            removes entries).
        closed: True once closed; a closed member has left every channel.
        outbox: its outbound buffer (the fan-out writes through it).
        transport: its transport (``transport.name`` labels the metrics).
    """

    id: str
    principal: Principal
    channels: set[str]
    closed: bool
    outbox: Outbox
    transport: Transport

    def send(self, frame: str, nbytes: int) -> None:
        """Queue one encoded frame of ``nbytes`` UTF-8 bytes."""
        ...

    def send_frame(self, frame: Frame) -> None:
        """Encode and queue one frame."""
        ...

    def close(self, code: int, reason: str = "") -> None:
        """Close with a close code of docs/protocol.md; never blocks."""
        ...
