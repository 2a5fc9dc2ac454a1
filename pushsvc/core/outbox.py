"""How frames reach the server's socket: eager ASGI sends, uvicorn's direct path, flushes.

The sans-I/O-ish glue between :class:`pushsvc.core.client.Session` and the ASGI
server: a per-loop flush queue (one ``call_soon`` for every dirty session), the
trampoline that finishes an eagerly started ASGI send after backpressure, and
the uvicorn-specific fast paths (pre-framed text frames written straight to the
transport; aborting a connection whose peer stopped reading). With another ASGI
server the uvicorn paths switch themselves off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

try:  # the direct write path applies to uvicorn's websockets-sansio protocol only
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIOProtocol,
    )
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State

    _OPEN: Any = State.OPEN
except ImportError:  # pragma: no cover - another ASGI server
    _SansIOProtocol = None  # type: ignore[assignment,misc]
    _OPEN = None

log = logging.getLogger("pushsvc.core.outbox")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]


class Flushable(Protocol):
    """What the flush queue needs of a session."""

    id: str

    def _flush(self) -> None: ...


def abort_connection(receive: ASGIReceive) -> bool:
    """Abort the TCP connection behind ``receive``, when the server exposes it.

    ASGI has no "abort". uvicorn passes its protocol's bound ``receive`` method
    unwrapped through Starlette, and the protocol's ``transport`` is an asyncio
    transport: ``abort()`` drops its buffer and the socket at once (the reader then
    gets ``websocket.disconnect``); with ``SO_LINGER`` 0 the kernel resets the
    connection and frees its send buffer too. With another server this does
    nothing and the server's own timeouts apply. Returns True when it aborted.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:  # linger 0: reset, so the kernel frees its send buffer now, not after probes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except Exception:  # already closed, or a transport without a real socket
            pass
    abort()
    return True


def direct_protocol(receive: ASGIReceive) -> Any:
    """uvicorn's websockets-sansio protocol behind ``receive``, if frames can bypass ASGI.

    The direct path writes a pre-framed WebSocket text frame (RFC 6455 5.2, built
    by the ``websockets`` library) straight to the connection's transport: the same
    bytes uvicorn would write, without the per-socket ASGI send coroutine and
    framing. It needs uvicorn's sans-I/O protocol with no extension negotiated
    (per-message deflate off); any other server uses the ASGI path.
    """
    proto = getattr(receive, "__self__", None)
    if _SansIOProtocol is None or not isinstance(proto, _SansIOProtocol):
        return None
    if proto.conn.extensions:
        return None
    return proto


def can_write_direct(proto: Any) -> bool:
    """True while the connection is open and uvicorn would write at once (no backpressure)."""
    return (
        proto.writable.is_set()
        and not proto.close_sent
        and proto.conn.state is _OPEN
        and not proto.transport.is_closing()
    )


_last_text: str | None = None
_last_frame = b""


def text_frame(text: str) -> bytes:
    """The wire bytes of a server text frame carrying ``text``.

    A fan-out hands the same ``str`` to every session in turn, so a one-entry
    cache keyed by identity frames a message once, not once per socket.
    """
    global _last_text, _last_frame
    if text is not _last_text:
        _last_frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        _last_text = text
    return _last_frame


def utf8_len(text: str) -> int:
    """UTF-8 size of ``text`` (``isascii`` is O(1) in CPython: no encode for ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


class FlushQueue:
    """Flushes, in one ``loop.call_soon`` callback, every session that got frames.

    A message fanned out to N sessions would otherwise schedule N callbacks per
    loop iteration; here the first dirty session schedules the run and the rest
    join the list. Sessions are flushed in the order they became dirty.
    """

    __slots__ = ("_dirty", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Flushable] = []

    def add(self, session: Flushable) -> None:
        """Flush ``session`` at the next run (the caller ensures it is added once)."""
        if not self._dirty:
            self._loop.call_soon(self._run)
        self._dirty.append(session)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                session._flush()
            except Exception:  # a bug in one session must not starve the others
                log.exception("flush of session %s failed", session.id)


_flush_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FlushQueue] = (
    weakref.WeakKeyDictionary()
)


def flush_queue(loop: asyncio.AbstractEventLoop) -> FlushQueue:
    """The :class:`FlushQueue` of ``loop`` (one per event loop)."""
    queue = _flush_queues.get(loop)
    if queue is None:
        queue = _flush_queues[loop] = FlushQueue(loop)
    return queue


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
