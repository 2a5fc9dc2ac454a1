"""Full-jitter exponential backoff between reconnection attempts.

The delay before attempt ``n`` (0-based, counted since the last ``welcome``) is
uniform in ``[0, min(cap, base * factor**n)]`` seconds: "full jitter" (AWS
Architecture Blog, "Exponential Backoff And Jitter", 2015), which spreads the
clients of a restarted node over the whole window instead of bunching them at its
edges. The same schedule as pushsvc.js (base 0.5 s, factor 2, cap 20 s).
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: seconds: first window, growth factor, largest window
BACKOFF_BASE = 0.5
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 20.0


def backoff_window(attempt: int) -> float:
    """Upper bound (seconds) of the random delay before attempt ``attempt`` (>= 0)."""
    return min(BACKOFF_MAX, BACKOFF_BASE * BACKOFF_FACTOR ** min(attempt, 64))


def full_jitter(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """A random delay in seconds, uniform in ``[0, backoff_window(attempt)]``."""
    return rand() * backoff_window(attempt)
