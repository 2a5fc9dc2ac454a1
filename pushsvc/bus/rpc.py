"""Client RPC over NATS request/reply: ``<prefix>-rpc.<method>``.

One request, one reply (NATS docs, "Request-Reply"): nats-py's new-style
request (one wildcard inbox subscription per connection, a future per request).
A responder is any NATS service subscribed to ``<prefix>-rpc.<method>`` (a queue
group to share the load); it answers on the request's reply subject, and may set
the header ``Pushsvc-Error: <code>`` to send an error instead of a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.errors

from .connection import Connection
from .errors import NoResponders, RequestTimeout, TooLarge, Unavailable


@dataclass(frozen=True)
class Reply:
    """A responder's answer: the raw ``data`` bytes and its NATS ``headers`` (may be empty)."""

    data: bytes
    headers: dict[str, str]


def rpc_subject(prefix: str, method: str) -> str:
    """The NATS subject of RPC ``method``: ``<prefix>-rpc.<method>``."""
    return f"{prefix}-rpc.{method}"


async def request(
    conn: Connection,
    method: str,
    payload: bytes,
    headers: dict[str, str],
    timeout: float,
) -> Reply:
    """Send ``payload`` to ``<prefix>-rpc.<method>`` and wait for one reply.

    Args:
        conn: the node's connection.
        method: a valid method name (channel grammar: no wildcards).
        payload: the request body (the client's ``data`` as JSON).
        headers: NATS headers (who is calling: ``Pushsvc-User``...).
        timeout: seconds to wait for the reply.

    Raises:
        NoResponders: nothing is subscribed to the subject.
        RequestTimeout: no reply within ``timeout`` s.
        TooLarge: the request exceeds the server's ``max_payload``.
        Unavailable: NATS is not connected (or draining).
    """
    nc = conn.client()
    subject = rpc_subject(conn.prefix, method)
    try:
        msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        raise NoResponders(f"no service answers {method}") from None
    except nats.errors.TimeoutError:
        raise RequestTimeout(f"{method} did not answer within {timeout:g} s") from None
    except nats.errors.MaxPayloadError:
        raise TooLarge("request larger than the NATS server's max_payload") from None
    except (nats.errors.Error, OSError) as exc:
        raise Unavailable(f"NATS did not take the request ({type(exc).__name__})") from None
    return Reply(msg.data or b"", dict(msg.headers or {}))
