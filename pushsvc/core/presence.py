"""Presence: who is subscribed to a channel, cluster-wide, in a JetStream KV bucket.

For channels matching ``PUSHSVC_PRESENCE_CHANNELS`` every subscribed session is
*present*: the node serving it writes one KV entry per (channel, session) into
the bucket ``PUSHSVC_PRESENCE_BUCKET`` (created by :meth:`Bus.bucket
<pushsvc.bus.Bus.bucket>`, ``max_age`` = ``PUSHSVC_PRESENCE_TTL`` seconds):

- key ``<channel>.<client>``: channel tokens are ``[A-Za-z0-9_-]`` and client
  ids ``<node>-<n>`` (hex and digits), all inside the KV key grammar
  ``[-/_=.A-Za-z0-9]`` (NATS docs, "Key/Value Store"; nats-py ``VALID_KEY_RE``),
  and a client id has no dot, so ``<channel>.*`` selects exactly one channel's
  entries;
- value: the JSON of :class:`~pushsvc.protocol.ClientInfo`
  ``{client, user, node, info?}``.

The owning node re-puts its entries every third of the bucket's TTL, so they
live as long as the node does (and come back within that time after NATS lost
its memory store: the bucket is re-created when a put finds no stream); a
crashed node's entries expire within the TTL; a clean unsubscribe or close
deletes the entry at once. A write that fails
(NATS away) is repaired by the next refresh. Writes of one key leave the node in
the order they were made (one NATS connection; each write's PUB is queued in
the same step that checks the key is still local), so a refresh can never
resurrect an entry deleted before it.

Reads (:meth:`PresenceRegistry.read`) scan ``<channel>.*`` by JetStream batch
direct gets (the bucket keeps one value per key and allows direct gets), delete
markers skipped, after this node's pending writes have finished (a session that
subscribed on this node before the read is listed): no consumer per read, counts
are exact, the list is capped at ``PUSHSVC_PRESENCE_LIMIT``.

Presence needs JetStream: with history off or no JetStream every read raises
:class:`~pushsvc.bus.Unavailable` and nothing is written.

:meth:`PresenceRegistry.read_for` is the one rule before a read on a caller's
behalf (the ``presence`` / ``presence_stats`` commands and ``GET /presence``):
channel grammar, then the caller's ``presence`` grant, then
``PUSHSVC_PRESENCE_CHANNELS``, then the read. Each refusal is a
:class:`PresenceRefused` subclass carrying its error code (docs/protocol.md,
"Error codes") and its HTTP status (docs/protocol.md, ``GET /presence``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from .. import metrics
from ..auth.tokens import Principal
from ..bus import Bus, Unavailable
from ..bus.buckets import Bucket, BucketGone, NoDirectGets
from ..channels import InvalidChannel, concrete_match, validate_channel
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    INVALID_CHANNEL,
    NO_INFO,
    UNAVAILABLE,
    ClientInfo,
)
from .member import Member

log = logging.getLogger("pushsvc.core.presence")

REFRESH_CONCURRENCY = 256  # KV puts in flight at once during a refresh
_decode_info = msgspec.json.Decoder(ClientInfo)


class PresenceRefused(Exception):
    """A presence read refused on a caller's behalf; ``str(exc)`` is safe to show it.

    Attributes:
        code: the ``error`` frame code (docs/protocol.md, "Error codes").
        status: the HTTP status of ``GET /presence`` (docs/protocol.md).
        retry_after: seconds to wait before retrying (``unavailable``), else None.
    """

    code: ClassVar[str]
    status: ClassVar[int]

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PresenceInvalidChannel(PresenceRefused):
    """The channel breaks the grammar: ``invalid_channel``, HTTP 422."""

    code = INVALID_CHANNEL
    status = 422


class PresenceForbidden(PresenceRefused):
    """No ``presence`` grant covers the channel: ``forbidden``, HTTP 403."""

    code = FORBIDDEN
    status = 403


class PresenceNotEnabled(PresenceRefused):
    """The channel is outside ``PUSHSVC_PRESENCE_CHANNELS``: ``bad_request``, HTTP 400."""

    code = BAD_REQUEST
    status = 400


class PresenceUnavailable(PresenceRefused):
    """No JetStream, NATS away or the bucket did not answer: ``unavailable``, HTTP 503
    (with ``retry_after``)."""

    code = UNAVAILABLE
    status = 503


@dataclass
class Snapshot:
    """One channel's presence as read from the bucket.

    Attributes:
        clients: present sessions, at most the limit asked for.
        clients_total: exact number of present sessions.
        users: exact number of distinct users among them.
    """

    clients: list[ClientInfo] = field(default_factory=list)
    clients_total: int = 0
    users: int = 0

    @property
    def truncated(self) -> bool:
        """True when ``clients`` lists fewer sessions than are present."""
        return len(self.clients) < self.clients_total


class PresenceRegistry:
    """This node's presence entries and cluster-wide presence reads.

    Args:
        settings: ``presence_channels`` (patterns where presence is on; none = off),
            ``presence_bucket``, ``presence_ttl`` (seconds), ``presence_limit``,
            ``publish_timeout`` (bound on a read, seconds).
        bus: the node's bus (owns the NATS connection and creates the bucket).
        node: this node's name (``PUSHSVC_NODE_NAME``), written in every entry.

    Wire it to the hub's ``on_join``/``on_leave`` with :meth:`joined` and
    :meth:`left`; :meth:`start` after the bus, :meth:`stop` before it closes.
    """

    def __init__(self, settings: Settings, bus: Bus, node: str) -> None:
        self.settings = settings
        self.bus = bus
        self.node = node
        self.patterns = tuple(settings.presence_channels)
        self.ttl = settings.presence_ttl
        self._kv: Bucket | None = None
        self._local: dict[str, bytes] = {}  # key -> encoded ClientInfo
        self._opening: asyncio.Task[Bucket] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def enabled(self, channel: str) -> bool:
        """True when presence is on for ``channel`` (``PUSHSVC_PRESENCE_CHANNELS``)."""
        return concrete_match(self.patterns, channel)

    @property
    def entries(self) -> int:
        """Presence entries this node owns (one per present session and channel)."""
        return len(self._local)

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Open the bucket (when presence is configured) and start refreshing.

        Never raises: without JetStream presence is unavailable (logged once), and
        the refresh loop keeps trying to open the bucket.
        """
        if not self.patterns:
            return
        try:
            await self._bucket()
        except Unavailable as exc:
            log.warning("presence is unavailable: %s", exc)
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        """Stop refreshing and wait for pending writes (deletes of closed sessions)."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _bucket(self) -> Bucket:
        """The KV bucket, opened once (concurrent callers share one attempt).

        Raises:
            Unavailable: the bucket cannot be created or opened now.
        """
        if self._kv is not None:
            return self._kv
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> Bucket:
        kv, ttl = await self.bus.bucket(self.settings.presence_bucket, self.ttl)
        self.ttl = ttl or self.ttl
        self._kv = kv
        return kv

    # --- hub observers ---------------------------------------------------------------
    def key(self, session: Member, channel: str) -> str:
        """KV key of ``session`` in ``channel``: ``<channel>.<client>``."""
        return f"{channel}.{session.id}"

    def joined(self, session: Member, channel: str) -> None:
        """``session`` subscribed to ``channel``: write its entry (presence channels only)."""
        if not self.enabled(channel):
            return
        principal = session.principal
        info = msgspec.Raw(principal.info) if principal.info is not None else NO_INFO
        key = self.key(session, channel)
        self._local[key] = msgspec.json.encode(
            ClientInfo(client=session.id, user=principal.sub, node=self.node, info=info)
        )
        metrics.PRESENCE_ENTRIES.set(len(self._local))
        self._spawn(self._put(key))

    def left(self, session: Member, channel: str) -> None:
        """``session`` left ``channel``: delete its entry at once."""
        if not self._local:
            return
        key = self.key(session, channel)
        if self._local.pop(key, None) is None:
            return
        metrics.PRESENCE_ENTRIES.set(len(self._local))
        self._spawn(self._delete(key))

    async def _put(self, key: str) -> None:
        """Write ``key`` if it is still local (checked in the step that queues the PUB)."""
        kv = self._kv
        value = self._local.get(key)
        if kv is None or value is None:
            return
        try:
            await kv.put(key, value)
        except BucketGone:
            self._lost(kv)
        except Unavailable as exc:
            log.debug("presence put of %s failed (%s); the refresh retries", key, exc)

    def _lost(self, kv: Bucket) -> None:
        """Nothing stores ``kv``'s subjects any more (NATS lost its memory store on a
        restart): forget it, so the next refresh creates the bucket again."""
        if self._kv is kv:
            self._kv = None
            log.warning("presence bucket %s is gone; re-creating it", self.settings.presence_bucket)

    async def _delete(self, key: str) -> None:
        kv = self._kv
        if kv is None:
            return
        try:
            await kv.delete(key)
        except Unavailable as exc:
            # the entry expires within the TTL since nobody refreshes it any more
            log.warning("presence delete of %s failed (%s); it expires within the TTL", key, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_loop(self) -> None:
        """Every third of the TTL: re-put every local entry (re-opening the bucket if needed)."""
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            if not self.bus.is_connected:
                continue
            try:
                await self._bucket()
            except Unavailable as exc:
                log.warning("presence is unavailable: %s", exc)
                continue
            keys = list(self._local)
            for i in range(0, len(keys), REFRESH_CONCURRENCY):
                await asyncio.gather(*(self._put(k) for k in keys[i : i + REFRESH_CONCURRENCY]))

    # --- reads -------------------------------------------------------------------------
    async def read_for(self, principal: Principal | None, channel: str, limit: int) -> Snapshot:
        """:meth:`read` on a caller's behalf, after the checks, in this order:
        channel grammar, the caller's ``presence`` grant, ``PUSHSVC_PRESENCE_CHANNELS``.

        Args:
            principal: the caller's verified token, or None for an API key (any channel).
            channel: the channel asked for, as the caller sent it.
            limit: most sessions listed (0: counts only).

        Raises:
            PresenceInvalidChannel: ``channel`` breaks the grammar.
            PresenceForbidden: no ``presence`` grant of ``principal`` covers it.
            PresenceNotEnabled: it is outside ``PUSHSVC_PRESENCE_CHANNELS``.
            PresenceUnavailable: the read failed (see :meth:`read`).
        """
        try:
            channel = validate_channel(channel)
        except InvalidChannel as exc:
            raise PresenceInvalidChannel(str(exc)) from None
        if principal is not None and not principal.can_see_presence(channel):
            raise PresenceForbidden(f"not allowed to see presence of {channel}")
        if not self.enabled(channel):
            raise PresenceNotEnabled(f"presence is not enabled for {channel}")
        try:
            return await self.read(channel, limit)
        except Unavailable as exc:
            raise PresenceUnavailable(f"presence is unavailable: {exc}", exc.retry_after) from None

    async def read(self, channel: str, limit: int) -> Snapshot:
        """Present sessions of ``channel`` on every node: at most ``limit`` listed,
        counts exact. Bounded by ``publish_timeout`` seconds.

        Raises:
            Unavailable: presence is off for the channel's node (no JetStream), NATS
                is not connected, or the bucket did not answer in time.
        """
        if not self.bus.is_connected:
            raise Unavailable("NATS is not connected")
        kv = await self._bucket()
        if self._tasks:
            # read this node's own writes: joins and leaves made before the read
            await asyncio.wait(list(self._tasks), timeout=self.settings.publish_timeout)
        snapshot = Snapshot()
        users: set[str] = set()
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                async for entry in kv.entries(f"{channel}.*"):
                    if entry.operation or not entry.value:
                        continue  # a delete/purge marker: the session left
                    try:
                        client = _decode_info.decode(entry.value)
                    except msgspec.DecodeError:
                        log.warning("ignored a malformed presence entry %s", entry.key)
                        continue
                    snapshot.clients_total += 1
                    users.add(client.user)
                    if len(snapshot.clients) < limit:
                        snapshot.clients.append(client)
        except TimeoutError:
            raise Unavailable("presence read timed out") from None
        except Unavailable as exc:
            if isinstance(exc, BucketGone | NoDirectGets):
                self._lost(kv)
            raise Unavailable(f"presence read failed ({exc})") from None
        snapshot.users = len(users)
        return snapshot
