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
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from jetstreamext import InvalidResponseError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .auth import Revocation
from .bus import Bus, Unavailable

log = logging.getLogger("pushsvc.revocations")

MAX_TTL = 365 * 86400.0  # s: the longest revocation accepted (see auth.parse_revocation)


class StoredRevocation(msgspec.Struct, omit_defaults=True):
    """The value of one bucket entry (JSON)."""

    at: float
    ttl: float
    sub: str | None = None
    jti: str | None = None

    def revocation(self) -> Revocation:
        """The :class:`~pushsvc.auth.Revocation` this entry stores."""
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
        bus: the node's connected :class:`~pushsvc.bus.Bus` (its JetStream context).
        bucket: bucket name (``PUSHSVC_REVOCATION_BUCKET``).
        replicas: bucket replicas (``PUSHSVC_STREAM_REPLICAS``).
        apply: called with ``(revocation, revoked_at)`` for every entry loaded or
            watched (revoked_at in Unix seconds); must not block.
    """

    def __init__(self, bus: Bus, bucket: str, replicas: int, apply: Applier) -> None:
        self.bus = bus
        self.bucket = bucket
        self.replicas = replicas
        self._apply = apply
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        #: entries applied since start (loaded + watched)
        self.applied = 0
        self._initial = asyncio.Event()  # the watch delivered its initial values

    async def start(self, timeout: float) -> None:
        """Open (or create) the bucket, apply every live entry, then keep watching.

        Returns once every entry stored before the call has been applied.

        Raises:
            Unavailable: the bucket could not be opened or read within ``timeout`` s.
        """
        js = self.bus.js
        assert js is not None
        try:
            async with asyncio.timeout(timeout):
                try:
                    self._kv = await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv = await js.create_key_value(
                        KeyValueConfig(
                            bucket=self.bucket,
                            description="pushsvc token revocations",
                            history=1,
                            ttl=MAX_TTL,
                            storage=StorageType.FILE,
                            replicas=self.replicas,
                            direct=True,  # the load below reads it by batch direct gets
                        )
                    )
                # Watch first (every later write arrives there), then read every
                # stored entry by batch direct gets: the watch's own "initial values
                # done" marker can come before the values it announces (nats-py
                # decides it from consumer info), so the load does not rely on it.
                watcher = await self._kv.watchall()
                self._task = asyncio.ensure_future(self._watch(watcher))
                try:
                    await self._load()
                except nats.errors.NoRespondersError:
                    # a bucket created elsewhere without allow_direct: the watch's
                    # marker is all there is
                    log.warning("bucket %s has no allow_direct; loading by its watch", self.bucket)
                    await self._initial.wait()
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, InvalidResponseError) as exc:
            await self.close()
            raise Unavailable(
                f"revocation bucket {self.bucket} could not be read ({type(exc).__name__}: {exc})"
            ) from None
        log.info("revocations loaded from bucket %s (%d applied)", self.bucket, self.applied)

    async def _load(self) -> None:
        """Apply every entry the bucket holds (one message per key: history is 1)."""
        async for raw in self.bus.scan(f"KV_{self.bucket}", f"$KV.{self.bucket}.>"):
            self._entry(raw.data, (raw.headers or {}).get("KV-Operation"))

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:
                self._initial.set()
            else:
                self._entry(entry.value, entry.operation)

    def _entry(self, value: bytes | None, operation: str | None) -> None:
        if operation is not None or not value:
            return  # a delete/purge marker (the entry expired or was removed)
        try:
            stored = msgspec.json.decode(value, type=StoredRevocation)
        except (msgspec.DecodeError, RecursionError):
            log.warning("ignored malformed entry in revocation bucket %s", self.bucket)
            return
        if (stored.sub is None and stored.jti is None) or not 0 < stored.ttl <= MAX_TTL:
            log.warning("ignored invalid entry in revocation bucket %s", self.bucket)
            return
        if stored.at + stored.ttl <= time.time():
            return  # over already
        self.applied += 1
        self._apply(stored.revocation(), stored.at)

    async def put(self, revocation: Revocation, at: float, payload: bytes) -> None:
        """Store ``revocation`` (revoked at ``at``, Unix seconds) for ``revocation.ttl`` s.

        ``payload`` (the control message) is hashed into ``Nats-Msg-Id`` so nodes
        writing the same revocation store it once.

        Raises:
            Unavailable: JetStream did not take it.
        """
        js = self.bus.js
        if js is None or self._kv is None:
            raise Unavailable("revocation bucket not open")
        value = msgspec.json.encode(
            StoredRevocation(at=at, ttl=revocation.ttl, sub=revocation.sub, jti=revocation.jti)
        )
        # the same control message seen by every node within a few seconds: one entry
        digest = hashlib.sha256(payload + str(int(at) // 5).encode()).hexdigest()[:32]
        for key in entry_keys(revocation):
            try:
                await js.publish(
                    f"$KV.{self.bucket}.{key}",
                    value,
                    headers={"Nats-Msg-Id": f"{key}:{digest}"},
                    msg_ttl=max(1.0, revocation.ttl),
                    timeout=self.bus.settings.publish_timeout,
                )
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"revocation not stored ({type(exc).__name__})") from None

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
