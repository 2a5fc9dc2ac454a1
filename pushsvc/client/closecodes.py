"""What the client does after a WebSocket close code (docs/protocol.md, "Close codes").

The same table as pushsvc.js, with the server's own no-reconnect rule
(:data:`pushsvc.protocol.NO_RECONNECT`: 1009 and 4003) and the server API's codes
(issue 21): 4011 "disconnected by the server" does not reconnect, 4012 reconnects;
an application's own codes reconnect in 4100-4499 and do not in 4500-4999.

| code | meaning | the client |
| --- | --- | --- |
| 1000 | normal closure (sent by the server) | reconnects with backoff |
| 1001, 1006, 1011 | going away, connection lost, internal error | reconnects with backoff |
| 1009 | a frame of ours was too big (``PUSHSVC_MAX_FRAME_BYTES``) | stops: fix the client |
| 1012 | service restart (drain, stream reset) | reconnects after 0..2 s at random, then backoff |
| 4001 | unauthorized (bad, expired or revoked token) | get_token: new token, backoff; else stop |
| 4003 | forbidden | stops |
| 4008 | rate limited, too many connections | reconnects after 30 s + backoff |
| 4009, 4010 | slow consumer, heartbeat timeout | reconnects with backoff |
| 4011 | disconnected by the server | stops |
| 4012 | disconnected by the server, reconnect | reconnects with backoff |
| 4100-4499 | the application's, reconnect | reconnects with backoff |
| 4500-4999 | the application's, do not reconnect | stops |
| anything else | | reconnects with backoff |

Every reconnect resumes the subscriptions from their positions (epoch, seq).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

from ..protocol import (
    CLOSE_RATE_LIMITED,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNAUTHORIZED,
    NO_RECONNECT,
)
from .backoff import full_jitter

#: close codes of the server API (issue 21): kicked for good / kicked, come back
CLOSE_DISCONNECTED: Final = 4011
CLOSE_DISCONNECTED_RECONNECT: Final = 4012
#: application close codes: reconnect (4100-4499) or not (4500-4999)
APP_RECONNECT: Final = range(4100, 4500)
APP_STOP: Final = range(4500, 5000)
#: seconds added to the backoff after a 4008 (or an HTTP 429 handshake answer)
RATE_LIMITED_DELAY: Final = 30.0
#: seconds: the first reconnect after a 1012 is at a random point in [0, this]
RESTART_JITTER: Final = 2.0
#: the code a client reports for a connection that ended without a close frame
#: (RFC 6455 7.1.5), also used for a connection attempt that failed
CLOSE_ABNORMAL: Final = 1006

CLOSE_MEANINGS: Final = {
    1000: "normal closure",
    1001: "server going away",
    1006: "connection lost",
    1008: "policy violation",
    1009: "frame too big",
    1011: "internal server error",
    1012: "service restart",
    4001: "unauthorized",
    4003: "forbidden",
    4008: "rate limit exceeded",
    4009: "slow consumer",
    4010: "heartbeat timeout",
    4011: "disconnected by the server",
    4012: "disconnected by the server, reconnect",
}


def reconnects(code: int, *, renewable: bool) -> bool:
    """True when the client reconnects after close code ``code``.

    ``renewable``: the client has a ``get_token`` to replace a refused token.
    """
    if code == CLOSE_UNAUTHORIZED:
        return renewable
    return code not in NO_RECONNECT and code != CLOSE_DISCONNECTED and code not in APP_STOP


def reconnect_delay(
    code: int, attempt: int, *, renewable: bool, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds to wait before reconnecting after close code ``code``, or None: stop.

    Args:
        code: the close code received (1006 when the connection was lost).
        attempt: reconnection attempts since the last ``welcome`` (0 = first).
        renewable: the client has a ``get_token``.
        rand: the random source, uniform in [0, 1).
    """
    if not reconnects(code, renewable=renewable):
        return None
    if code == CLOSE_RATE_LIMITED:
        return RATE_LIMITED_DELAY + full_jitter(attempt, rand)
    if code == CLOSE_SERVICE_RESTART and attempt == 0:
        return rand() * RESTART_JITTER
    return full_jitter(attempt, rand)


def describe(code: int, reason: str = "") -> str:
    """The reason the server gave, else what the code means (for status lines)."""
    return reason or CLOSE_MEANINGS.get(code, "")
