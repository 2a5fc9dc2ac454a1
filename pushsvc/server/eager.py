"""Eager ASGI sends: start a ``send`` coroutine at once, finish it only if it blocks.

uvicorn's ``send`` writes to the socket synchronously when it can; started with
``coro.send(None)`` it then completes with no task and no loop turn. Only when it
yields (backpressure: waiting for the socket to drain) does a writer await the
rest with :func:`resume`. Used by the WebSocket and the stream transports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def resume(coro: Coroutine[Any, Any, None], blocker: Any) -> None:
    """Finish driving ``coro``, which already yielded ``blocker`` (a future or None).

    Used after an eager ``coro.send(None)`` found the send blocked on backpressure
    (uvicorn's send awaits ``writable.wait()``, which yields that event's future).
    It does what a Task would: wait for the future, then resume the coroutine,
    which sees the future's outcome itself. If this task is cancelled (send
    timeout, close), the future is cancelled with it and the coroutine gets the
    ``CancelledError`` at its ``await``, runs its cleanup and re-raises it.

    Like a Task, it clears the future's ``_asyncio_future_blocking`` flag (set
    when the coroutine yielded it) before awaiting it: the C Future refuses to be
    awaited again while the flag is set ("await wasn't used with future").
    """
    try:
        while True:
            try:
                if blocker is None:  # a bare yield (asyncio.sleep(0)): one loop turn
                    await asyncio.sleep(0)
                else:
                    blocker._asyncio_future_blocking = False
                    await blocker
            except BaseException as exc:
                if blocker is None or not blocker.done():
                    blocker = coro.throw(exc)
                    continue
                # else: the future was cancelled with us; resuming delivers that below
            blocker = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()


class EagerSender:
    """At most one eager ASGI send in flight for one connection.

    :meth:`start` runs a send coroutine at once; when it finishes synchronously (the
    server wrote at once) nothing is held. When it blocks, it is held until
    :meth:`finish` (the writer awaits it) or :meth:`abandon` (the connection closes:
    the close frame or event comes next).
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: tuple[Coroutine[Any, Any, None], Any] | None = None

    @property
    def busy(self) -> bool:
        """True while a send is held in flight."""
        return self._held is not None

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Drive ``coro`` until it completes or blocks (then hold it).

        Raises:
            Exception: what the send raised at once (``OSError``: the peer is gone).
        """
        try:
            blocker = coro.send(None)
        except StopIteration:
            return
        self._held = (coro, blocker)

    async def finish(self) -> None:
        """Finish the held send, if any (see :func:`resume`)."""
        held, self._held = self._held, None
        if held is not None:
            await resume(*held)

    def abandon(self) -> None:
        """Drop the held send without completing it."""
        held, self._held = self._held, None
        if held is not None:
            held[0].close()
