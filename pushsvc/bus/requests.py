"""NATS request/reply: serve a subject, ask one responder, or gather from every responder.

The one place pushsvc speaks NATS request/reply (NATS docs, "Request-Reply";
ADR-32 "Service API" describes the same pattern): the server API
(:mod:`pushsvc.serverapi`) serves ``<prefix>-api.<op>`` in a queue group and
scatters to every node, client RPC asks a backend's responder. Callers never see
nats-py: requests arrive as :class:`Request`, answers are :class:`Reply`, and
failures are :class:`NoResponders`, :class:`RequestTimeout` (both
:class:`~pushsvc.bus.errors.Unavailable`).

- :meth:`Requests.serve` subscribes an async handler to a subject, in a queue
  group (one member of the group answers each request) or alone (every
  subscriber answers: the scatter side). A handler that raises is logged and
  answered with :data:`ERROR_HEADER` ``internal`` so the asker is not left waiting.
- :meth:`Requests.request` asks one responder and returns its reply.
- :func:`request_once` connects, asks, and closes: for command-line tools.
- :meth:`Requests.scatter` publishes once with a fresh inbox as reply subject and
  gathers replies until ``expected`` distinct responders answered or ``timeout``
  seconds passed (scatter-gather: whoever did not answer is the caller's
  ``missing``).
- :func:`reply_inbox` is the mechanism under it (and under batch direct gets):
  one request, its replies in a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..config.nats import NatsSecurity, NatsUnreachable
from . import natsconn
from .connection import Connection
from .errors import Unavailable

log = logging.getLogger("pushsvc.bus.requests")

#: reply header a responder sets to answer with an error (value: an error code;
#: the body is a human-readable message)
ERROR_HEADER = "Pushsvc-Error"


class NoResponders(Unavailable):
    """Nobody subscribes the subject (NATS answered "no responders" at once)."""


class RequestTimeout(Unavailable):
    """No reply within the timeout (the responder is slow, busy or gone)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a handler sees it.

    Attributes:
        subject: the subject it was sent to (e.g. ``push-api.disconnect``).
        data: the body, bytes as sent.
        headers: NATS headers (empty when none).
    """

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: ``data`` (bytes) and NATS ``headers``.

    Attributes:
        error: the :data:`ERROR_HEADER` code when the responder answered an error.
    """

    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """The responder's error code (header ``Pushsvc-Error``), or None."""
        return self.headers.get(ERROR_HEADER)


#: an async handler: the request in, the reply out (None: do not answer)
Handler = Callable[[Request], Awaitable[Reply | None]]


