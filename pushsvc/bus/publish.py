"""Publishing into a channel: a JetStream publish (history on) or a confirmed core one.

This is what the HTTP emit shim and the WebSocket ``publish`` command use
(through :meth:`pushsvc.bus.Bus.publish`); a producer that speaks NATS publishes
to ``<prefix>.<channel>`` itself and needs none of this.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors

from ..channels import subject_for
from .connection import Connection, confirm
from .errors import NoJetStream, StreamConfigError, Unavailable
from .stream import Streams


async def publish(
    conn: Connection,
    streams: Streams,
    channel: str,
    payload: bytes,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> int | None:
    """Publish ``payload`` to ``channel`` and wait until NATS has it.

    With history on this is a JetStream publish: returns the stream sequence
    after the ack (for a duplicate ``msg_id`` inside the dedupe window, the
    original sequence). A stream found missing (deleted under the node) is
    created again once through ``streams`` and the publish retried. With history
    off it is a core publish followed by a round trip (:func:`confirm`); returns
    None.

    Args:
        conn: the node's connection.
        streams: the node's history stream (re-created when missing).
        channel: a valid channel name (no wildcards).
        payload: the raw message bytes.
        msg_id: ``Nats-Msg-Id`` for JetStream's deduplication, or None.
        headers: further NATS headers (the publisher's ``Pushsvc-User``...), or None.

    Raises:
        Unavailable: not connected, no ack within ``publish_timeout`` s, or
            JetStream refused the message.
    """
    nc = conn.client()
    settings = conn.settings
    subject = subject_for(conn.prefix, channel)
    if msg_id:
        headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
    try:
        if conn.history_enabled:
            js = conn.js
            assert js is not None
            for attempt in (1, 2):
                try:
                    ack = await js.publish(
                        subject,
                        payload,
                        timeout=settings.publish_timeout,
                        stream=settings.stream,
                        headers=headers,
                    )
                    return ack.seq
                except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                    if attempt == 2:
                        raise
                # no stream captures the subject: it was deleted; create it again
                try:
                    await streams.ensure()
                except (NoJetStream, StreamConfigError) as exc:
                    raise Unavailable(f"stream {settings.stream} is missing") from exc
        await nc.publish(subject, payload, headers=headers)
        await confirm(nc, settings.publish_timeout)
        return None
    except nats.js.errors.APIError as exc:
        raise Unavailable(f"JetStream refused the message: {exc.description}") from None
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise Unavailable(f"NATS did not take the message ({type(exc).__name__})") from None
