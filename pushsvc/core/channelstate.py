"""One channel's local state in the hub, and the frames it hands out.

:class:`ChannelState` is what the hub (:mod:`pushsvc.core.hub`) keeps per
channel: the live set, the open batch, the flight, the clients recovering at the
seam (:class:`Seam`), and the outage catch-up point (:mod:`pushsvc.core.recovery`).
"""

from __future__ import annotations

from ..bus import StoredMessage
from ..channels import is_pattern
from ..protocol import Message, PublishedBy, encode_frame, payload_to_data, publisher_of
from .flight import Flight
from .member import Member
from .outbox import Outbox, utf8_len


class Seam:
    """A session catching up on one channel: buffers live frames, then filters by seq."""

    __slots__ = ("buffer", "threshold")

    def __init__(self) -> None:
        self.buffer: list[tuple[int | None, str, int]] | None = []
        self.threshold = 0


class ChannelState:
    """Local state of one channel.

    Attributes:
        clients: the live set (every live frame goes to each).
        boxes: the live set's outboxes as a tuple, the fan-out's snapshot, kept until the
            live set changes (None then): a message to a settled channel does not
            first walk every member (1000 sessions cold in cache: ~70 us before
            the first write).
        followers: the live set's members that follow the node's watermark
            (:mod:`pushsvc.core.watermark`), cached as ``boxes`` is (None: stale).
        pending: sessions recovering with ``since`` (see :class:`Seam`).
        last_seq: every message of the channel with seq <= ``last_seq`` stored while
            the node held the channel has been handed to the live set; None until
            learnt (first live frame, a recovery, or the lookup at creation).
        catchup: while not None (NATS connection lost, catch-up not done), live
            frames are buffered here instead of delivered.
        catchup_since: ``last_seq`` when the connection dropped.
        catchup_seen: the highest seq the node had delivered on any channel when
            the connection dropped: everything of this channel up to it arrived.
        skip: live sessions the batch holds frames for that they must not get (a
            message naming them in ``Pushsvc-Exclude-Client``: their own no-echo
            publish): the indexes of those frames; handed the rest through their
            own buffer at the flush, as ``late`` sessions are.
    """

    __slots__ = (
        "batch",
        "batch_bytes",
        "boxes",
        "catchup",
        "catchup_seen",
        "catchup_since",
        "clients",
        "flight",
        "flush_scheduled",
        "followers",
        "last_seq",
        "late",
        "pending",
        "skip",
    )

    def __init__(self) -> None:
        self.batch: list[str] = []  # live frames not yet handed to the live set
        self.batch_bytes = 0  # UTF-8 bytes of the batch joined by "\n"
        self.flush_scheduled = False  # in the hub's dirty list
        self.flight: Flight | None = None  # earlier batches, still being written
        # live sessions that joined while the batch had frames: the index of the
        # first frame they are owed (they were not subscribed for the ones before)
        self.late: dict[Member, int] = {}
        self.skip: dict[Member, list[int]] = {}
        self.clients: set[Member] = set()
        self.boxes: tuple[Outbox, ...] | None = None
        self.followers: tuple[Member, ...] | None = None
        self.pending: dict[Member, Seam] = {}
        self.last_seq: int | None = None
        # (seq, frame, nbytes, the session not to hand it to or None)
        self.catchup: list[tuple[int | None, str, int, Member | None]] | None = None
        self.catchup_since: int | None = None
        self.catchup_seen = 0


def encode_message(
    channel: str,
    payload: bytes,
    seq: int | None,
    pattern: str | None = None,
    publisher: PublishedBy | None = None,
) -> tuple[str, int]:
    """Encode one ``message`` frame: returns ``(text, utf8_byte_length)``.

    ``pattern``: the wildcard subscription delivering it (``channel`` is concrete);
    ``publisher``: who published it (:func:`~pushsvc.protocol.publisher_of` of its
    NATS headers), or None.
    """
    data, encoding = payload_to_data(payload)
    raw = encode_frame(
        Message(
            channel=channel,
            data=data,
            seq=seq,
            encoding=encoding,
            pattern=pattern,
            publisher=publisher,
        )
    )
    return raw.decode(), len(raw)


def encode_stored(key: str, stored: StoredMessage) -> tuple[str, int]:
    """Encode a replayed message for the subscription ``key`` (a channel or a pattern)."""
    publisher = publisher_of(stored.headers)
    if is_pattern(key):
        return encode_message(stored.channel or key, stored.payload, stored.seq, key, publisher)
    return encode_message(key, stored.payload, stored.seq, None, publisher)


def owed_frames(batch: list[str], start: int, skipped: list[int] | None) -> list[str]:
    """The frames of ``batch`` a session is owed: from ``start``, less ``skipped`` indexes."""
    if not skipped:
        return batch[start:]
    return [f for i, f in enumerate(batch) if i >= start and i not in skipped]


def send_frames(session: Member, frames: list[str]) -> None:
    """Queue ``frames`` (encoded objects, in order) to one session as one text."""
    if frames:
        nbytes = sum(utf8_len(f) for f in frames) + len(frames) - 1
        session.send(frames[0] if len(frames) == 1 else "\n".join(frames), nbytes)
