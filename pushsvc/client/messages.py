"""What the client hands the application: messages and presence answers.

msgspec Structs (frozen): cheap to create, printable, comparable, and encodable
with ``msgspec.json.encode``. JSON values arrive decoded (``dict``, ``list``,
``str``, ``int``, ``float``, ``bool``, ``None``).
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec


class Publisher(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who published a message, stamped by the server from the publisher's verified
    token: ``user`` (its JWT ``sub``) and ``client`` (the publishing connection; None
    for an emit)."""

    user: str
    client: str | None = None


class Message(msgspec.Struct, frozen=True, omit_defaults=True):
    """One delivery (a ``message`` frame of docs/protocol.md), duplicates already dropped.

    Attributes:
        channel: the concrete channel the message was published to.
        data: the payload as decoded JSON (docs/protocol.md, "Payload mapping"): the
            published JSON value, a string for other UTF-8 text, and for other bytes
            the base64 text of them with ``encoding == "base64"`` (see :attr:`payload`).
        seq: the JetStream stream sequence (None with history off).
        epoch: the stream epoch ``seq`` belongs to (None when the server sent none).
        pattern: the wildcard subscription that delivered it, or None.
        encoding: ``"base64"`` or None.
        publisher: who published it (a client's publish, a JWT emit), or None.
    """

    channel: str
    data: Any
    seq: int | None = None
    epoch: str | None = None
    pattern: str | None = None
    encoding: str | None = None
    publisher: Publisher | None = None

    @property
    def payload(self) -> bytes:
        """The published bytes: base64-decoded when ``encoding`` is ``"base64"``,
        the UTF-8 of a string ``data``, else ``data`` encoded as compact JSON."""
        if self.encoding == "base64":
            return base64.b64decode(self.data)
        if isinstance(self.data, str):
            return self.data.encode()
        return msgspec.json.encode(self.data)

    def to_frame(self) -> dict[str, Any]:
        """The ``message`` frame as the server sent it (``type``, ``channel``, ``data``,
        then ``seq``, ``encoding``, ``pattern``, ``publisher`` when present): what
        ``pushsvc subscribe`` prints. ``epoch`` is the client's bookkeeping, not part of
        the frame."""
        frame: dict[str, Any] = {"type": "message", "channel": self.channel, "data": self.data}
        if self.seq is not None:
            frame["seq"] = self.seq
        if self.encoding is not None:
            frame["encoding"] = self.encoding
        if self.pattern is not None:
            frame["pattern"] = self.pattern
        if self.publisher is not None:
            frame["publisher"] = msgspec.to_builtins(self.publisher)
        return frame


class PresentClient(msgspec.Struct, frozen=True):
    """One connection present on a channel.

    Attributes:
        client: its session id (``welcome.client``).
        user: its JWT ``sub``.
        node: ``PUSHSVC_NODE_NAME`` of the node serving it.
        info: its token's ``info`` claim (a dict), or None.
    """

    client: str
    user: str
    node: str
    info: dict[str, Any] | None = None


class Presence(msgspec.Struct, frozen=True):
    """Answer to :meth:`Client.presence`: who is subscribed to ``channel``, cluster-wide.

    Attributes:
        channel: the channel asked about.
        clients: at most ``PUSHSVC_PRESENCE_LIMIT`` connections, in no order.
        users: distinct users present (exact).
        clients_total: connections present (exact).
        truncated: ``clients`` was cut to the limit.
    """

    channel: str
    clients: list[PresentClient]
    users: int
    clients_total: int
    truncated: bool = False


class PresenceStats(msgspec.Struct, frozen=True):
    """Answer to :meth:`Client.presence_stats`: counts of connections and distinct users."""

    channel: str
    clients: int
    users: int
