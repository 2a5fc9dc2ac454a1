"""A KV bucket as the node's parts use it, with NATS errors turned into the bus's.

:class:`Bucket` wraps a nats-py ``KeyValue`` (NATS docs, "Key/Value Store";
ADR-8) so presence and revocations never see nats-py: writes, deletes, a scan of
stored entries by batch direct gets, and a watch. Every NATS or JetStream failure
is :class:`~pushsvc.bus.Unavailable`; the two a caller acts on have their own
subclasses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from .connection import Connection
from .directget import InvalidResponse
from .errors import Unavailable
from .reads import scan

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, InvalidResponse, TimeoutError)


class BucketGone(Unavailable):
    """Nothing stores the bucket any more (NATS lost its memory store): open it again."""


class NoDirectGets(Unavailable):
    """The bucket was created without ``allow_direct``: it cannot be scanned, only watched."""


class Entry:
    """One stored KV entry: ``value`` (None for a delete/purge marker) and ``operation``."""

    __slots__ = ("key", "operation", "value")

    def __init__(self, key: str, value: bytes | None, operation: str | None) -> None:
        self.key = key
        self.value = value
        self.operation = operation


class Bucket:
    """One opened KV bucket.

    Args:
        kv: the nats-py bucket.
        conn: the node's connection (JetStream for scans).
        name: the bucket's name.
    """

    def __init__(self, kv: KeyValue, conn: Connection, name: str) -> None:
        self._kv = kv
        self._conn = conn
        self.name = name

    async def put(self, key: str, value: bytes) -> None:
        """Write ``key`` (no key validation: callers build valid keys).

        Raises:
            BucketGone: no stream stores the bucket's subjects any more.
            Unavailable: NATS or JetStream did not take it.
        """
        try:
            await self._kv.put(key, value, validate_keys=False)
        except nats.errors.NoRespondersError:
            raise BucketGone(f"bucket {self.name} is gone") from None
        except _NATS_ERRORS as exc:
            raise Unavailable(f"{self.name} put failed ({type(exc).__name__})") from None

    async def delete(self, key: str) -> None:
        """Delete ``key``.

        Raises:
            Unavailable: NATS or JetStream did not take it.
        """
        try:
            await self._kv.delete(key, validate_keys=False)
        except _NATS_ERRORS as exc:
            raise Unavailable(f"{self.name} delete failed ({type(exc).__name__})") from None

    async def entries(self, keys: str) -> AsyncIterator[Entry]:
        """Every stored entry whose key matches ``keys`` (wildcards allowed), markers included.

        Batch direct gets over the bucket's stream (:func:`~pushsvc.bus.reads.scan`).
        The caller bounds the time.

        Raises:
            NoDirectGets: the bucket has no ``allow_direct``.
            BucketGone: the bucket's stream is gone.
            Unavailable: NATS or JetStream failed.
        """
        nc = self._conn.client()
        prefix = f"$KV.{self.name}."
        try:
            async for raw in scan(nc, f"KV_{self.name}", prefix + keys):
                operation = (raw.headers or {}).get("KV-Operation")
                subject = raw.subject or ""
                yield Entry(subject[len(prefix) :], raw.data or None, operation)
        except nats.errors.NoRespondersError:
            raise NoDirectGets(f"bucket {self.name} has no allow_direct") from None
        except nats.js.errors.NotFoundError:
            raise BucketGone(f"bucket {self.name} is gone") from None
        except _NATS_ERRORS as exc:
            raise Unavailable(f"{self.name} read failed ({type(exc).__name__})") from None

    async def watch(self) -> AsyncIterator[Entry | None]:
        """Every entry written from now on, after the current ones; None once those are done.

        Raises:
            Unavailable: the watch could not start or broke.
        """
        try:
            watcher = await self._kv.watchall()
        except _NATS_ERRORS as exc:
            raise Unavailable(f"{self.name} watch failed ({type(exc).__name__})") from None
        async for entry in watcher:
            if entry is None:
                yield None
            else:
                yield Entry(entry.key, entry.value, entry.operation)
