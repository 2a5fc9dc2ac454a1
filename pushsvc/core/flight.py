"""A channel's batches written to a large live set in slices, one slice per loop turn.

With a write delay (``PUSHSVC_WRITE_DELAY``) the hub writes a channel's window
to at most :data:`FAN_OUT_SLICE` sockets per event-loop iteration, so that
publishers (emits answered), handshakes and pings are served while it goes out.
A :class:`Flight` is that write in progress; a batch ready meanwhile joins it
(:meth:`Flight.add`). The hub (:mod:`pushsvc.core.hub`) owns the flights, drives them
(one :meth:`Flight.write` per loop iteration) and finishes one at once when
order requires it; each slice goes to the sockets through
:func:`~pushsvc.core.outbox.fan_out`, like an ordinary flush.
"""

from __future__ import annotations

from collections import deque

from .outbox import Outbox, fan_out

#: with a write delay, the sockets one channel's flush writes per event-loop
#: iteration (~0.1 ms of ``send()`` calls on the dev VM): a larger live set is
#: written in slices so that publishers, handshakes and pings are served between
#: them, and the next window fills while this one is written (see :class:`Flight`).
#: Chosen by measurement (docs/benchmarks.md, "Serial emits"): 8, 16 and 32 gave
#: 3.7-4.4x, 2.5-3.8x and 1.8-2.3x the serial-emit deliveries/s of no delay.
FAN_OUT_SLICE = 8


class Segment:
    """Sessions owed the same frames: ``parts`` (batch texts, in order), written from ``pos``."""

    __slots__ = ("nbytes", "parts", "pos", "sessions", "text")

    def __init__(self, sessions: tuple[Outbox, ...], text: str, nbytes: int) -> None:
        self.sessions = sessions
        self.parts = [text]
        self.text: str | None = text  # the parts joined by "\n" (None: join again)
        self.nbytes = nbytes  # UTF-8 bytes of the joined text
        self.pos = 0  # sessions[:pos] have been written

    def joined(self) -> str:
        """The frame text for this segment's sessions."""
        if self.text is None:
            self.text = "\n".join(self.parts)
        return self.text


class Flight:
    """A channel's batches being written to a live set larger than the slice size.

    With a write delay a large live set is written ``fan_out_slice`` sockets per
    loop iteration, so other work (emits answered, handshakes, pings, NATS reads)
    runs between slices instead of waiting for the whole fan-out. The flight is a
    queue of :class:`Segment`: sessions owed the same frames. A batch that is
    ready while a flight goes on does not wait for it: it is added to what every
    session not yet written is owed (the rest of the current segment and the
    queued ones: they get both batches in one frame), and the sessions that were
    written already get it in a new segment at the end. So each socket gets every
    batch in order, at most one write per visit, and a message waits for at most
    one sweep over the live set, not for the previous batch's sweep and then its
    own. A session that leaves before it is written is handed what it is owed
    through its own buffer and taken out of its segment.
    """

    __slots__ = ("segments", "single")

    def __init__(self, sessions: tuple[Outbox, ...], text: str, nbytes: int, single: bool) -> None:
        self.segments: deque[Segment] = deque([Segment(sessions, text, nbytes)])
        self.single = single

    def largest(self) -> int:
        """UTF-8 bytes of the largest frame still to write."""
        return max(seg.nbytes for seg in self.segments)

    def add(self, live: tuple[Outbox, ...], text: str, nbytes: int) -> None:
        """Add a batch owed to ``live`` (the live set, less sessions that joined during it)."""
        segments = self.segments
        head = segments[0]
        if head.pos:  # its written sessions are owed the new batch alone, as the others
            head.sessions = head.sessions[head.pos :]
            head.pos = 0
        waiting: set[Outbox] = set()
        for seg in segments:
            seg.parts.append(text)
            seg.nbytes += 1 + nbytes
            seg.text = None
            waiting.update(seg.sessions)
        written = tuple(s for s in live if s not in waiting)
        if written:
            segments.append(Segment(written, text, nbytes))

    def leave(self, session: Outbox) -> tuple[str, int] | None:
        """``session`` leaves the live set: what it is owed and not yet written, if anything.

        It is taken out of its segment, so that it is not written later, even if it
        joins again meanwhile (it is then owed only the batches after that).
        """
        for seg in self.segments:
            sessions = seg.sessions
            if session in sessions:
                i = sessions.index(session)
                if i >= seg.pos:
                    seg.sessions = sessions[:i] + sessions[i + 1 :]
                    return seg.joined(), seg.nbytes
        return None

    def write(self, count: int) -> bool:
        """Write the next ``count`` sessions (all with ``count`` < 0); True when done."""
        segments = self.segments
        while segments and count:
            seg = segments[0]
            pos = seg.pos
            end = len(seg.sessions) if count < 0 else min(len(seg.sessions), pos + count)
            chunk = seg.sessions[pos:end]
            seg.pos = end
            if count > 0:
                count -= end - pos
            if end >= len(seg.sessions):
                segments.popleft()
            fan_out(chunk, seg.joined(), seg.nbytes, single=self.single)
        return not segments
