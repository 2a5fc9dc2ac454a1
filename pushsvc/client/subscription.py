"""One subscription of a :class:`~pushsvc.client.Client`: its position, state and buffer.

A subscription is an async iterator of :class:`~pushsvc.client.Message`: the
client's reader puts each delivered message into the subscription's buffer,
``async for`` takes them out in order. The buffer holds at most ``buffer_size``
messages; when it is full the client stops reading the socket until the
application takes one (backpressure: the server may then close the connection
as a slow consumer, 4009/4010, and the client resumes from the last message it
buffered, so nothing is lost; docs/protocol.md, "Guarantees").

The position is (``epoch``, ``last_seq``): the highest sequence buffered and the
stream epoch it belongs to. The client resubscribes with it after every
reconnect and drops a message whose ``seq`` is not above it (a duplicate); a
``subscribed`` with ``recovered: false`` or another epoch makes it forget
``last_seq`` before the replay arrives (docs/protocol.md, "Client algorithm").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

from ..protocol import Subscribed
from .errors import ClientClosed, PushsvcError
from .messages import Message

log = logging.getLogger("pushsvc.client")

SubscriptionState = Literal["subscribing", "subscribed", "unsubscribed"]


class Subscription:
    """A channel or pattern the client follows; ``async for message in subscription``.

    Created by :meth:`Client.subscribe` (or by the server: token ``subs``, server
    API); not constructed by applications.

    Attributes:
        channel: the channel or pattern subscribed to.
        server: a server-side subscription (resumed through the auth frame's ``subs``).
        state: ``"subscribing"`` (waiting for ``subscribed``, e.g. while reconnecting),
            ``"subscribed"``, or ``"unsubscribed"`` (ended; see :attr:`reason`).
        last_seq: the highest ``seq`` buffered (None before any, or after a gap).
        epoch: the stream epoch ``last_seq`` belongs to.
        recovered: the last ``subscribed`` frame's ``recovered`` (None: no position
            was sent; False: messages may be missing, reload derived state).
        duplicates: messages dropped because their ``seq`` was not above ``last_seq``
            (or was one of :attr:`own`).
        own: seqs of this client's own ``echo=False`` publishes to the channel not yet
            passed: a replay after a reconnect (a new client id) would hand them
            back, so they are dropped as duplicates.
        reason: why it ended (``"unsubscribed"`` by the app, the server's reason,
            or the error's code), None while active.
    """

    def __init__(
        self,
        channel: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        server: bool = False,
        buffer_size: int = 1000,
        unsubscribe: Callable[[Subscription], Awaitable[None]],
    ) -> None:
        self.channel = channel
        self.server = server
        self.state: SubscriptionState = "subscribing"
        self.last_seq = since
        self.epoch = epoch
        self.recovered: bool | None = None
        self.duplicates = 0
        self.own: set[int] = set()
        self.reason: str | None = None
        self._unsubscribe = unsubscribe
        self._buffer: deque[Message] = deque()
        self._size = buffer_size
        self._error: BaseException | None = None
        self._readable = asyncio.Event()  # set while the buffer is not empty or it ended
        self._writable = asyncio.Event()  # set while the buffer has room or it ended
        self._writable.set()
        self._confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._full_logged = False

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} {self.state} last_seq={self.last_seq}>"

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        """The next message, in order.

        Raises:
            StopAsyncIteration: unsubscribed (by the app or the server) or client closed.
            CommandError: the server refused to subscribe it again after a reconnect.
            Stopped: the client stopped for good (e.g. 4001 without ``get_token``).
        """
        while not self._buffer:
            if self.state == "unsubscribed":
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        message = self._buffer.popleft()
        self._writable.set()
        return message

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._buffer)

    async def unsubscribe(self) -> None:
        """Stop receiving: drops the buffered messages and ends iteration; sends
        ``unsubscribe`` when connected (waits for the answer up to the client's
        ``request_timeout``). Does nothing when already ended.

        Raises:
            CommandError: the server refused (the subscription is gone on this side anyway).
            TimeoutError: no answer within ``request_timeout`` (gone on this side too).
        """
        if self.state == "unsubscribed":
            return
        self._buffer.clear()
        self._end("unsubscribed")
        await self._unsubscribe(self)

    # ---- used by the client ------------------------------------------------------

    def _settle(self, frame: Subscribed) -> None:
        """Apply a ``subscribed`` frame: forget the position on ``recovered: false`` or a
        changed epoch (the new epoch's sequences restarted), adopt the frame's epoch."""
        changed = frame.epoch is not None and self.epoch is not None and frame.epoch != self.epoch
        if frame.recovered is False or changed:
            self.last_seq = None
        if frame.epoch is not None:
            self.epoch = frame.epoch
        self.recovered = frame.recovered
        self.state = "subscribed"
        if not self._confirmed.done():
            self._confirmed.set_result(None)

    async def _put(self, message: Message) -> None:
        """Buffer a message, waiting while the buffer is full (the reader's backpressure)."""
        while len(self._buffer) >= self._size and self.state != "unsubscribed":
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "subscription %s: %d messages buffered and not consumed; "
                    "reading is paused until the application takes some",
                    self.channel,
                    self._size,
                )
            self._writable.clear()
            await self._writable.wait()
        if self.state == "unsubscribed":
            return  # the app left it while we waited: nobody wants the message
        self._buffer.append(message)
        self._readable.set()

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        """End the subscription: iteration stops once the buffer is consumed (raising
        ``error`` when given); a pending :meth:`Client.subscribe` raises ``error``."""
        if self.state == "unsubscribed":
            return
        self.state = "unsubscribed"
        self.reason = reason
        self._error = error
        self._readable.set()
        self._writable.set()
        if not self._confirmed.done():
            if error is None:
                self._confirmed.cancel()
            else:
                self._confirmed.set_exception(error)
                self._confirmed.exception()  # retrieved: nobody may be waiting

    def _suspend(self) -> None:
        """The connection dropped: back to ``subscribing`` until the next ``subscribed``."""
        if self.state == "subscribed":
            self.state = "subscribing"

    async def _wait_confirmed(self) -> None:
        """Until the first ``subscribed`` (raises the error that ended it instead)."""
        try:
            await asyncio.shield(self._confirmed)
        except asyncio.CancelledError:
            if self._confirmed.cancelled():
                raise self._error or _ended(self) from None
            raise


def _ended(sub: Subscription) -> Exception:
    if sub.reason == "closed":
        return ClientClosed()
    return PushsvcError("unsubscribed", f"{sub.channel}: {sub.reason or 'ended'}")
