"""The node's NATS connection and the state every part of the bus shares.

:class:`Connection` opens the connection (through :func:`pushsvc.bus.natsconn.connect`,
bounded by ``PUSHSVC_CONNECT_TIMEOUT``), reports drops and reconnects (metrics,
logs, then the bus's hooks), drains it at close, and holds what the parts of
:class:`~pushsvc.bus.Bus` (streams, live subscriptions, reads, KV, events) read
from it: the settings, the subject prefixes, the nats-py client and JetStream
context, and whether history is on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from .. import metrics
from ..config.settings import Settings
from . import natsconn
from .errors import Unavailable

log = logging.getLogger("pushsvc.bus")

RECONNECT_WAIT = 0.5  # s between reconnect attempts (nats-py ``reconnect_time_wait``)
PING_INTERVAL = 10  # s between client PINGs; 3 unanswered ones mark the connection stale


async def confirm(nc: NatsClient, timeout: float) -> None:
    """Wait until the NATS server has processed everything written on ``nc`` so far.

    nats-py's ``flush()`` writes its PING straight to the socket while earlier
    commands (a SUB, a PUB) may still sit in the client's pending buffer, so the
    PONG can come back before the server has seen them (nats-py 2.16). The first
    flush lets the client's flusher task write that buffer (it was woken before
    the PING went out, so it runs before the PONG can be read); the second PING
    then follows those commands on the wire and its PONG confirms them.

    Raises:
        nats.errors.Error: not connected, or no PONG within ``timeout`` seconds.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


class Connection:
    """One NATS connection and the settings-derived state the bus's parts share.

    Args:
        settings: NATS URL(s), security, prefix, timeouts, history on/off.
        name: the NATS connection name (``nats server report connections``).

    Attributes:
        prefix: ``PUSHSVC_SUBJECT_PREFIX``; producers publish to ``<prefix>.<channel>``.
        live_prefix: ``<prefix>-live``, where the stream republishes (history on).
        nc: the nats-py client; None before :meth:`open` and after :meth:`close`.
        js: its JetStream context (timeout ``publish_timeout`` s).
        history_enabled: history on (stream set up); turned off at start when
            NATS has no JetStream.
        closing: True once :meth:`close` began.
    """

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.prefix = settings.subject_prefix
        self.live_prefix = f"{self.prefix}-live"
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.history_enabled = settings.history
        self.closing = False
        self._opening = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._on_lost: Callable[[], None] | None = None
        self._on_back: Callable[[], None] | None = None

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up."""
        return self.nc is not None and self.nc.is_connected

    def client(self) -> NatsClient:
        """The connected nats-py client.

        Raises:
            Unavailable: not connected (before start, during an outage, closed).
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        return nc

    async def open(self, on_lost: Callable[[], None], on_back: Callable[[], None]) -> None:
        """Connect, bounded by ``connect_timeout`` s; then reconnect forever.

        After this returns nats-py reconnects by itself (every ``RECONNECT_WAIT``
        s) and re-sends every SUB; ``on_lost`` is called (synchronously) when the
        connection drops, ``on_back`` once it is back. Neither may raise or wait.

        Raises:
            natsconn.NatsRefused: NATS refused the credentials or TLS (at once).
            Unavailable: NATS could not be reached within ``connect_timeout`` s;
                the message names the URL(s), the time and the cause.
        """
        s = self.settings
        self._on_lost, self._on_back = on_lost, on_back
        self._opening = True
        try:
            self.nc = await natsconn.connect(
                s.nats_servers,
                natsconn.NatsSecurity.from_settings(s),
                timeout=s.connect_timeout,
                name=self.name,
                connect_timeout=max(1, int(s.connect_timeout)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT,
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=3,
                error_cb=self._error_cb,
                disconnected_cb=self._disconnected_cb,
                reconnected_cb=self._reconnected_cb,
            )
        except natsconn.NatsUnreachable as exc:
            raise Unavailable(exc.with_timeout()) from None
        finally:
            self._opening = False
        metrics.NATS_CONNECTED.set(1)
        self.js = self.nc.jetstream(timeout=s.publish_timeout)

    async def _error_cb(self, exc: Exception) -> None:
        log.warning("NATS: %s: %s", type(exc).__name__, exc)

    async def _disconnected_cb(self) -> None:
        metrics.NATS_CONNECTED.set(0)
        if self.closing or self._opening:
            return  # closing, or the first connect gave up: open() says why, once
        log.warning("NATS disconnected; reconnecting (emits answer 503 meanwhile)")
        if self._on_lost is not None:
            self._on_lost()

    async def _reconnected_cb(self) -> None:
        """nats-py has reconnected and re-sent every SUB (confirmed by a flush).

        Runs inside nats-py's reconnect loop, so it must neither raise nor wait:
        the bus's ``on_back`` starts a task for what follows.
        """
        metrics.NATS_CONNECTED.set(1)
        metrics.NATS_RECONNECTS.inc()
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        log.info("NATS reconnected to %s; subscriptions restored", url)
        if self._on_back is not None:
            self._on_back()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task kept referenced until it ends (asyncio docs,
        "Creating Tasks": the loop keeps only weak references)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def unsubscribe(sub: Subscription) -> None:
        """Unsubscribe ``sub``; a connection that is closing is fine (the server
        forgets its subscriptions anyway)."""
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass

    async def close(self, timeout: float = 5.0) -> None:
        """Drain the connection (pending deliveries finish, then close).

        The drain is bounded by ``timeout`` seconds; after it the connection is closed.
        """
        self.closing = True
        nc, self.nc = self.nc, None
        metrics.NATS_CONNECTED.set(0)
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=timeout)
            except (TimeoutError, nats.errors.Error):
                await nc.close()
