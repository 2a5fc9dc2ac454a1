"""Events a :class:`~pushsvc.client.Client` reports: state changes and server notices.

Get them with ``Client(..., on_event=callback)`` (called inline, in order, from
the client's task; it must not block) or ``async for event in client.events()``.
Every event has a ``state``: the client's state once the event happened
(``"disconnected" | "connecting" | "connected"``).

Match them with ``match``/``isinstance``::

    async for event in client.events():
        match event:
            case Disconnected(code=code, reconnect=False):
                print("stopped:", code)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["disconnected", "connecting", "connected"]


@dataclass(frozen=True, slots=True)
class Connecting:
    """The client started connecting (``connect()``, or ``async with``)."""

    url: str
    state: State = "connecting"


@dataclass(frozen=True, slots=True)
class Connected:
    """``welcome`` arrived: authenticated, subscriptions being resumed.

    Attributes:
        client: the session id; user: the JWT ``sub``; node: the serving node's name.
        epoch: the stream's current epoch (history on); subs: server-side subscriptions.
        ping_interval: seconds between the server's pings; exp: token expiry, Unix seconds.
    """

    client: str
    user: str
    node: str | None
    epoch: str | None
    subs: list[str]
    ping_interval: float
    exp: float
    state: State = "connected"


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended, or an attempt to open one failed.

    Attributes:
        code: the close code (1006: lost without a close frame, or the attempt failed).
        reason: the close reason, or what the code means, or why the attempt failed.
        reconnect: the client tries again after ``delay`` seconds; False: it stopped.
        delay: seconds until the next attempt (None when not reconnecting).
        error: the exception of a failed attempt (network error, HTTP refusal,
            ``get_token`` failure), or None for a closed connection.
    """

    code: int
    reason: str
    reconnect: bool
    delay: float | None
    error: BaseException | None = None

    @property
    def state(self) -> State:
        return "connecting" if self.reconnect else "disconnected"


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A ``subscribed`` frame: a subscription is (again) live on this connection.

    Attributes:
        channel: the channel or pattern.
        recovered: None without a resume position; False: messages after it may be
            missing (the client forgot the position; reload what you derive from it).
        epoch: the stream epoch of the sequences that follow.
        server: a server-side subscription (token ``subs``, server API).
    """

    channel: str
    recovered: bool | None
    epoch: str | None
    server: bool
    state: State = "connected"


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The server ended a subscription (``unsubscribed`` not asked for, e.g. ``forbidden``
    after a ``refresh``, or the server API's ``unsubscribe``)."""

    channel: str
    reason: str | None
    state: State = "connected"


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame that answers no pending call (e.g. a server-side subscription the
    server could not make), a subscribe retried after ``rate_limited``/``unavailable``, or
    a background token refresh that failed (``error`` is then that exception)."""

    error: BaseException
    state: State = "connected"


@dataclass(frozen=True, slots=True)
class Join:
    """A connection subscribed to ``channel`` (join/leave channels only)."""

    channel: str
    client: str
    user: str
    info: dict[str, Any] | None = None
    state: State = "connected"


@dataclass(frozen=True, slots=True)
class Leave:
    """A connection unsubscribed from ``channel`` or disconnected."""

    channel: str
    client: str
    user: str
    info: dict[str, Any] | None = None
    state: State = "connected"


Event = (
    Connecting | Connected | Disconnected | Subscribed | Unsubscribed | ServerError | Join | Leave
)


class EventStream:
    """``async for event in client.events()``: the client's events from the moment
    :meth:`Client.events` was called, in order, until the client is closed or stops
    (the last event is then a :class:`Disconnected` with ``reconnect=False``).

    Events wait in an unbounded queue until taken (they are few: state changes,
    join/leave); :meth:`close` stops collecting them.
    """

    def __init__(self, unregister: Callable[[EventStream], None]) -> None:
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._unregister = unregister

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def close(self) -> None:
        """Stop collecting events; iteration ends after the ones already queued."""
        self._end()
        self._unregister(self)

    def _push(self, event: Event) -> None:
        if not self._ended:
            self._queue.append(event)
            self._ready.set()

    def _end(self) -> None:
        self._ended = True
        self._ready.set()
