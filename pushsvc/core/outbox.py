"""A connection's bounded outbox, the flush queue, and the hub's fan-out.

Every transport shares this outbound path; it never awaits a socket. The hub
hands each channel batch to its connections with :func:`fan_out`: a direct write
of the pre-framed bytes for an outbox with nothing pending on an idle, open
transport, else :meth:`Outbox.send`, which (like every answer and ping) goes
through the outbox's buffer:

- frames are appended to a buffer bounded in bytes (``PUSHSVC_SEND_QUEUE_BYTES``,
  counted exactly in UTF-8 bytes, including a write in flight); overflow closes
  the connection with 4009 (slow consumer);
- a flush runs once per event-loop iteration for every outbox that got frames
  (one ``loop.call_soon`` for all of them, :class:`FlushQueue`; no task): it joins
  pending frames with ``\\n`` into one batch of at most ``coalesce_bytes`` (wire
  contract: one frame may carry several objects) and hands it to the transport's
  :meth:`~pushsvc.core.transport.Transport.write`. A burst that fills a whole batch
  is written at once, so an outbox whose socket keeps up never holds more than one
  batch;
- only when the transport applies backpressure (``can_write()`` false after a
  write) does a writer task take over: it awaits ``drained()`` and writes the rest;
  each wait is bounded by ``PUSHSVC_SEND_TIMEOUT`` seconds, after which the
  connection is closed 4009 and its buffer released.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from typing import Protocol

from .. import metrics
from ..protocol import CLOSE_INTERNAL_ERROR, CLOSE_SLOW_CONSUMER, Frame, encode_frame
from .transport import Transport

log = logging.getLogger("pushsvc.outbox")


def utf8_len(text: str) -> int:
    """UTF-8 size of ``text`` in bytes (``isascii`` is O(1) in CPython: no encode for ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


class Flushable(Protocol):
    """What the flush queue needs of an outbox."""

    id: str

    def _flush(self) -> None: ...


class FlushQueue:
    """Flushes, in one ``loop.call_soon`` callback, every outbox that got frames.

    A message fanned out to N connections would otherwise schedule N callbacks per
    loop iteration; here the first dirty outbox schedules the run and the rest join
    the list. Outboxes are flushed in the order they became dirty.
    """

    __slots__ = ("_dirty", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Flushable] = []

    def add(self, box: Flushable) -> None:
        """Flush ``box`` at the next run (the caller ensures it is added once)."""
        if not self._dirty:
            self._loop.call_soon(self._run)
        self._dirty.append(box)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        for box in dirty:
            try:
                box._flush()
            except Exception:  # a bug in one connection must not starve the others
                log.exception("flush of client %s failed", box.id)


_flush_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FlushQueue] = (
    weakref.WeakKeyDictionary()
)


def flush_queue(loop: asyncio.AbstractEventLoop) -> FlushQueue:
    """The :class:`FlushQueue` of ``loop`` (one per event loop)."""
    queue = _flush_queues.get(loop)
    if queue is None:
        queue = _flush_queues[loop] = FlushQueue(loop)
    return queue


