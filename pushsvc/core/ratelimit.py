"""Per-user token buckets (the classic token bucket: ``rate`` tokens/s, ``burst`` capacity).

One bucket per user (JWT ``sub``) for client commands, shared by all of that
user's sockets on the node, and one per principal for HTTP emits; a refusal
tells the client how long to wait (``retry_after`` / ``Retry-After``).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """A token bucket refilled continuously at ``rate`` tokens per second.

    Args:
        rate: refill rate, tokens per second (> 0).
        burst: capacity, tokens; the bucket starts full.
        clock: monotonic clock in seconds (injectable for tests).
    """

    __slots__ = ("_clock", "_stamp", "burst", "rate", "strikes", "tokens")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock()
        self.strikes = 0  # consecutive refusals of this bucket (sessions count their own)

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens.

        Returns:
            0.0 when granted; otherwise the seconds to wait before ``cost`` tokens
            are available (the ``retry_after`` a client is told). A refusal
            increments :attr:`strikes`; a grant resets it.
        """
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            self.strikes = 0
            return 0.0
        self.strikes += 1
        return (cost - self.tokens) / self.rate


class BucketRegistry:
    """Token buckets keyed by principal (JWT ``sub`` or API key id), bounded in size.

    Buckets that are full again are forgotten when the registry grows past
    ``max_keys``, so memory stays bounded under many distinct users.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, key: str) -> TokenBucket:
        """The bucket of ``key``, created full on first use."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket

    def take(self, key: str, cost: float = 1.0) -> float:
        """Shorthand for ``get(key).take(cost)``: 0.0 or seconds to wait."""
        return self.get(key).take(cost)

    def _prune(self) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.take(0)
            if bucket.tokens >= bucket.burst:
                del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()
