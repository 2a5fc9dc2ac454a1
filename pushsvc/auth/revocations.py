"""Revocations that survive restarts: kept in a JetStream key-value bucket.

A revocation (``{"sub": S}`` and/or ``{"jti": J}``, optional ``"ttl"`` seconds)
reaches every running node on ``<prefix>-control.disconnect``. Each node that
receives one writes it to the bucket ``PUSHSVC_REVOCATION_BUCKET`` (default
``PUSHSVC_REVOCATIONS``); every node loads the bucket at start and watches it while
running, so a node started later refuses the revoked tokens too, and an operator
can write an entry directly.

Entries (NATS docs, "Key/Value Store"; per-message TTL needs nats-server 2.11+):

- key ``jti.<base64url(jti)>`` or ``sub.<base64url(sub)>`` (unpadded base64url
  keeps any token id or user name inside the KV key grammar);
- value: JSON ``{"sub"?: S, "jti"?: J, "ttl": seconds, "at": unix seconds}``
  (``at``: when it was revoked; a ``sub`` revocation refuses that user's tokens
  issued (``iat``) at or before it);
- written with a per-message TTL of ``ttl`` seconds (``Nats-TTL``), so JetStream
  removes the entry when the revocation ends;
- written with ``Nats-Msg-Id`` = a hash of the control message and its arrival
  time (5 s resolution), so the N nodes that receive the same control message
  store it once (JetStream de-duplication).

At start the bucket is read by JetStream batch direct gets (every entry, then
done); while running, a KV watch (an ordered consumer) delivers new entries.
Applying an entry twice changes nothing. Nothing here is on the delivery path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec

from ..bus import Bus, Unavailable
from ..bus.buckets import Entry, NoDirectGets
from .tokens import MAX_REVOCATION_TTL, Revocation

log = logging.getLogger("pushsvc.auth.revocations")


class StoredRevocation(msgspec.Struct, omit_defaults=True):
    """The value of one bucket entry (JSON)."""

    at: float
    ttl: float
    sub: str | None = None
    jti: str | None = None

    def revocation(self) -> Revocation:
        """The :class:`~pushsvc.auth.tokens.Revocation` this entry stores."""
        return Revocation(sub=self.sub, jti=self.jti, ttl=self.ttl)


def entry_keys(revocation: Revocation) -> list[str]:
    """KV keys of a revocation: ``jti.<b64url>`` and/or ``sub.<b64url>``."""
    keys = []
    for kind, value in (("jti", revocation.jti), ("sub", revocation.sub)):
        if value is not None:
            encoded = base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")
            keys.append(f"{kind}.{encoded}")
    return keys


Applier = Callable[[Revocation, float], None]


class RevocationStore:
    """The node's view of the revocation bucket.

    Args:
        bus: the node's connected :class:`~pushsvc.bus.Bus` (all NATS access).
        bucket: bucket name (``PUSHSVC_REVOCATION_BUCKET``).
        apply: called with ``(revocation, revoked_at)`` for every revocation
            recorded here, loaded or watched (revoked_at in Unix seconds): refuse
            the tokens and close their sessions. Must not block.
    """

    def __init__(self, bus: Bus, bucket: str, apply: Applier) -> None:
        self.bus = bus
        self.bucket = bucket
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        #: entries applied since start (loaded + watched)
        self.applied = 0
        self._initial = asyncio.Event()  # the watch delivered its initial values

    async def start(self, timeout: float) -> None:
        """Open (or create) the bucket, apply every live entry, then keep watching.

        Returns once every entry stored before the call has been applied.

        Raises:
            Unavailable: the bucket could not be opened or read within ``timeout`` s.
        """
        try:
            async with asyncio.timeout(timeout):
                kv, _ = await self.bus.bucket(
                    self.bucket,
                    MAX_REVOCATION_TTL,
                    file=True,
                    description="pushsvc token revocations",
                )
                # Watch first (every later write arrives there), then read every
                # stored entry by batch direct gets: the watch's own "initial values
                # done" marker can come before the values it announces (nats-py
                # decides it from consumer info), so the load does not rely on it.
                watcher = kv.watch()
                first = await anext(watcher)  # the watch is started (its consumer exists)
                self._task = asyncio.ensure_future(self._watch(watcher, first))
                try:
                    async for entry in kv.entries(">"):
                        self._entry(entry.value, entry.operation)
                except NoDirectGets:
                    # a bucket created elsewhere without allow_direct: the watch's
                    # marker is all there is
                    log.warning("bucket %s has no allow_direct; loading by its watch", self.bucket)
                    await self._initial.wait()
        except (TimeoutError, Unavailable, StopAsyncIteration) as exc:
            await self.close()
            raise Unavailable(
                f"revocation bucket {self.bucket} could not be read ({type(exc).__name__}: {exc})"
            ) from None
        log.info("revocations loaded from bucket %s (%d applied)", self.bucket, self.applied)

    async def _watch(self, watcher: AsyncIterator[Entry | None], first: Entry | None) -> None:
        entry: Entry | None = first
        while True:
            if entry is None:
                self._initial.set()
            else:
                self._entry(entry.value, entry.operation)
            try:
                entry = await anext(watcher)
            except (StopAsyncIteration, Unavailable):
                return

    def _entry(self, value: bytes | None, operation: str | None) -> None:
        if operation is not None or not value:
            return  # a delete/purge marker (the entry expired or was removed)
        try:
            stored = msgspec.json.decode(value, type=StoredRevocation)
        except (msgspec.DecodeError, RecursionError):
            log.warning("ignored malformed entry in revocation bucket %s", self.bucket)
            return
        revocation = stored.revocation()
        if not revocation.valid:
            log.warning("ignored invalid entry in revocation bucket %s", self.bucket)
            return
        if stored.at + stored.ttl <= time.time():
            return  # over already
        self.applied += 1
        self._apply(revocation, stored.at)

    def record(self, revocation: Revocation, at: float, payload: bytes) -> None:
        """A control message arrived: apply it now, store it in the background.

        ``at``: when it arrived (Unix seconds). A failed write is logged: the
        revocation still holds on the running nodes that received the message.
        """
        self._apply(revocation, at)
        task = asyncio.ensure_future(self._store(revocation, at, payload))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store(self, revocation: Revocation, at: float, payload: bytes) -> None:
        try:
            await self.put(revocation, at, payload)
        except Unavailable as exc:
            log.error("revocation applied on this node but not stored in NATS: %s", exc)

    async def put(self, revocation: Revocation, at: float, payload: bytes) -> None:
        """Store ``revocation`` (revoked at ``at``, Unix seconds) for ``revocation.ttl`` s.

        ``payload`` (the control message) is hashed into ``Nats-Msg-Id`` so nodes
        writing the same revocation store it once.

        Raises:
            Unavailable: JetStream did not take it.
        """
        value = msgspec.json.encode(
            StoredRevocation(at=at, ttl=revocation.ttl, sub=revocation.sub, jti=revocation.jti)
        )
        # the same control message seen by every node within a few seconds: one entry
        digest = hashlib.sha256(payload + str(int(at) // 5).encode()).hexdigest()[:32]
        for key in entry_keys(revocation):
            await self.bus.kv_put(
                self.bucket, key, value, ttl=revocation.ttl, msg_id=f"{key}:{digest}"
            )

    async def close(self) -> None:
        """Finish pending writes (at most 2 s), stop watching."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=2)
        if self._task is not None:
            self._task.cancel()
            self._task = None
