"""The node's watermark: one exact resume id for a stream on several channels.

A ``text/event-stream`` connection resumes from one id, the browser's
``Last-Event-ID`` (docs/protocol.md, "Resume: the event id"). On one channel or
one pattern each message's own ``<epoch>:<seq>`` is exact: it is one NATS
subscription, delivered in stream order. On several channels it is not: each is
its own NATS subscription and nats-py runs their callbacks each in turn, so the
node can write ``A 100`` before ``B 99``; a drop between them, resumed from
``100``, would lose ``B 99``.

So a connection on several channels (SSE or HTTP-streaming, history on) gets
its messages without ids, and after them a ``position`` frame carrying the
node's watermark ``W``, written when it is safe:

- the node reads the republished stream on its one NATS connection in stream
  order, and nats-py queues each message on its subscription as it parses it;
  once no live subscription has a message waiting (:meth:`Bus.drained
  <pushsvc.bus.Bus.drained>`), every message up to the highest sequence the hub
  has been handed (``W``) has been handed over;
- once the hub has also written every batch of the connection's channels (none
  open, no :class:`~pushsvc.core.flight.Flight` under way, no outage catch-up
  pending) and the connection is not still replaying a resume (its replay written
  and ``W`` past its seam), everything of its channels up to ``W`` is in its
  outbox, ahead of the ``position`` frame.

A resume from ``W`` then replays each channel after ``W``: nothing lost, nothing
twice. The id stays ``<epoch>:<seq>`` whatever the channel count. The frame goes
only to connections that got a message since their last one (owed through the
channels' batches), the same text for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..protocol import Position, encode_frame
from .channelstate import ChannelState
from .member import Member


class Watermark:
    """The node's watermark and the connections on several channels that follow it.

    Args:
        channels: the hub's channel (or pattern) -> :class:`ChannelState` map.
        drained: True when no live NATS subscription has a message waiting
            (:meth:`Bus.drained <pushsvc.bus.Bus.drained>`).
        epoch: the stream's current epoch (None with history off: no watermark).

    Attributes:
        seq: the highest stream sequence handed to the hub (0: none yet).
        followers: connections on several channels whose transport takes the
            watermark (:attr:`Transport.watermarks
            <pushsvc.core.transport.Transport.watermarks>`).
    """

    __slots__ = ("_channels", "_drained", "_epoch", "_owed", "_starting", "followers", "seq")

    def __init__(
        self,
        channels: dict[str, ChannelState],
        drained: Callable[[], bool],
        epoch: Callable[[], str | None],
    ) -> None:
        self._channels = channels
        self._drained = drained
        self._epoch = epoch
        self.seq = 0
        self.followers: set[Member] = set()
        self._owed: set[Member] = set()
        self._starting: set[Member] = set()  # subscribing the channels it opened with

    def track(self, member: Member, planned: int = 0) -> None:
        """``member``'s channels changed (or ``planned`` are about to be subscribed).

        A connection follows the watermark from the moment it has, or is about to
        have, several channels (an SSE stream opened on several follows it before
        its first replay) until it has none left; meanwhile its transport frames
        messages without ids. With ``planned``, it gets no watermark until
        :meth:`started` (each channel resumes from the stream's position: an id
        written between two channels' replays would skip the second one's).
        Drops the channels' cached lists of followers.
        """
        transport = member.transport
        if not transport.watermarks or self._epoch() is None:
            return
        if member in self.followers:
            if member.channels:
                return
            self.forget(member)
            following = False
        elif max(len(member.channels), planned) > 1:
            self.followers.add(member)
            if planned:
                self._starting.add(member)
            following = True
        else:
            return
        transport.use_watermarks(following)
        member.outbox.reframe(direct=not following)
        for channel in member.channels:
            state = self._channels.get(channel)
            if state is not None:
                state.followers = None

    def forget(self, member: Member) -> None:
        """``member`` no longer follows the watermark (it has no channel, or is gone)."""
        self.followers.discard(member)
        self._owed.discard(member)
        self._starting.discard(member)

    def started(self, member: Member) -> None:
        """``member`` subscribed every channel it opened with (see :meth:`track`)."""
        if member in self._starting:
            self._starting.discard(member)
            self._owed.add(member)

    def owe_channel(self, state: ChannelState) -> None:
        """``state``'s batch is being handed out: its followers are owed a ``position``."""
        followers = state.followers
        if followers is None:
            marked = self.followers
            followers = state.followers = tuple(s for s in state.clients if s in marked)
        if followers:
            self._owed.update(followers)

    def owe(self, members: Iterable[Member]) -> None:
        """``members`` got messages: each is owed a ``position`` frame."""
        self._owed.update(members)

    @property
    def owed(self) -> bool:
        """True while some follower is owed a ``position`` frame."""
        return bool(self._owed)

    def offer(self) -> None:
        """Write the watermark to every owed follower for which it is safe now.

        Does nothing while a live subscription has a message waiting; a follower
        not yet settled (see :meth:`_settled`) stays owed for the next offer.
        """
        seq = self.seq
        if not seq or not self._drained():
            return
        frame = ""
        nbytes = 0
        kept: list[Member] = []
        for member in self._owed:
            if member.closed:
                continue
            if not self._settled(member, seq):
                kept.append(member)
                continue
            if not frame:
                raw = encode_frame(Position(id=f"{self._epoch() or ''}:{seq}"))
                frame, nbytes = raw.decode(), len(raw)
            member.send(frame, nbytes)
        self._owed = set(kept)

    def _settled(self, member: Member, seq: int) -> bool:
        """True when every message of ``member``'s channels up to ``seq`` is in its outbox."""
        if member in self._starting:
            return False
        channels = self._channels
        for channel in member.channels:
            state = channels.get(channel)
            if state is None:
                continue
            if state.batch or state.flight is not None or state.catchup is not None:
                return False
            seam = state.pending.get(member)
            if seam is not None and (seam.buffer is not None or seam.threshold > seq):
                return False
        return True
