"""The async Python client: one WebSocket connection to pushsvc, kept up and resumed.

::

    from pushsvc.client import Client

    async with Client("http://127.0.0.1:8000", token=token) as client:
        sub = await client.subscribe("orders.*", since=last_seq, epoch=last_epoch)
        async for message in sub:          # Message(channel, data, seq, epoch, pattern, ...)
            handle(message.channel, message.data)

The wire contract is docs/protocol.md; the rules are pushsvc.js's:

- **Connection.** The ``websockets`` asyncio client (``async for ws in connect(...)``:
  the library retries failed connects, network errors and HTTP 500/502/503/504,
  here also 429, with this client's full-jitter delays, and raises the other
  refusals, which stop the client). The token goes in the first frame
  (``{"op":"auth"}``), never in the URL. ``welcome`` must come within
  ``connect_timeout`` seconds.
- **After a close** the close-code table of :mod:`pushsvc.client.closecodes`
  decides: reconnect after a full-jitter delay (:mod:`pushsvc.client.backoff`,
  the attempt counter reset by each ``welcome``), or stop (:class:`Stopped`).
- **Resume.** After every ``welcome`` each subscription is sent again with
  ``since`` = its highest ``seq`` and the ``epoch`` it belongs to; server-side
  subscriptions resume through the auth frame's ``subs`` map. A message whose
  ``seq`` is not above the subscription's position is dropped as a duplicate;
  ``recovered: false`` or a new epoch forgets the position first, so nothing of
  a new epoch is taken for a duplicate.
- **Heartbeat.** Every ``ping`` is answered ``pong`` at once; when no frame comes
  for ``max(1.5 * ping_interval, ping_interval + 10)`` seconds the client closes
  with 4010 and reconnects.
- **Token refresh** (with ``get_token``): a new token is fetched and sent with
  ``refresh`` at ``exp - 30 s`` (halfway for tokens living under a minute), then
  retried every 10 s until ``exp`` on failure; a 4001 close asks ``get_token``
  for a token before reconnecting. ``get_token`` raising :class:`Unauthorized`
  stops the client; any other exception is retried with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import websockets

from .. import protocol as wire
from ..channels import grant_matches, is_pattern, pattern_reaches
from ..serverurl import parse_server_url
from .connection import Connection, TokenSource
from .dispatch import json_field
from .errors import ClientClosed, PushsvcError
from .events import Connected, Connecting, Event, EventStream, State
from .messages import Presence, PresenceStats, PresentClient
from .subscription import Subscription

#: seconds from opening the socket until ``welcome`` (pushsvc.js: connectTimeout)
CONNECT_TIMEOUT = 15.0
#: seconds a command (publish, presence, refresh...) waits, connection included
REQUEST_TIMEOUT = 10.0
#: seconds for the TCP connect and the WebSocket handshake
OPEN_TIMEOUT = 10.0
#: largest server frame accepted (bytes): a NATS payload is at most 1 MiB by default,
#: base64 and batching (PUSHSVC_COALESCE_BYTES) add to that
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: messages a subscription buffers before the client stops reading the socket
BUFFER_SIZE = 1000

_encode = msgspec.json.encode


class Client(Connection):
    """An async pushsvc client over one WebSocket connection, reconnecting and resuming.

    Use it as an async context manager (``async with Client(...) as client``), or
    call :meth:`connect` and :meth:`close`. Commands wait for the connection (the
    client reconnects by itself), so they can be called at any time after
    :meth:`connect`.

    Args:
        url: the server: ``http(s)://host:port[/base]``, its ``ws(s)://`` form or the
            ``/ws`` endpoint (:func:`pushsvc.serverurl.parse_server_url`).
        token: the JWT to present. Needed unless ``get_token`` is given.
        get_token: returns a fresh JWT (a plain or an ``async`` function); called
            when there is no token, after a 4001 close, and before ``exp`` to
            ``refresh``. Raise :class:`Unauthorized` from it to stop the client.
        on_event: called with each :mod:`~pushsvc.client.events` event, inline and
            in order; it must not block (exceptions are logged and ignored).
        buffer_size: messages each subscription buffers before reading pauses (>= 1).
        connect_timeout: seconds from opening until ``welcome``.
        request_timeout: default seconds a command waits (connection included).
        open_timeout: seconds for the TCP connect + WebSocket handshake.
        max_frame_bytes: largest server frame accepted (bytes).
        **connect_options: passed to :func:`websockets.asyncio.client.connect`,
            e.g. ``ssl=`` (an :class:`ssl.SSLContext`), ``origin=``,
            ``additional_headers=``, ``proxy=``.

    Raises:
        ValueError: a bad ``url`` (scheme, host, port 1..65535), ``buffer_size`` < 1.
        TypeError: neither ``token`` nor ``get_token``.

    Attributes:
        url: the WebSocket endpoint used (``ws(s)://host:port/base/ws``).
        welcome: the last :class:`Connected` event (None before the first ``welcome``).
        error: why the client stopped (:class:`Stopped`), None while it runs or after
            :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        on_event: Callable[[Event], None] | None = None,
        buffer_size: int = BUFFER_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        open_timeout: float = OPEN_TIMEOUT,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        **connect_options: Any,
    ) -> None:
        if not token and get_token is None:
            raise TypeError("Client needs a token or get_token")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        super().__init__(
            parse_server_url(url, "url").ws_url,
            token,
            get_token,
            on_event,
            buffer_size,
            connect_timeout,
            request_timeout,
            {"open_timeout": open_timeout, "max_size": max_frame_bytes, **connect_options},
        )

    # ---- lifecycle ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """``"disconnected"`` (not started, closed or stopped), ``"connecting"``
        (opening, waiting for ``welcome``, or waiting to reconnect), ``"connected"``."""
        return self._state

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The active subscriptions (client- and server-side) by channel or pattern."""
        return dict(self._subs)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start connecting in the background (returns at once; no-op when started).

        Raises:
            ClientClosed: the client was closed or stopped (make a new one).
        """
        if self._finished:
            raise self.error or ClientClosed()
        if self._task is None:
            self._state = "connecting"
            self._emit(Connecting(self.url))
            self._task = asyncio.create_task(self._run(), name=f"pushsvc.client {self.url}")

    async def ready(self, timeout: float | None = None) -> Connected:
        """Wait until connected (``welcome`` received); returns that :class:`Connected`.

        Raises:
            TimeoutError: not connected within ``timeout`` seconds (None: no limit).
            Stopped: the client stopped for good (e.g. a refused token).
            ClientClosed: :meth:`close` was called.
        """
        async with asyncio.timeout(timeout):
            await self._wait_connected()
        assert self.welcome is not None
        return self.welcome

    async def close(self) -> None:
        """Close the connection (code 1000) and stop; subscriptions' iterators end.

        Idempotent. Positions stay readable on the subscriptions (``epoch``,
        ``last_seq``) to resume on a new client.
        """
        self._closing = True
        for sub in list(self._subs.values()):
            sub._end("closed")  # also frees a reader waiting for room in a full buffer
        task, ws = self._task, self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "client close")
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        self._finish(None)

    def events(self) -> EventStream:
        """An async iterator of this client's events from now on (see :mod:`.events`)."""
        stream = EventStream(self._streams.discard)
        if self._finished:
            stream._end()
        else:
            self._streams.add(stream)
        return stream

    # ---- commands ---------------------------------------------------------------------

    async def subscribe(
        self,
        channel: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe to a channel or pattern (``orders.*``, ``orders.>``); returns once the
        server answered ``subscribed`` (waiting for the connection if needed).

        Args:
            channel: a channel, or a pattern with NATS wildcards (docs/protocol.md).
            since: resume after this stream sequence (0 = all the history holds);
                None = live only.
            epoch: the stream epoch ``since`` belongs to (a message's ``epoch``).
            timeout: seconds to wait (None: until subscribed or refused).

        Returns:
            The :class:`Subscription` (an async iterator of :class:`Message`); for a
            channel already subscribed (also server-side), that same subscription.

        Raises:
            CommandError: refused (``forbidden``, ``invalid_channel``, ``limit_exceeded``,
                ``bad_request``); ``rate_limited``/``unavailable`` are retried instead.
            TimeoutError: not subscribed within ``timeout`` (the subscription is dropped).
            Stopped, ClientClosed: the client stopped or was closed.
            PushsvcError: ``not_connected``: :meth:`connect` was never called.
            ValueError, TypeError: a malformed ``channel``, ``since`` or ``epoch``.
        """
        if not isinstance(channel, str) or not channel:
            raise TypeError("channel must be a non-empty str")
        problem = wire.position_error(since, epoch)
        if problem:
            raise ValueError(problem)
        self._check_usable()
        if self._task is None:
            raise PushsvcError("not_connected", "call connect() first (or use async with)")
        sub = self._subs.get(channel)
        if sub is None:
            self._left.discard(channel)
            sub = self._subs[channel] = self._new_subscription(channel, since, epoch)
            if self._ws is not None and self._welcomed:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self._send_subscribe(self._ws, sub)
        try:
            async with asyncio.timeout(timeout):
                await sub._wait_confirmed()
        except TimeoutError:
            await sub.unsubscribe()
            raise
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe by name (see :meth:`Subscription.unsubscribe`); no-op when not subscribed."""
        sub = self._subs.get(channel)
        if sub is not None:
            await sub.unsubscribe()

    async def publish(
        self, channel: str, data: Any, *, echo: bool = True, timeout: float | None = None
    ) -> int | None:
        """Publish ``data`` (any JSON-encodable value) to ``channel``; needs a ``publish`` grant.

        With ``echo=False`` this connection does not get the message back (every other
        subscriber does); its ``seq`` is remembered on this client's subscriptions
        reaching ``channel``, so a resume after a reconnect does not replay it either.

        Returns:
            The stream sequence the message got (None with history off), once NATS has it.

        Raises:
            CommandError: ``forbidden``, ``invalid_channel``, ``rate_limited``, ``unavailable``.
            ConnectionLost: the connection dropped before the answer (maybe published).
            TimeoutError: no answer within ``timeout`` (default ``request_timeout``) seconds.
            TypeError: ``data`` is not JSON-encodable.
        """
        raw = msgspec.Raw(_encode(data))
        answer = await self._request(
            lambda id: wire.Publish(channel, raw, id=id, echo=echo),
            channel=channel,
            timeout=timeout,
        )
        assert isinstance(answer, wire.Published)
        if not echo and answer.seq is not None:
            for key, sub in self._subs.items():
                if key == channel or (
                    is_pattern(key)
                    and grant_matches(key, channel)
                    and pattern_reaches(key, channel)
                ):
                    if sub.last_seq is None or answer.seq > sub.last_seq:
                        sub.own.add(answer.seq)
        return answer.seq

    async def rpc(self, method: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Call ``method`` on a backend over NATS (``<prefix>-rpc.<method>``); needs an
        ``rpc`` grant covering it (docs/protocol.md, "RPC").

        Returns:
            The service's reply as decoded JSON (a string for other text; ``bytes``
            for a binary reply).

        Raises:
            CommandError: ``forbidden``, ``not_found`` (no service), ``unavailable``
                (no reply within the server's ``PUSHSVC_RPC_TIMEOUT``), ``too_large``,
                ``limit_exceeded``, ``rate_limited``, or the service's own code.
            ConnectionLost: the connection dropped before the answer (maybe called).
            TimeoutError: no answer within ``timeout`` (default ``request_timeout``) s.
            TypeError: ``data`` is not JSON-encodable.
        """
        raw = msgspec.Raw(_encode(data))
        answer = await self._request(
            lambda id: wire.Rpc(method, id=id, data=raw), channel=None, timeout=timeout
        )
        assert isinstance(answer, wire.RpcResult)
        value = msgspec.json.decode(answer.data)
        return base64.b64decode(value) if answer.encoding == "base64" else value

    async def presence(self, channel: str, *, timeout: float | None = None) -> Presence:
        """Who is subscribed to ``channel`` on every node; needs a ``presence`` grant.

        Raises:
            CommandError: ``forbidden``, ``bad_request`` (presence not enabled there),
                ``unavailable``; ConnectionLost, TimeoutError as :meth:`publish`.
        """
        f = await self._request(
            lambda id: wire.Presence(channel, id=id), channel=channel, timeout=timeout
        )
        assert isinstance(f, wire.PresenceResult)
        clients = [PresentClient(c.client, c.user, c.node, json_field(c.info)) for c in f.clients]
        return Presence(f.channel, clients, f.users, f.clients_total, bool(f.truncated))

    async def presence_stats(self, channel: str, *, timeout: float | None = None) -> PresenceStats:
        """Counts of connections and distinct users on ``channel`` (errors as :meth:`presence`)."""
        f = await self._request(
            lambda id: wire.PresenceStats(channel, id=id), channel=channel, timeout=timeout
        )
        assert isinstance(f, wire.PresenceStatsResult)
        return PresenceStats(f.channel, f.clients, f.users)

    async def refresh(self, token: str | None = None, *, timeout: float | None = None) -> float:
        """Replace the connection's token (same ``sub``) without reconnecting.

        Args:
            token: the new JWT; None: ask ``get_token``.

        Returns:
            The new ``exp`` (Unix seconds). Channels the new token no longer grants
            end with ``reason == "forbidden"`` (an :class:`Unsubscribed` event).

        Raises:
            ConnectionLost: the server refused the token (it closes with 4001).
            TypeError: no ``token`` and no ``get_token``.
        """
        if token is None:
            if self._get_token is None:
                raise TypeError("refresh() needs a token when the client has no get_token")
            token = await self._fetch_token()
        self._token = token  # also the token of the next connection
        f = await self._request(
            lambda id: wire.Refresh(token, id=id), channel=None, timeout=timeout
        )
        assert isinstance(f, wire.Refreshed)
        self._schedule_refresh(f.exp)
        return f.exp
