"""The transport interface: what the connection core needs of a socket.

The core (:class:`~pushsvc.core.client.Client`, :class:`~pushsvc.core.outbox.Outbox`,
the hub's :func:`~pushsvc.core.outbox.fan_out`) never knows a wire format; each
transport (``pushsvc.ws``, ``pushsvc.sse``) supplies framing and writes only, as
the centrifuge Go library's ``Transport`` does. The hot path comes first: the
fan-out frames a batch once per wire format (``framing``) and writes the bytes
straight to ``wire`` when the transport is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..protocol import Disconnect


class Transport(Protocol):
    """One connection's socket, as the core sees it.

    Attributes:
        name: ``"ws"``, ``"sse"`` or ``"stream"``: the metrics label, logs.
        framing: batch text (encoded frames joined by ``\\n``) -> the wire bytes
            of that batch; pure, one function per wire format (it may keep its
            last result, so a fan-out frames a batch once for all sockets).
        wire: where framed bytes go directly (an asyncio transport), or None when
            the transport has no direct path (every batch then goes through
            :meth:`write`).
        expects_pong: True when the protocol's heartbeat needs an answer
            (WebSocket ``ping`` frames); False when the write path and TCP find a
            dead peer (SSE comments).
        watermarks: True when the connection resumes from one id (SSE's
            ``Last-Event-ID``, HTTP-streaming's ``last_event_id``): on several
            channels its messages then carry no id and the node's watermark
            follows them (:mod:`pushsvc.core.watermark`).
    """

    name: str
    framing: Callable[[str], bytes]
    wire: asyncio.WriteTransport | None
    expects_pong: bool
    watermarks: bool

    def use_watermarks(self, on: bool) -> None:
        """Frame messages without ids and ``position`` frames as the id (on), or
        each message with its own id (off); replaces :attr:`framing`."""
        ...

    def can_write(self) -> bool:
        """True while a :meth:`write` would not add to a backlog (open, not under backpressure)."""
        ...

    def write(self, text: str) -> None:
        """Frame and write one batch; never blocks (a blocked write is held in flight).

        Raises:
            OSError: the peer is gone.
        """
        ...

    def drained(self) -> Awaitable[None]:
        """Wait until :meth:`can_write` is true again (the write in flight is done).

        Raises:
            OSError: the peer went away meanwhile.
        """
        ...

    def close(self, disconnect: Disconnect) -> None:
        """Tell the peer why it is closed (WebSocket close frame; SSE ``close`` event
        then the end of the body) and close; never blocks, bounded in time."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (no goodbye)."""
        ...
