"""The connection loop of a :class:`~pushsvc.client.Client`: connect, authenticate,
read frames, answer pings, watch the heartbeat, refresh the token, and reconnect
after a close as the close-code table says (see :mod:`pushsvc.client.client` for
the rules)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import process_exception

from .. import protocol as wire
from .backoff import full_jitter
from .closecodes import CLOSE_ABNORMAL, RATE_LIMITED_DELAY, describe, reconnect_delay
from .dispatch import FrameHandlers
from .errors import ClientClosed, ConnectionLost, PushsvcError, Stopped, Unauthorized
from .events import Connected, Disconnected, Event, EventStream, ServerError, State
from .subscription import Subscription

log = logging.getLogger("pushsvc.client")

TokenSource = Callable[[], "str | Awaitable[str]"]

#: seconds to wait for the server's close frame when closing
CLOSE_TIMEOUT = 2.0
#: seconds before ``exp`` a token is refreshed; seconds between refresh retries
REFRESH_MARGIN = 30.0
REFRESH_RETRY = 10.0


def _encode(command: msgspec.Struct) -> str:
    """A command as JSON text (sent as a text frame: the contract has no binary frames)."""
    return msgspec.json.encode(command).decode()


class _Pending:
    """A command waiting for its answer: a future (publish, presence...) or a subscription."""

    __slots__ = ("channel", "future", "sub")

    def __init__(
        self, future: asyncio.Future[Any] | None, channel: str | None, sub: Subscription | None
    ) -> None:
        self.future = future
        self.channel = channel
        self.sub = sub


class Connection(FrameHandlers):
    """State and machinery of one client: the current socket, subscriptions, pending
    commands, timers. :class:`~pushsvc.client.Client` adds the public API."""

    def __init__(
        self,
        url: str,
        token: str | None,
        get_token: TokenSource | None,
        on_event: Callable[[Event], None] | None,
        buffer_size: int,
        connect_timeout: float,
        request_timeout: float,
        connect_options: dict[str, Any],
    ) -> None:
        self.url = url
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.welcome: Connected | None = None
        self.error: Stopped | None = None
        self._token = token or None
        self._get_token = get_token
        self._on_event = on_event
        self._connect_options: dict[str, Any] = {
            "compression": None,
            "close_timeout": CLOSE_TIMEOUT,
            "ping_interval": None,  # liveness is the server's `ping` + the watchdog
            **connect_options,
            "process_exception": self._connect_failed,
            "reconnect_delays": self._connect_delays,
        }
        self._state: State = "disconnected"
        self._subs: dict[str, Subscription] = {}
        self._left: set[str] = set()  # server-side subscriptions the app unsubscribed
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._ws: ClientConnection | None = None
        self._welcomed = False
        self._heartbeat_timeout = connect_timeout
        self._attempt = 0  # reconnection attempts since the last welcome
        self._failure: Exception | None = None  # the last failed connection attempt
        self._task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.Task[None]] = set()  # per connection: refresh, resubscribes
        self._refresh: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._streams: set[EventStream] = set()
        self._closing = False
        self._finished = False
        self._stop_code = CLOSE_ABNORMAL  # reported for a stop that had no close code

    async def _run(self) -> None:
        try:
            await self._connections()
        except Stopped as exc:
            self._finish(exc)
        except Exception as exc:  # a bug: say so, and stop rather than spin
            log.exception("pushsvc client for %s failed", self.url)
            self._finish(Stopped(f"{self.url}: client failed: {exc!r}"))
        else:
            self._finish(self.error)

    async def _connections(self) -> None:
        """Connect, serve, reconnect until stopped. Returns on a stop; raises Stopped for a
        refused handshake or a token that cannot be had."""
        await self._ensure_token()
        try:
            async with contextlib.aclosing(
                aiter(connect(self.url, **self._connect_options))
            ) as attempts:
                async for ws in attempts:
                    code, reason = await self._session(ws)
                    if self._closing or self.error is not None:
                        return
                    delay = self._closed_with(code, reason)
                    if delay is None:
                        return
                    await asyncio.sleep(delay)
                    if code == wire.CLOSE_UNAUTHORIZED:
                        self._token = None
                    await self._ensure_token()
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip()[:200]
            raise Stopped(
                f"{self.url} refused the handshake: {status} {body}", status=status, reason=body
            ) from None
        except (websockets.InvalidURI, websockets.InvalidHandshake) as exc:
            raise Stopped(f"{self.url}: {exc}", reason=str(exc)) from None

    async def _session(self, ws: ClientConnection) -> tuple[int, str]:
        """One connection: auth, then frames until it closes. Returns (code, reason)."""
        self._ws = ws
        try:
            await ws.send(self._auth_frame())
            while True:
                timeout = self._heartbeat_timeout if self._welcomed else self.connect_timeout
                try:
                    async with asyncio.timeout(timeout):
                        frame = await ws.recv()
                except TimeoutError:
                    reason = "heartbeat timeout" if self._welcomed else "connect timeout"
                    log.info("pushsvc client: no frame for %.1f s: closing (%s)", timeout, reason)
                    await ws.close(wire.CLOSE_HEARTBEAT_TIMEOUT, reason)
                    return wire.CLOSE_HEARTBEAT_TIMEOUT, reason
                if isinstance(frame, str):  # the contract has text frames only
                    for line in frame.split("\n"):
                        if line:
                            await self._on_line(ws, line)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is None:
                return CLOSE_ABNORMAL, describe(CLOSE_ABNORMAL)
            return exc.rcvd.code, describe(exc.rcvd.code, exc.rcvd.reason)
        finally:
            self._detach()

    def _closed_with(self, code: int, reason: str) -> float | None:
        """Apply the close-code table: the delay before reconnecting, or None (stopped)."""
        delay = reconnect_delay(code, self._attempt, renewable=self._get_token is not None)
        self._attempt += 1
        if delay is None:
            text = f"{self.url} closed the connection: {code} {reason}"
            stop = Unauthorized if code == wire.CLOSE_UNAUTHORIZED else Stopped
            self.error = stop(text, close_code=code, reason=reason)
            return None
        self._state = "connecting"
        self._emit(Disconnected(code, reason, True, delay))
        return delay

    def _connect_failed(self, exc: Exception) -> Exception | None:
        """``process_exception`` of ``connect``: the library's verdict (retry network errors
        and 500/502/503/504, raise the rest), and 429 (per-user cap) retried too."""
        verdict = process_exception(exc)
        if isinstance(exc, websockets.InvalidStatus) and exc.response.status_code == 429:
            verdict = None
        if verdict is None:
            self._failure = exc
        return verdict

    def _connect_delays(self) -> Generator[float]:
        """``reconnect_delays`` of ``connect``: full jitter on this client's attempt counter."""
        while True:
            exc = self._failure
            delay = full_jitter(self._attempt)
            if isinstance(exc, websockets.InvalidStatus) and exc.response.status_code == 429:
                delay += RATE_LIMITED_DELAY
            self._attempt += 1
            self._emit(Disconnected(CLOSE_ABNORMAL, _cause(exc), True, delay, exc))
            yield delay

    async def _ensure_token(self) -> None:
        """Have a token: ask ``get_token`` until it gives one (backoff between failures)."""
        while self._token is None:
            try:
                self._token = await self._fetch_token()
            except Stopped:
                raise
            except Exception as exc:
                delay = full_jitter(self._attempt)
                self._attempt += 1
                reason = f"get_token failed: {exc!r}"
                self._emit(Disconnected(wire.CLOSE_UNAUTHORIZED, reason, True, delay, exc))
                await asyncio.sleep(delay)

    async def _fetch_token(self) -> str:
        assert self._get_token is not None
        token = self._get_token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError(f"get_token returned {type(token).__name__}, not a non-empty str")
        return token

    def _auth_frame(self) -> str:
        """``auth`` with the token and the positions of server-side subscriptions."""
        assert self._token is not None
        subs = {
            s.channel: wire.SubResume(since=s.last_seq, epoch=s.epoch)
            for s in self._subs.values()
            if s.server and s.last_seq is not None
        }
        return _encode(wire.Auth(self._token, subs=subs or None))

    def _detach(self) -> None:
        """The connection is gone: fail waiting commands, stop its timers."""
        self._ws = None
        self._welcomed = False
        for task in list(self._timers):
            if task is not asyncio.current_task():
                task.cancel()
        self._timers.clear()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.future is not None and not p.future.done():
                p.future.set_exception(ConnectionLost())
        for sub in self._subs.values():
            sub._suspend()

    def _finish(self, error: Stopped | None) -> None:
        """Stopped (``error``) or closed by the app (None): final event, end everything."""
        if self._finished:
            return
        self._finished = True
        self._detach()
        self.error = error
        self._state = "disconnected"
        if error is None:
            self._emit(Disconnected(1000, "client close", False, None))
        else:
            code = error.close_code or self._stop_code
            cause = None if error.close_code is not None else error
            self._emit(Disconnected(code, error.reason or error.message, False, None, cause))
        for sub in list(self._subs.values()):
            sub._end("closed" if error is None else error.code, error)
        self._wake()
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()

    def _check_usable(self) -> None:
        if self.error is not None:
            raise self.error
        if self._finished or self._closing:
            raise ClientClosed()

    async def _wait_connected(self) -> ClientConnection:
        while True:
            self._check_usable()
            if self._ws is not None and self._welcomed:
                return self._ws
            if self._task is None:
                raise PushsvcError("not_connected", "call connect() first (or use async with)")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("pushsvc client: on_event callback failed on %r", event)
        for stream in self._streams:
            stream._push(event)

    def _later(self, delay: float, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``work`` after ``delay`` seconds unless the connection goes first."""

        async def run() -> None:
            await asyncio.sleep(delay)
            await work()

        task = asyncio.create_task(run())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
        return task

    # ---- internals: commands -----------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _new_subscription(
        self, channel: str, since: int | None = None, epoch: str | None = None, server: bool = False
    ) -> Subscription:
        return Subscription(
            channel,
            since=since,
            epoch=epoch,
            server=server,
            buffer_size=self.buffer_size,
            unsubscribe=self._unsubscribe,
        )

    async def _request(
        self,
        command: Callable[[int], Any],
        *,
        channel: str | None,
        timeout: float | None,
        connected_only: bool = False,
    ) -> wire.Frame | None:
        """Send ``command(id)`` and wait for the frame answering ``id``."""
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            if connected_only and (self._ws is None or not self._welcomed):
                return None
            ws = await self._wait_connected()
            id = self._new_id()
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending[id] = _Pending(future, channel, None)
            try:
                await ws.send(_encode(command(id)))
                return await future
            except websockets.ConnectionClosed:
                raise ConnectionLost() from None
            finally:
                self._pending.pop(id, None)

    async def _send_subscribe(self, ws: ClientConnection, sub: Subscription) -> None:
        id = self._new_id()
        self._pending[id] = _Pending(None, sub.channel, sub)
        since = sub.last_seq
        epoch = sub.epoch if since is not None else None
        await ws.send(_encode(wire.Subscribe(sub.channel, since=since, id=id, epoch=epoch)))

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        if sub.server:
            self._left.add(sub.channel)  # the next welcome subscribes it again: leave it then
        if self._finished:
            return
        with contextlib.suppress(ConnectionLost):
            await self._request(
                lambda id: wire.Unsubscribe(sub.channel, id=id),
                channel=sub.channel,
                timeout=None,
                connected_only=True,
            )

    def _schedule_refresh(self, exp: float) -> None:
        """Refresh at ``exp - 30 s`` (halfway for short tokens), with ``get_token``."""
        if self._refresh is not None and self._refresh is not asyncio.current_task():
            self._refresh.cancel()
        self._refresh = None
        if self._get_token is None:
            return
        left = exp - time.time()
        delay = max(left - REFRESH_MARGIN, left / 2, 1.0)
        self._refresh = self._later(delay, lambda: self._auto_refresh(exp))

    async def _auto_refresh(self, exp: float) -> None:
        while True:
            try:
                await self.refresh(await self._fetch_token())
                return
            except Stopped as exc:  # get_token: Unauthorized: the user may not stay
                self.error = exc
                self._stop_code = 1000  # closed by us, normally
                if self._ws is not None:
                    await self._ws.close(1000, "unauthorized")
                return
            except (ConnectionLost, ClientClosed):
                return  # the reconnect gets a token of its own
            except Exception as exc:
                self._emit(ServerError(exc))
                if exp - time.time() <= 0:
                    return  # the server closes with 4001; get_token is asked again then
                await asyncio.sleep(REFRESH_RETRY)


def _cause(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words (``connection refused``)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own text names no cause
    if isinstance(exc, websockets.InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (str(exc) or type(exc).__name__) if exc is not None else "connection failed"