class Outbox:
    """One connection's outbound buffer and writer, over its :class:`Transport`.

    The base of :class:`~pushsvc.core.client.Client`: one object per connection,
    so the fan-out's per-socket checks read one object (no hop to a second one)
    and a connection is one allocation less (measured: a separate outbox object
    cost 0.5 KiB per connection and, through the reference cycle back to its
    client, cyclic-GC work per reconnect).

    Args:
        id: the connection's client id (logs).
        transport: where batches go (framing and writes are the transport's).
        max_bytes: ``PUSHSVC_SEND_QUEUE_BYTES``, the buffer bound in bytes.
        coalesce_bytes: ``PUSHSVC_COALESCE_BYTES``, the largest batch in bytes.
        send_timeout: ``PUSHSVC_SEND_TIMEOUT``, seconds a blocked write may take.

    Attributes:
        channels: the connection's subscriptions (:func:`fan_out` reads its size).
        buffered_bytes: UTF-8 bytes accepted by :meth:`send` and not yet taken by
            the transport (pending + a write in flight under backpressure).
        closed: True once closed; frames sent after are ignored.
    """

    __slots__ = (
        "_coalesce",
        "_flushes",
        "_inflight_bytes",
        "_loop",
        "_max_bytes",
        "_out",
        "_out_bytes",
        "_scheduled",
        "_timeout",
        "_wire",
        "_writer",
        "channels",
        "closed",
        "framing",
        "id",
        "transport",
    )

    def __init__(
        self,
        id: str,
        transport: Transport,
        *,
        max_bytes: int,
        coalesce_bytes: int,
        send_timeout: float,
    ) -> None:
        self.id = id
        self.transport = transport
        self._wire = transport.wire
        self.framing = transport.framing
        self.channels: set[str] = set()
        self._max_bytes = max_bytes
        self._coalesce = coalesce_bytes
        self._timeout = send_timeout
        self._loop = asyncio.get_running_loop()
        self._flushes = flush_queue(self._loop)
        # pending frames; their UTF-8 sizes sum to _out_bytes. A list, not a deque: an
        # empty list is 56 bytes, a deque 760 (its first block), for every idle connection
        self._out: list[str] = []
        self._out_bytes = 0
        self._inflight_bytes = 0
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self.closed = False

    def reframe(self, direct: bool) -> None:
        """The transport's framing changed: take it, and let :func:`fan_out` write
        straight to the wire (``direct``) or only through this outbox (so what the
        hub sends after a batch, a watermark, goes out in the same write)."""
        self.framing = self.transport.framing
        self._wire = self.transport.wire if direct else None

    def close(self, code: int, reason: str = "") -> None:
        """Close the connection with ``code`` (the client overrides it); here: stop writing."""
        self.closed = True
        self._shut()

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued for this connection and not yet taken by the transport."""
        return self._out_bytes + self._inflight_bytes

    @property
    def writing(self) -> bool:
        """True while a writer task waits for the transport to drain."""
        return self._writer is not None

    def send(self, frame: str, nbytes: int) -> None:
        """Queue one encoded frame (``nbytes`` = its UTF-8 length). Never blocks.

        The first frame of a loop iteration schedules a flush; when a whole batch
        (``coalesce_bytes``) is pending and no writer is busy it is written at
        once. Closes the connection with 4009 when :attr:`buffered_bytes` would
        exceed ``max_bytes``.
        """
        if self.closed:
            return
        self._out.append(frame)
        self._out_bytes += nbytes
        if self._out_bytes + self._inflight_bytes > self._max_bytes:
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer overflow")
        elif self._writer is None:
            if self._out_bytes >= self._coalesce:
                self._write_pending()
            elif not self._scheduled:
                self._scheduled = True
                self._flushes.add(self)

    def send_frame(self, frame: Frame) -> None:
        """Encode and queue one control frame (answers, errors, pings)."""
        raw = encode_frame(frame)
        self.send(raw.decode(), len(raw))

    def _shut(self) -> None:
        """Drop everything pending and stop the writer (the caller marks it closed)."""
        self._drop()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()  # cancels the transport wait it was on

    def _drop(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._inflight_bytes = 0

    def _take_batch(self) -> tuple[str, int]:
        """Pop pending frames joined by ``\\n`` into one text of at most ``coalesce_bytes``.

        Returns ``(text, taken)``: ``taken`` is the sum of the popped frames' sizes,
        i.e. what leaves the pending count (separators were never counted). A single
        frame larger than ``coalesce_bytes`` goes out alone. Call only with frames
        pending.
        """
        out = self._out
        taken = self._out_bytes
        if len(out) == 1:
            self._out_bytes = 0
            return out.pop(), taken
        if taken + len(out) - 1 <= self._coalesce:  # all fits: one join, no per-frame work
            text = "\n".join(out)
            out.clear()
            self._out_bytes = 0
            return text, taken
        frame = out[0]
        taken = size = utf8_len(frame)
        k = 1
        while k < len(out):
            n = utf8_len(out[k])
            if size + 1 + n > self._coalesce:
                break
            size += 1 + n
            taken += n
            k += 1
        parts = out[:k]
        del out[:k]  # one move of the rest per batch, not one per frame
        self._out_bytes -= taken
        return ("\n".join(parts) if k > 1 else frame), taken

    def _flush(self) -> None:
        """The scheduled flush (see :class:`FlushQueue`)."""
        self._scheduled = False
        if self._writer is None and not self.closed:
            self._write_pending()

    def _write_pending(self) -> None:
        """Hand pending batches to the transport until done or it applies backpressure."""
        out = self._out
        transport = self.transport
        while out:
            text, taken = self._take_batch()
            try:
                transport.write(text)
            except Exception as exc:
                self._write_failed(exc)
                return
            if not transport.can_write():
                self._inflight_bytes = taken
                self._writer = self._loop.create_task(self._drain())
                return

    async def _drain(self) -> None:
        """Writer task: wait for the transport to drain, then write the rest.

        Every wait is bounded by ``send_timeout`` seconds; a connection that does
        not take a batch in time is closed 4009 and its buffer released. When the
        buffer is empty the task ends and the outbox is back to eager flushes.
        """
        transport = self.transport
        try:
            while True:
                async with asyncio.timeout(self._timeout):
                    await transport.drained()
                self._inflight_bytes = 0
                if self.closed or not self._out:
                    break
                text, taken = self._take_batch()
                transport.write(text)
                if transport.can_write():
                    continue
                self._inflight_bytes = taken
        except TimeoutError:
            self._writer = None  # so close() does not cancel this task
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send timeout")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._writer is asyncio.current_task():
                self._writer = None  # so close() does not cancel this task
            self._write_failed(exc)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    def _write_failed(self, exc: Exception) -> None:
        """A write raised: the peer is gone (``OSError``, per the ASGI spec) or a bug.

        A gone peer: drop the buffer, the transport's reader sees the disconnect.
        Anything else must not lose frames silently: log it and close with 1011.
        """
        self._drop()
        if not isinstance(exc, OSError):
            log.error("write failed on client %s", self.id, exc_info=exc)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")


def fan_out(boxes: Iterable[Outbox], text: str, nbytes: int, *, single: bool = True) -> None:
    """Hand ``text`` (one or more encoded frames joined by ``\\n``) to every outbox.

    The hub's delivery loop, once per channel batch (see :class:`~pushsvc.core.hub.Hub`).
    An outbox with nothing pending (no buffered frame, no writer task busy) whose
    transport has a direct path (``wire``) that is open and holds no unsent bytes
    gets the pre-framed bytes written there: framed once per wire format for all
    connections (each transport's ``framing`` keeps the last result), no buffer, no
    flush callback, no await. Every other outbox goes through :meth:`Outbox.send`,
    so the byte bound, 4009, coalescing behind a backlog, backpressure and ordering
    after pending frames hold.

    Why these checks are enough: a transport with an empty write buffer is never
    paused (asyncio and uvloop resume writing when the buffer drains), and a
    connection stops being writable only with its transport closing (the peer's
    close, a protocol error) or with the client closed (a closed client has already
    left its channels). Each check is one attribute or one C call: this loop runs
    once per socket per batch.

    Args:
        boxes: a snapshot (the loop must not see the set change under it).
        text: the encoded frame(s); ``nbytes`` its UTF-8 length in bytes.
        single: False when the same flush has more than one channel to write: a
            connection subscribed to several channels then queues through its
            outbox so it still gets one write per flush.
    """
    framing = None
    framed = b""
    for box in boxes:
        wire = box._wire
        if (
            wire is not None
            and not box._out_bytes
            and box._writer is None
            and (single or len(box.channels) == 1)
            and not wire.get_write_buffer_size()
            and not wire.is_closing()
        ):
            if box.framing is not framing:
                framing = box.framing
                framed = framing(text)
            wire.write(framed)
        else:
            box.send(text, nbytes)
