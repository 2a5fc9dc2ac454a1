"""JetStream batch direct gets (ADR-31): stored messages without a consumer.

One request to ``$JS.API.DIRECT.GET.<stream>`` with ``{"batch": n, "seq": s,
"next_by_subj": subject}`` is answered, by any replica of a stream with
``allow_direct``, with up to ``n`` messages on the request's reply subject: each
carries its stream, sequence, subject and time in ``Nats-*`` headers, plus
``Nats-Num-Pending`` (how many more of the subject the stream holds after it);
then an empty ``204 EOB`` status ends the batch. ``404`` means nothing matched;
``503`` that nobody answers (no ``allow_direct``). NATS docs, "JetStream Direct
Get"; ADR-31 "JetStream Direct Get".

The replies are gathered by :func:`~pushsvc.bus.requests.reply_inbox` (a
*callback* subscription on a fresh inbox). The request/reply libraries
(``jetstreamext.get_batch`` over ``natsext.request_many``) subscribe without a
callback; nats-py gives such a subscription a message
iterator that refers back to it, and the pair outlives the unsubscribe as a
reference cycle (~3.7 KiB per read, measured with a census of ``gc.get_objects``)
that only a full collection frees, which ``pushsvc serve`` runs rarely
(:func:`pushsvc.cli.tune_gc`). Every history read would leave one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX, RawStreamMsg

from .requests import reply_inbox

#: seconds a whole batch may take when the caller sets no tighter bound
BATCH_TIMEOUT = 30.0


class BatchUnsupported(Exception):
    """The server answered without ``Nats-Num-Pending``: no batch gets (nats-server < 2.11)."""


class InvalidResponse(Exception):
    """The server answered a status other than 204/404/503, or a message without its
    ``Nats-Stream``/``Nats-Sequence``/``Nats-Subject`` headers."""


def _stored(msg: Msg) -> RawStreamMsg | None:
    """The stored message a reply carries; None for the end of the batch or no match.

    Raises:
        nats.errors.NoRespondersError: status 503.
        InvalidResponse, BatchUnsupported: see the classes.
    """
    headers = msg.headers or {}
    status = headers.get("Status")
    if status is not None and not msg.data:
        if status in ("204", "404"):
            return None
        if status == "503":
            raise nats.errors.NoRespondersError
        raise InvalidResponse(f"status {status}: {headers.get('Description', '')}")
    if "Nats-Num-Pending" not in headers:
        raise BatchUnsupported("batch direct get not supported by the server")
    try:
        seq = int(headers["Nats-Sequence"])
        return RawStreamMsg(
            subject=headers["Nats-Subject"],
            seq=seq,
            data=msg.data,
            headers=headers,
            stream=headers["Nats-Stream"],
        )
    except (KeyError, ValueError) as exc:
        raise InvalidResponse(f"direct get reply without a valid {exc}") from None


async def get_batch(
    nc: NATS,
    stream: str,
    *,
    seq: int,
    subject: str,
    batch: int,
    timeout: float = BATCH_TIMEOUT,
) -> AsyncIterator[RawStreamMsg]:
    """Up to ``batch`` messages of ``stream`` on ``subject`` (wildcards allowed) from
    stream sequence ``seq`` on, oldest first; nothing when none matches.

    Args:
        nc: a connected nats-py client.
        seq: the first stream sequence to consider (>= 1).
        batch: at most this many messages (>= 1).
        timeout: seconds for the whole batch.

    Raises:
        nats.errors.NoRespondersError: the stream has no ``allow_direct`` (or does
            not exist).
        nats.errors.TimeoutError: the batch did not end within ``timeout`` s.
        nats.errors.Error: NATS refused the subscription or the request.
        InvalidResponse, BatchUnsupported: see the classes.
    """
    request = json.dumps({"batch": batch, "seq": seq, "next_by_subj": subject}).encode()
    deadline = asyncio.get_running_loop().time() + timeout
    api = f"{DEFAULT_PREFIX}.DIRECT.GET.{stream}"
    async with reply_inbox(nc, api, request) as replies:
        while True:
            # the deadline wraps each wait, never a yield (the caller runs between yields)
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await replies.get()
            except TimeoutError:
                raise nats.errors.TimeoutError from None
            stored = _stored(msg)
            if stored is None:
                return
            yield stored
