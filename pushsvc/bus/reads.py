"""History reads: stored messages of a channel (or pattern) after a position.

:class:`Reader` answers "what did I miss since ``seq``" for the hub's recovery,
the WebSocket ``subscribe`` with ``since`` and ``GET /history``, without a
JetStream consumer: stream info plus batch direct gets (ADR-31, :func:`scan`),
answered by any replica, so reads work while JetStream elects a meta leader.
It also says when a gap cannot be filled (``recovered`` False): the stream's
head expired, the channel hit its cap, or the position belongs to another epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamInfo

from ..channels import channel_for, is_pattern, pattern_reaches, subject_for
from .connection import Connection
from .directget import BatchUnsupported, InvalidResponse, get_batch
from .errors import Unavailable
from .stream import Streams, created_at

READ_BATCH = 256  # messages per JetStream batch direct get
CLOCK_MARGIN = 2.0  # s: this node's clock against the NATS server's, for max-age checks


@dataclass
class StoredMessage:
    """A message read back from the stream: stream ``seq``, raw ``payload`` bytes, its
    concrete ``channel`` (None when not known) and the NATS ``headers`` it was stored
    with (None: none; pushsvc's own, e.g. ``Pushsvc-User``, are read by the hub)."""

    seq: int
    payload: bytes
    channel: str | None = None
    headers: dict[str, str] | None = None


@dataclass
class History:
    """Result of :meth:`Reader.history`.

    Attributes:
        messages: stored messages of the channel with seq > since, oldest first.
        recovered: False when messages after ``since`` may have been removed from
            the stream (age or per-channel cap) or history is off.
        last_seq: the stream's last sequence when read (0 if empty/off).
        more: True when ``limit`` cut the result (page on with ``since`` = last seq).
        epoch: the stream's epoch when read (see :func:`~pushsvc.bus.stream.epoch_of`).
        since: the ``since`` actually applied: 0 when the caller's position belongs
            to another epoch of the stream (then ``recovered`` is False and every
            message the stream holds for the channel is returned).
    """

    messages: list[StoredMessage] = field(default_factory=list)
    recovered: bool = True
    last_seq: int = 0
    more: bool = False
    epoch: str | None = None
    since: int = 0


async def scan(
    nc: NATS, stream: str, subject: str, *, after: int = 0, batch: int = 1024
) -> AsyncIterator[RawStreamMsg]:
    """Every message of ``stream`` on ``subject`` (wildcards allowed) with a sequence
    greater than ``after``, oldest first.

    JetStream batch direct gets (ADR-31, :func:`~pushsvc.bus.directget.get_batch`),
    page by page until none is pending: no consumer, so no meta leader and no
    "initial values done" marker to trust. The stream needs ``allow_direct``.

    Raises:
        nats.errors.NoRespondersError: the stream has no ``allow_direct``.
        nats.errors.Error, InvalidResponse, BatchUnsupported: NATS or JetStream
            failed (see :mod:`~pushsvc.bus.directget`); callers bound the time.
    """
    while True:
        left = 0
        async with aclosing(
            get_batch(nc, stream, batch=batch, seq=after + 1, subject=subject)
        ) as page:
            async for raw in page:
                left = int((raw.headers or {}).get("Nats-Num-Pending", 0))
                after = raw.seq or after
                yield raw
        if not left:
            return


def may_have_expired(position: int, info: StreamInfo) -> bool:
    """True when a message stored after stream sequence ``position`` may have been
    removed by the stream's max age (``PUSHSVC_HISTORY_TTL``); ``info`` is the
    stream's info, read just now.

    Only when the stream's first sequence is past ``position + 1``, which also
    happens when *another* channel reaches its per-channel cap
    (``max_msgs_per_subject``: JetStream removes that channel's oldest messages,
    and none of this one's). What was stored at ``position`` is gone then, and
    its time with it, so the only bound on when the messages after it were
    stored is the stream's creation: none can have expired while the stream is
    younger than the max age (less :data:`CLOCK_MARGIN` s for this node's clock
    against the NATS server's). In an older stream the answer is True: the
    server cannot tell the cap of a busy channel from the expiry of this one's.
    """
    max_age = info.config.max_age or 0.0
    if info.state.first_seq <= position + 1 or max_age <= 0:
        return False
    created = created_at(info)
    return created is None or time.time() - created > max_age - CLOCK_MARGIN


class Reader:
    """Reads of the history stream for one node.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.
        streams: the node's :class:`~pushsvc.bus.stream.Streams` (each read notes
            the stream's epoch, so a re-created stream is noticed at once).
    """

    def __init__(self, conn: Connection, streams: Streams) -> None:
        self.conn = conn
        self.streams = streams

    def _jetstream(self) -> JetStreamContext:
        """The JetStream context to read with.

        Raises:
            Unavailable: history is off, or NATS is not connected.
        """
        js = self.conn.js
        if not self.conn.history_enabled or js is None:
            raise Unavailable("history is off")
        if not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        return js

    async def history(
        self,
        channel: str,
        since: int,
        limit: int | None = None,
        *,
        seen: int = 0,
        epoch: str | None = None,
    ) -> History:
        """Stored messages of ``channel`` with seq > ``since``, oldest first, at most ``limit``.

        Positions belong to an epoch of the stream (:attr:`Streams.epoch
        <pushsvc.bus.stream.Streams.epoch>`). ``since`` is taken as a position of
        *another* epoch, answered like ``since=0`` with ``recovered`` False (every
        message of the channel the stream holds is newer than anything the caller
        saw), when ``epoch`` is given and differs from the stream's, or when
        ``epoch`` is not given and ``since`` is past the stream's last sequence (no
        position of this epoch can be).

        ``recovered`` is also False when something after ``since`` may be gone: the
        stream's first sequence is past ``since + 1`` and the stream is older than
        the max age (see :func:`may_have_expired`), or the channel is at its
        per-channel cap and every retained message is newer than ``since``.
        JetStream would silently start at its first sequence in both cases.

        Reads use stream info and JetStream batch direct gets (ADR-31), answered by
        the stream's replicas without creating a consumer, so they work while the
        JetStream meta leader is being elected. With replicas, a follower's answer
        is checked against the stream leader's last message of the channel and
        read again if it lagged.

        Args:
            channel: a valid channel name, or a wildcard pattern: then the stream's
                messages of every matching channel (personal ones only for a
                ``user.`` pattern), each with its ``channel``; ``recovered`` is
                also False when a matching channel is at its cap and nothing
                retained is older than ``since`` (a pattern's read may need
                paging: see ``more``).
            since: stream sequence; messages with a greater one are returned.
            limit: at most this many messages (default ``history_size``).
            seen: the caller is known to hold every message of the channel up to
                this stream sequence (>= ``since``), e.g. a node catching up after
                a reconnect: only messages stored after it count as lost when the
                stream's head has expired. 0 = nothing known beyond ``since``.
            epoch: the epoch ``since`` belongs to, if the caller knows it.

        Raises:
            Unavailable: history is off, NATS is not connected, or NATS/JetStream
                did not answer within ``publish_timeout`` s.
        """
        js = self._jetstream()
        s = self.conn.settings
        limit = limit or s.history_size
        subject = subject_for(self.conn.prefix, channel)
        wildcard = is_pattern(channel)
        info = await self._stream_info(js, subject)
        current = self.streams.epoch
        state = info.state
        stale = (epoch is not None and epoch != current) or (
            epoch is None and since > state.last_seq
        )
        if stale:
            since, seen = 0, 0
        if since >= state.last_seq:
            return History([], not stale, state.last_seq, epoch=current, since=since)
        subjects = state.subjects or {}
        count = sum(subjects.values()) if wildcard else subjects.get(subject, 0)
        position = max(since, seen)
        if count == 0:
            intact = not may_have_expired(position, info)
            return History([], not stale and intact, state.last_seq, epoch=current, since=since)
        messages, pending = await self._read_from_leader(subject, since, limit)
        more = pending > len(messages)
        # a pattern: any of its channels may be at its cap; personal channels stay out
        cap = s.history_size
        capped = any(n >= cap for n in subjects.values()) if wildcard else count >= cap
        if wildcard:
            messages = [m for m in messages if m.channel and pattern_reaches(channel, m.channel)]
        intact = not (stale or may_have_expired(position, info) or (capped and pending >= count))
        return History(messages, intact, state.last_seq, more, epoch=current, since=since)

    async def _stream_info(self, js: JetStreamContext, subject: str) -> StreamInfo:
        """The stream's info with the per-subject counts of ``subject`` (wildcards
        allowed), noted in :attr:`streams` (its epoch).

        Raises:
            Unavailable: the stream does not exist, or NATS/JetStream failed.
        """
        stream = self.conn.settings.stream
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            raise Unavailable(f"stream {stream} does not exist (being re-created)") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"history read failed ({type(exc).__name__})") from None
        self.streams.note(info)
        return info

    async def _read_from_leader(
        self, subject: str, since: int, limit: int
    ) -> tuple[list[StoredMessage], int]:
        """:meth:`_read`; with replicas, read again when the answer (possibly a
        follower's) lagged the stream leader (:meth:`_lagged`).

        Raises:
            Unavailable: see :meth:`_read`.
        """
        messages, pending = await self._read(subject, since, limit)
        if pending > len(messages) or self.conn.settings.stream_replicas <= 1:
            return messages, pending
        if await self._lagged(subject, messages[-1].seq if messages else since):
            return await self._read(subject, since, limit, retry=True)
        return messages, pending

    async def _read(
        self, subject: str, since: int, limit: int, *, retry: bool = False
    ) -> tuple[list[StoredMessage], int]:
        """Read up to ``limit`` messages of ``subject`` after ``since`` by batch direct gets.

        Returns ``(messages, pending)``: ``pending`` is how many messages of the
        subject the stream held after ``since`` (``Nats-Num-Pending`` of the first
        one + 1), which may exceed ``limit``.

        Raises:
            Unavailable: NATS is not connected, or no answer within
                ``publish_timeout`` s (after one retry when ``retry``).
        """
        nc = self.conn.client()
        s = self.conn.settings
        messages: list[StoredMessage] = []
        pending = 0
        error: Exception | None = None
        for attempt in range(2 if retry else 1):
            if attempt:
                await asyncio.sleep(0.05)
            messages, pending = [], 0
            try:
                async with (
                    asyncio.timeout(s.publish_timeout),
                    aclosing(
                        scan(nc, s.stream, subject, after=since, batch=min(limit, READ_BATCH))
                    ) as stored,
                ):
                    async for raw in stored:
                        if not messages:
                            pending = int((raw.headers or {}).get("Nats-Num-Pending", 0)) + 1
                        channel = channel_for(self.conn.prefix, raw.subject)
                        messages.append(
                            StoredMessage(raw.seq or 0, raw.data or b"", channel, raw.headers)
                        )
                        if len(messages) >= limit:
                            break
                return messages, pending
            except BatchUnsupported:
                raise Unavailable("history needs nats-server 2.11 or later") from None
            except (
                nats.errors.Error,
                nats.js.errors.Error,
                InvalidResponse,
                TimeoutError,
            ) as e:
                error = e
        raise Unavailable(f"history read failed ({type(error).__name__})") from None

    async def _lagged(self, subject: str, read_to: int) -> bool:
        """True when the stream leader holds a message of ``subject`` past ``read_to``.

        A non-direct get of the subject's last message is answered by the stream
        leader, which has every acknowledged message; a direct get may have come
        from a follower that had not applied the newest ones yet.
        """
        js = self.conn.js
        assert js is not None
        try:
            last = await js.get_msg(self.conn.settings.stream, subject=subject)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return False
        return (last.seq or 0) > read_to

    async def channel_last_seq(self, channel: str) -> int:
        """Stream sequence of the newest stored message of ``channel`` (0: none stored).

        One JetStream direct get (no consumer).

        Raises:
            Unavailable: history is off, NATS is not connected or did not answer.
        """
        js = self._jetstream()
        subject = subject_for(self.conn.prefix, channel)
        try:
            msg = await js.get_last_msg(self.conn.settings.stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"last message lookup failed ({type(exc).__name__})") from None
        return msg.seq or 0
