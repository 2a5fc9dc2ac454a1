"""pushsvc.client: the async Python client of pushsvc (WebSocket, wire contract v1).

::

    from pushsvc.client import Client

    async with Client("http://127.0.0.1:8000", token=token) as client:
        async for message in await client.subscribe("chat.room1"):
            print(message.seq, message.data)

Modules: :mod:`.client` (the connection and its rules), :mod:`.subscription`,
:mod:`.messages` (what the app receives), :mod:`.events` (state changes),
:mod:`.errors`, :mod:`.closecodes` (what each close code makes the client do),
:mod:`.backoff` (full-jitter reconnect delays).
"""

from .client import Client
from .errors import ClientClosed, CommandError, ConnectionLost, PushsvcError, Stopped, Unauthorized
from .events import (
    Connected,
    Connecting,
    Disconnected,
    Event,
    EventStream,
    Join,
    Leave,
    ServerError,
    Subscribed,
    Unsubscribed,
)
from .messages import Message, Presence, PresenceStats, PresentClient, Publisher
from .subscription import Subscription

__all__ = [
    "Client",
    "ClientClosed",
    "CommandError",
    "Connected",
    "Connecting",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "EventStream",
    "Join",
    "Leave",
    "Message",
    "Presence",
    "PresenceStats",
    "PresentClient",
    "Publisher",
    "PushsvcError",
    "ServerError",
    "Stopped",
    "Subscribed",
    "Subscription",
    "Unauthorized",
    "Unsubscribed",
]
