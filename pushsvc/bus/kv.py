"""JetStream KV buckets: presence and revocations live there.

:class:`KeyValueStore` creates or opens a bucket, writes an entry with a
per-message TTL (nats-server 2.11+, ADR-43) and scans a bucket's entries by
batch direct gets (:func:`~pushsvc.bus.reads.scan` over ``KV_<bucket>``, ADR-8),
so no watcher or consumer is needed. With history off there is no JetStream and
every call raises :class:`~pushsvc.bus.errors.Unavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, RawStreamMsg, StorageType
from nats.js.kv import KeyValue

from .buckets import Bucket
from .connection import Connection
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
    ) -> tuple[KeyValue, float]:
        """Create (or open) the JetStream KV bucket ``bucket`` (presence, revocations).

        New buckets keep one value per key (``history=1``) in ``storage`` with
        ``max_age`` = ``ttl`` seconds, ``stream_replicas`` replicas and direct gets
        allowed (read by :meth:`scan`; NATS docs, "Key/Value Store"). A bucket
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
            (while iterating) nats.errors.Error, nats.js.errors.Error,
            InvalidResponseError: see :func:`~pushsvc.bus.reads.scan`.
        """
        assert self.conn.js is not None
        return scan(self.conn.js, f"KV_{bucket}", f"$KV.{bucket}.{keys}")

    async def put(self, bucket: str, key: str, value: bytes, *, ttl: float, msg_id: str) -> None:
        """Write ``key`` of ``bucket`` with a per-message TTL of ``ttl`` seconds.

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
                msg_ttl=max(1.0, ttl),
                timeout=self.conn.settings.publish_timeout,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"{bucket} write failed ({type(exc).__name__})") from None
