"""Single-use connection tickets in a JetStream KV bucket (``PUSHSVC_TICKETS``).

``POST /sse/ticket`` mints a random ticket for a verified token; an
``EventSource`` (which cannot send headers) then opens ``GET /sse?ticket=T`` on
any node of the cluster. The ticket is written with a create-only put (KV
``create``: fails when the key exists) and consumed with a delete that expects
the revision read (KV ``delete(last=...)``, NATS docs "Key/Value Store"): of
two nodes presenting the same ticket, one wins. Entries expire with the bucket's
``max_age`` (``PUSHSVC_TICKET_TTL``).
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from .errors import Unavailable
from .kv import KeyValueStore

BUCKET = "PUSHSVC_TICKETS"


class Tickets:
    """The node's view of the ticket bucket.

    Args:
        kv: the bus's KV store.
        ttl: seconds a ticket stays valid.
    """

    def __init__(self, kv: KeyValueStore, ttl: float) -> None:
        self._store = kv
        self.ttl = ttl
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv, _ = await self._store.key_value(
                BUCKET, self.ttl, description="pushsvc single-use connection tickets"
            )
        return self._kv

    async def create(self, ticket: str, value: bytes) -> None:
        """Store ``value`` (the token) under ``ticket``, create-only.

        Raises:
            Unavailable: JetStream did not take it (or history is off).
        """
        kv = await self._bucket()
        try:
            await kv.create(ticket, value)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"ticket not stored ({type(exc).__name__})") from None

    async def consume(self, ticket: str) -> bytes | None:
        """The value of ``ticket``, removed so no one can use it again; None if unknown/used.

        Raises:
            Unavailable: JetStream did not answer.
        """
        kv = await self._bucket()
        try:
            entry = await kv.get(ticket)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"ticket lookup failed ({type(exc).__name__})") from None
        if entry.value is None or entry.revision is None:
            return None
        try:
            await kv.delete(ticket, last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None  # another node consumed it first
        except nats.js.errors.APIError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"ticket not consumed ({type(exc).__name__})") from None
        return entry.value