class Responder:
    """A served subject (from :meth:`Requests.serve`); :meth:`stop` unsubscribes it."""

    def __init__(self, sub: Subscription, tasks: set[asyncio.Task[None]]) -> None:
        self._sub = sub
        self._tasks = tasks

    async def stop(self) -> None:
        """Stop taking requests and wait for the ones being answered."""
        await Connection.unsubscribe(self._sub)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Requests:
    """Request/reply over the node's NATS connection.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def serve(self, subject: str, handler: Handler, *, queue: str | None = None) -> Responder:
        """Answer requests to ``subject`` with ``handler`` (one task per request).

        Args:
            subject: the subject (wildcards allowed: ``push-api.*``).
            handler: called with each :class:`Request`; its :class:`Reply` is sent
                to the request's reply subject (a request without one, a plain
                publish, is handled and not answered).
            queue: a NATS queue group: each request goes to one member of the
                group. None: every subscriber of ``subject`` gets every request.

        Raises:
            Unavailable: NATS is not connected or refused the subscription.
        """
        nc = self.conn.client()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(msg: Msg) -> None:
            request = Request(msg.subject, msg.data, dict(msg.headers or {}))
            try:
                reply = await handler(request)
            except Exception:
                log.exception("handler of %s failed", msg.subject)
                reply = Reply(b"internal error", {ERROR_HEADER: "internal"})
            if reply is None or not msg.reply:
                return
            try:
                await nc.publish(msg.reply, reply.data, headers=reply.headers or None)
            except (nats.errors.Error, OSError) as exc:
                log.warning("reply to %s lost (%s)", msg.subject, type(exc).__name__)

        async def cb(msg: Msg) -> None:
            # a task per request: a slow handler must not hold the subscription's queue
            task = asyncio.ensure_future(answer(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            sub = await nc.subscribe(subject, queue=queue or "", cb=cb)
        except nats.errors.Error as exc:
            raise Unavailable(f"NATS refused the subscription ({type(exc).__name__})") from None
        return Responder(sub, tasks)

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Ask one responder of ``subject``; its reply (check :attr:`Reply.error`).

        Raises:
            NoResponders: nobody subscribes ``subject``.
            RequestTimeout: no reply within ``timeout`` seconds.
            Unavailable: NATS is not connected.
        """
        nc = self.conn.client()
        try:
            msg = await nc.request(subject, data, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no responders on {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"no reply on {subject} within {timeout:g} s") from None
        except nats.errors.Error as exc:
            raise Unavailable(f"request to {subject} failed ({type(exc).__name__})") from None
        return Reply(msg.data, dict(msg.headers or {}))

    async def scatter(
        self,
        subject: str,
        data: bytes,
        *,
        timeout: float,
        expected: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> list[Reply]:
        """Publish one request to every subscriber of ``subject``; gather their replies.

        Returns once ``expected`` replies arrived, else when ``timeout`` seconds
        passed (``expected`` None: always the whole timeout). The replies come in
        arrival order; telling responders apart (and who is missing) is the
        caller's business, by what the replies say.

        Raises:
            Unavailable: NATS is not connected or refused the publish.
        """
        nc = self.conn.client()
        replies: list[Reply] = []
        try:
            async with reply_inbox(nc, subject, data, headers=headers) as inbox:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        while expected is None or len(replies) < expected:
                            msg = await inbox.get()
                            replies.append(Reply(msg.data, dict(msg.headers or {})))
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"request to {subject} failed ({type(exc).__name__})") from None
        return replies


@contextlib.asynccontextmanager
async def reply_inbox(
    nc: NatsClient, subject: str, data: bytes, *, headers: dict[str, str] | None = None
) -> AsyncIterator[asyncio.Queue[Msg]]:
    """Publish one request to ``subject`` with a fresh inbox as its reply subject;
    inside the block, its replies arrive in the queue, in order, for as long as the
    block runs (then the inbox is unsubscribed). For requests with several replies:
    :meth:`Requests.scatter`, batch direct gets (:mod:`~pushsvc.bus.directget`).

    The inbox has a *callback* subscription: nats-py gives a subscription without
    one a message iterator that refers back to it, and the pair outlives the
    unsubscribe as a reference cycle that only a full collection frees.

    Raises:
        nats.errors.Error: NATS refused the subscription or the publish.
    """
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def cb(msg: Msg) -> None:
        replies.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=cb)
    try:
        await nc.publish(subject, data, reply=inbox, headers=headers)
        yield replies
    finally:
        await Connection.unsubscribe(sub)


async def request_once(
    servers: list[str],
    security: NatsSecurity | None,
    subject: str,
    data: bytes,
    *,
    timeout: float,
) -> Reply:
    """Connect to NATS, ask one responder of ``subject``, close (``pushsvc api``).

    Raises:
        NatsRefused: NATS refused the credentials or TLS.
        NoResponders: nobody subscribes ``subject`` (no pushsvc node on that NATS
            with that prefix).
        RequestTimeout: no reply within ``timeout`` seconds.
        Unavailable: NATS could not be reached within ``timeout`` seconds.
    """
    try:
        nc = await natsconn.connect(
            servers, security, timeout=timeout, name="pushsvc-cli", allow_reconnect=False
        )
    except NatsUnreachable as exc:
        raise Unavailable(str(exc)) from None
    try:
        try:
            msg = await nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no pushsvc node answers {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"no reply on {subject} within {timeout:g} s") from None
        return Reply(msg.data, dict(msg.headers or {}))
    finally:
        await nc.close()
