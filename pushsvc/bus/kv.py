"""JetStream KV buckets: presence and revocations live there.

:class:`KeyValueStore` creates or opens a bucket, writes an entry with a
per-message TTL (nats-server 2.11+, ADR-43) and scans a bucket's entries by
batch direct gets (:func:`~pushsvc.bus.reads.scan` over ``KV_<bucket>``, ADR-8),
so no watcher or consumer is needed. With history off there is no JetStream and
every call raises :class:`~pushsvc.bus.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, RawStreamMsg, StorageType
from nats.js.kv import KeyValue

from .buckets import Bucket
from .connection import Connection
from .directget import InvalidResponse
from .errors import Unavailable
from .reads import scan

log = logging.getLogger("pushsvc.bus")


class KeyValueStore:
    """The node's access to JetStream KV buckets.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def key_value(
        self,
        bucket: str,
        ttl: float,
        *,
        storage: StorageType = StorageType.MEMORY,
        description: str | None = None,
        marker_ttl: float | None = None,
    ) -> tuple[KeyValue, float]:
        """Create (or open) the JetStream KV bucket ``bucket`` (presence, revocations).

        New buckets keep one value per key (``history=1``) in ``storage`` with
        ``max_age`` = ``ttl`` seconds, ``stream_replicas`` replicas and direct gets
        allowed (read by :meth:`scan`; NATS docs, "Key/Value Store"); with
        ``marker_ttl`` (seconds) an entry removed by its TTL leaves a delete marker
        kept that long (``Nats-Marker-Reason``, nats-server 2.11+). A bucket
        that already exists with another configuration (e.g. another node's TTL)
        is opened as it is and its own TTL is returned, so every node works at the
        pace the bucket actually expires.

        Returns:
            ``(kv, ttl_seconds)``; ``ttl_seconds`` is 0 for a bucket without max age.

        Raises:
            Unavailable: history/JetStream is off, NATS is not connected, or
                JetStream did not create/open the bucket.
        """
        js = self.conn.js
        if not self.conn.history_enabled or js is None:
            raise Unavailable(f"bucket {bucket} needs JetStream (history is off)")
        if not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        config = KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            ttl=ttl,
            storage=storage,
            replicas=self.conn.settings.stream_replicas,
            direct=True,
            limit_marker_ttl=marker_ttl,
        )
        try:
            try:
                return await js.create_key_value(config), ttl
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # exists with a different configuration
                    raise
            kv = await js.key_value(bucket)
            status = await kv.status()
            actual = status.ttl or 0.0
            log.warning(
                "bucket %s exists with other settings (ttl %gs); using it as it is",
                bucket,
                actual,
            )
            return kv, actual
        except nats.errors.NoRespondersError:
            raise Unavailable("JetStream is not enabled on this NATS") from None
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"bucket {bucket}: {exc.description}") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"bucket {bucket} not ready ({type(exc).__name__})") from None

    async def bucket(
        self, name: str, ttl: float, *, file: bool = False, description: str | None = None
    ) -> tuple[Bucket, float]:
        """:meth:`key_value` as a :class:`~pushsvc.bus.buckets.Bucket` (``file``: on disk).

        Raises:
            Unavailable: see :meth:`key_value`.
        """
        storage = StorageType.FILE if file else StorageType.MEMORY
        kv, actual = await self.key_value(name, ttl, storage=storage, description=description)
        return Bucket(kv, self.conn, name), actual

    def scan(self, bucket: str, keys: str) -> AsyncIterator[RawStreamMsg]:
        """Every stored entry of ``bucket`` whose key matches ``keys`` (wildcards allowed).

        :func:`~pushsvc.bus.reads.scan` over the bucket's stream ``KV_<bucket>``
        and subjects ``$KV.<bucket>.<keys>`` (ADR-8); delete/purge markers are
        included (header ``KV-Operation``), for the caller to skip.

        Raises:
            Unavailable: NATS is not connected.
            (while iterating) nats.errors.Error, InvalidResponse: see
            :func:`~pushsvc.bus.reads.scan`.
        """
        return scan(self.conn.client(), f"KV_{bucket}", f"$KV.{bucket}.{keys}")

    async def put(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None, msg_id: str
    ) -> None:
        """Write ``key`` of ``bucket`` with a per-message TTL of ``ttl`` seconds (None:
        none, the bucket's max age applies).

        A KV put is a JetStream publish to ``$KV.<bucket>.<key>`` (ADR-8); nats-py's
        ``KeyValue.put`` sets no TTL, so it is published here with ``Nats-TTL``
        (nats-server 2.11+) and ``Nats-Msg-Id`` = ``msg_id`` (writers of the same
        entry inside the dedupe window store it once).

        Raises:
            Unavailable: JetStream did not take it within ``publish_timeout`` s.
        """
        js = self.conn.js
        if js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            await js.publish(
                f"$KV.{bucket}.{key}",
                value,
                headers={"Nats-Msg-Id": msg_id},
                msg_ttl=None if ttl is None else max(1.0, ttl),
                timeout=self.conn.settings.publish_timeout,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"{bucket} write failed ({type(exc).__name__})") from None

    async def entries(self, bucket: str, keys: str, *, timeout: float) -> list[tuple[str, bytes]]:
        """The live entries of ``bucket`` whose key matches ``keys``: ``[(key, value)]``.

        :meth:`scan` with delete/purge markers (and entries expired into a marker)
        skipped, bounded by ``timeout`` seconds.

        Raises:
            Unavailable: no JetStream, NATS away, the bucket does not exist or did
                not answer in time.
        """
        if self.conn.js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        prefix = len(f"$KV.{bucket}.")
        found: list[tuple[str, bytes]] = []
        try:
            async with asyncio.timeout(timeout):
                async for raw in self.scan(bucket, keys):
                    headers = raw.headers or {}
                    if headers.get("KV-Operation") or headers.get("Nats-Marker-Reason"):
                        continue
                    found.append(((raw.subject or "")[prefix:], raw.data or b""))
        except (
            TimeoutError,
            nats.errors.Error,
            nats.js.errors.Error,
            InvalidResponse,
        ) as exc:
            raise Unavailable(f"bucket {bucket} read failed ({type(exc).__name__})") from None
        return found

    async def delete(self, bucket: str, key: str) -> None:
        """Delete ``key`` of ``bucket`` (a ``KV-Operation: DEL`` marker, ADR-8).

        Raises:
            Unavailable: JetStream did not take it within ``publish_timeout`` s.
        """
        js = self.conn.js
        if js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            await js.publish(
                f"$KV.{bucket}.{key}",
                b"",
                headers={"KV-Operation": "DEL"},
                timeout=self.conn.settings.publish_timeout,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"{bucket} delete failed ({type(exc).__name__})") from None

    async def post(self, bucket: str, key: str, value: bytes, *, delete: bool = False) -> None:
        """Write (or with ``delete``, delete) ``key`` of ``bucket`` without waiting for
        the ack: a core publish to ``$KV.<bucket>.<key>`` (ADR-8), so writes of one
        node reach the bucket in the order they were made, at the cost of no
        confirmation (a lost write is the caller's to repair).

        Raises:
            Unavailable: NATS is not connected or refused the write.
        """
        nc = self.conn.client()
        headers = {"KV-Operation": "DEL"} if delete else None
        try:
            await nc.publish(f"$KV.{bucket}.{key}", value, headers=headers)
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"{bucket} write failed ({type(exc).__name__})") from None

    async def update(
        self,
        bucket: str,
        key: str,
        change: Callable[[bytes | None], bytes | None],
        *,
        attempts: int = 20,
    ) -> tuple[bytes | None, bytes | None]:
        """Change ``key`` of ``bucket`` atomically: compare-and-set, retried on conflict.

        Reads the current value (None: absent or deleted) by a direct get, writes
        ``change(value)`` (None: delete) with ``Nats-Expected-Last-Subject-Sequence``
        = the sequence read (JetStream optimistic concurrency, ADR-8 "update"), and
        starts again when another writer came first. ``change`` returning the value
        unchanged writes nothing.

        Returns:
            ``(before, after)``.

        Raises:
            Unavailable: NATS away, JetStream refused, or ``attempts`` conflicts in a row.
        """
        js = self.conn.js
        if js is None or not self.conn.is_connected:
            raise Unavailable("NATS is not connected")
        subject = f"$KV.{bucket}.{key}"
        timeout = self.conn.settings.publish_timeout
        for _ in range(attempts):
            try:
                try:
                    raw = await js.get_last_msg(f"KV_{bucket}", subject, direct=True)
                    seq = raw.seq or 0
                    deleted = bool((raw.headers or {}).get("KV-Operation")) or bool(
                        (raw.headers or {}).get("Nats-Marker-Reason")
                    )
                    before = None if deleted else (raw.data or b"")
                except nats.js.errors.NotFoundError:
                    seq, before = 0, None
                after = change(before)
                if after == before:
                    return before, after
                headers = {"Nats-Expected-Last-Subject-Sequence": str(seq)}
                if after is None:
                    headers["KV-Operation"] = "DEL"
                await js.publish(subject, after or b"", headers=headers, timeout=timeout)
                return before, after
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code not in (10071, 10164):  # wrong last sequence: retry
                    raise Unavailable(f"{bucket} update failed: {exc.description}") from None
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"{bucket} update failed ({type(exc).__name__})") from None
        raise Unavailable(f"{bucket} update of {key}: too many conflicts")
