"""One authenticated WebSocket: command reader, outbound buffer + writer, heartbeat, limits.

Outbound path (what the hub calls, :meth:`Session.send`) never awaits the socket:

- frames are appended to an outbound buffer bounded in bytes
  (``PUSHSVC_SEND_QUEUE_BYTES``); overflow closes the session with 4009 (slow
  consumer);
- a flush runs once per event-loop iteration (``loop.call_soon``, no task): it
  joins pending frames with ``\\n`` into one text frame of at most
  ``coalesce_bytes`` (wire contract: one frame may carry several objects) and
  hands it to the ASGI ``send`` *eagerly*: when the server can write at once (the
  usual case) the send completes synchronously and no task is woken;
- only when the server applies backpressure (the socket is not draining) does a
  writer task take over, finish that send and drain the buffer; each send is
  bounded by ``PUSHSVC_SEND_TIMEOUT`` seconds, after which the session is closed
  and its buffer released.

Heartbeat, auth expiry and pong deadlines are ``loop.call_later`` timers, not tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import metrics
from .auth import Authenticator, AuthError, Principal
from .bus import Unavailable
from .channels import InvalidChannel, validate_channel
from .hub import Hub
from .protocol import (
    BAD_REQUEST,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_RATE_LIMITED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    FORBIDDEN,
    INVALID_CHANNEL,
    LIMIT_EXCEEDED,
    PING_FRAME,
    RATE_LIMITED,
    UNAVAILABLE,
    Auth,
    Error,
    Frame,
    Pong,
    ProtocolError,
    Publish,
    Published,
    Refresh,
    Refreshed,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode_command,
    encode_frame,
)
from .ratelimit import TokenBucket
from .settings import Settings

log = logging.getLogger("pushsvc.session")

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

_ids = itertools.count(1)
_NODE = os.urandom(3).hex()
CLOSE_TIMEOUT = 2.0  # seconds to get a close frame out before dropping the socket


class Session:
    """One authenticated connection.

    Args:
        send / receive: the ASGI callables of an *accepted* WebSocket.
        principal: the verified token's principal.
        hub: the node's hub (subscriptions, publish).
        auth: verifies refresh tokens.
        bucket: the user's command token bucket (shared by the user's sessions).
        settings: limits and timers (seconds, bytes).

    Attributes:
        channels: channels this session is subscribed to.
        buffered_bytes: UTF-8 bytes accepted by :meth:`send` and not yet handed to
            the server (pending + in flight in a blocked send).
        close_code: the close code once closed.
    """

    def __init__(
        self,
        send: ASGISend,
        receive: ASGIReceive,
        principal: Principal,
        hub: Hub,
        auth: Authenticator,
        bucket: TokenBucket,
        settings: Settings,
    ) -> None:
        self._send = send
        self._receive = receive
        self.principal = principal
        self.hub = hub
        self.auth = auth
        self.bucket = bucket
        self.settings = settings
        self.id = f"{_NODE}-{next(_ids)}"
        self.channels: set[str] = set()
        self.closed = False
        self.close_code: int | None = None
        self._loop = asyncio.get_running_loop()
        self._out: deque[tuple[str, int]] = deque()
        self._out_bytes = 0
        self._inflight_bytes = 0
        self._max_bytes = settings.send_queue_bytes
        self._coalesce = settings.coalesce_bytes
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._exp_timer: asyncio.TimerHandle | None = None

    # --- outbound ----------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Bytes queued for this socket and not yet accepted by the server."""
        return self._out_bytes + self._inflight_bytes

    def send(self, frame: str, nbytes: int) -> None:
        """Queue one encoded frame (``nbytes`` = its UTF-8 length). Never blocks.

        Closes the session with 4009 when the buffer would exceed
        ``send_queue_bytes``.
        """
        if self.closed:
            return
        self._out.append((frame, nbytes))
        self._out_bytes += nbytes
        if self._out_bytes + self._inflight_bytes > self._max_bytes:
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer overflow")
            return
        if not self._scheduled and self._writer is None:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def send_frame(self, frame: Frame) -> None:
        """Encode and queue one control frame (answers, errors)."""
        raw = encode_frame(frame)
        self.send(raw.decode(), len(raw))

    def _take_batch(self) -> tuple[str, int]:
        """Pop pending frames joined by newlines, up to ``coalesce_bytes`` (at least one)."""
        out = self._out
        frame, size = out.popleft()
        if out and size < self._coalesce:
            parts = [frame]
            while out and size + 1 + out[0][1] <= self._coalesce:
                f, n = out.popleft()
                parts.append(f)
                size += 1 + n
            frame = "\n".join(parts)
            taken = size - (len(parts) - 1)
        else:
            taken = size
        self._out_bytes -= taken
        return frame, size

    def _flush(self) -> None:
        self._scheduled = False
        if self._writer is not None or self.closed:
            return
        while self._out:
            text, size = self._take_batch()
            coro = self._send({"type": "websocket.send", "text": text})
            try:
                blocker = coro.send(None)
            except StopIteration:
                continue
            except Exception:  # the peer is gone: the reader sees the disconnect
                self._drop_output()
                return
            self._inflight_bytes = size
            self._writer = self._loop.create_task(self._drain(coro, blocker))
            return

    async def _drain(self, coro: Coroutine[Any, Any, None], blocker: Any) -> None:
        """Finish a send that hit backpressure, then drain the buffer, each send timed."""
        try:
            async with asyncio.timeout(self.settings.send_timeout):
                await _resume(coro, blocker)
            self._inflight_bytes = 0
            while self._out and not self.closed:
                text, size = self._take_batch()
                self._inflight_bytes = size
                async with asyncio.timeout(self.settings.send_timeout):
                    await self._send({"type": "websocket.send", "text": text})
                self._inflight_bytes = 0
        except TimeoutError:
            self._writer = None
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send timeout")
        except asyncio.CancelledError:
            raise
        except Exception:
            self._drop_output()
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    def _drop_output(self) -> None:
        self._out.clear()
        self._out_bytes = 0
        self._inflight_bytes = 0

    # --- lifecycle -----------------------------------------------------------------------
    def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` (see protocol.py); idempotent, never blocks.

        Releases the buffer and the session's channels at once; the close frame
        is sent in the background, bounded by ``CLOSE_TIMEOUT`` seconds, after which
        the connection is dropped.
        """
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        metrics.CLOSES.labels(str(code)).inc()
        self._cancel_timers()
        self._drop_output()
        self.hub.remove_session(self)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
        self._loop.create_task(self._send_close(code, reason.encode()[:120].decode(errors="ignore")))

    async def _send_close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            return
        except Exception:
            pass
        # The close frame could not be written (peer not reading): stop the reader so
        # the ASGI app returns and the server drops the connection.
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    def _cancel_timers(self) -> None:
        for timer in (self._ping_timer, self._pong_timer, self._exp_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._exp_timer = None

    def _schedule_ping(self) -> None:
        self._ping_timer = self._loop.call_later(self.settings.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.closed:
            return
        self.send(PING_FRAME, len(PING_FRAME))
        if self._pong_timer is None:
            self._pong_timer = self._loop.call_later(
                self.settings.pong_timeout, self.close, CLOSE_HEARTBEAT_TIMEOUT, "no pong"
            )
        self._schedule_ping()

    def _schedule_expiry(self) -> None:
        if self._exp_timer is not None:
            self._exp_timer.cancel()
        delay = max(0.0, self.auth.expires_in(self.principal))
        self._exp_timer = self._loop.call_later(
            delay, self.close, CLOSE_UNAUTHORIZED, "token expired"
        )

    async def run(self) -> None:
        """Serve the connection until it closes: welcome, then read commands.

        The caller has accepted the WebSocket and registered nothing; ``run``
        registers with the hub and always unregisters.
        """
        self._reader = asyncio.current_task()
        self.hub.add_session(self)
        self.send_frame(
            Welcome(
                client=self.id,
                user=self.principal.sub,
                ping_interval=self.settings.ping_interval,
                exp=self.principal.exp,
            )
        )
        self._schedule_ping()
        self._schedule_expiry()
        try:
            while not self.closed:
                message = await self._receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    await self.handle_frame(message.get("text"), message.get("bytes"))
                elif kind == "websocket.disconnect":
                    break
        except asyncio.CancelledError:
            if not self.closed:
                raise
        finally:
            self.closed = True
            self._cancel_timers()
            self._drop_output()
            self.hub.remove_session(self)
            if self._writer is not None:
                self._writer.cancel()

    # --- inbound -----------------------------------------------------------------------
    async def handle_frame(self, text: str | None, data: bytes | None) -> None:
        """Handle one client frame (text JSON command; binary frames are refused)."""
        if text is None:
            self._refuse(BAD_REQUEST, "binary frames are not supported", None, charge=True)
            return
        if len(text) > self.settings.max_frame_bytes:
            self.close(CLOSE_TOO_BIG, "frame too big")
            return
        try:
            cmd = decode_command(text)
        except ProtocolError as exc:
            self._refuse(BAD_REQUEST, str(exc), None, charge=True)
            return
        if isinstance(cmd, Pong):
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
            return
        if isinstance(cmd, Auth):
            self._refuse(BAD_REQUEST, "already authenticated", None, charge=True)
            return
        metrics.COMMANDS.labels(type(cmd).__name__.lower()).inc()
        wait = self.bucket.take()
        if wait:
            self._rate_limited(wait, cmd.id)
            return
        if isinstance(cmd, Subscribe):
            await self._subscribe(cmd)
        elif isinstance(cmd, Unsubscribe):
            await self._unsubscribe(cmd)
        elif isinstance(cmd, Publish):
            await self._publish(cmd)
        elif isinstance(cmd, Refresh):
            self._refresh(cmd)

    def _refuse(self, code: str, message: str, req_id: object, *, charge: bool = False) -> None:
        self.send_frame(Error(code=code, message=message, id=req_id))  # type: ignore[arg-type]
        if charge:
            wait = self.bucket.take()
            if wait:
                self._rate_limited(wait, None)

    def _rate_limited(self, wait: float, req_id: object) -> None:
        metrics.RATE_LIMITED.inc()
        if self.bucket.strikes > self.settings.rate_limit_strikes:
            self.close(CLOSE_RATE_LIMITED, "rate limit exceeded repeatedly")
            return
        self.send_frame(
            Error(
                code=RATE_LIMITED,
                message="too many commands",
                id=req_id,  # type: ignore[arg-type]
                retry_after=round(wait, 3),
            )
        )

    async def _subscribe(self, cmd: Subscribe) -> None:
        try:
            channel = validate_channel(cmd.channel)
        except InvalidChannel as exc:
            self._refuse(INVALID_CHANNEL, str(exc), cmd.id)
            return
        if not self.principal.can_subscribe(channel):
            self._refuse(FORBIDDEN, f"not allowed to subscribe to {channel}", cmd.id)
            return
        if channel in self.channels:
            self._refuse(BAD_REQUEST, f"already subscribed to {channel}", cmd.id)
            return
        if len(self.channels) >= self.settings.max_subscriptions:
            self._refuse(
                LIMIT_EXCEEDED,
                f"at most {self.settings.max_subscriptions} subscriptions per connection",
                cmd.id,
            )
            return
        if cmd.since is not None and cmd.since < 0:
            self._refuse(BAD_REQUEST, "since must be >= 0", cmd.id)
            return
        try:
            await self.hub.subscribe(self, channel, cmd.since, cmd.id)
        except Unavailable as exc:
            self._refuse(UNAVAILABLE, str(exc), cmd.id)

    async def _unsubscribe(self, cmd: Unsubscribe) -> None:
        try:
            channel = validate_channel(cmd.channel)
        except InvalidChannel as exc:
            self._refuse(INVALID_CHANNEL, str(exc), cmd.id)
            return
        self.hub.unsubscribe(self, channel)
        self.send_frame(Unsubscribed(channel=channel, id=cmd.id))

    async def _publish(self, cmd: Publish) -> None:
        try:
            channel = validate_channel(cmd.channel)
        except InvalidChannel as exc:
            self._refuse(INVALID_CHANNEL, str(exc), cmd.id)
            return
        if not self.principal.can_publish(channel):
            self._refuse(FORBIDDEN, f"not allowed to publish to {channel}", cmd.id)
            return
        try:
            seq = await self.hub.publish(channel, bytes(cmd.data))
        except Unavailable as exc:
            self._refuse(UNAVAILABLE, str(exc), cmd.id)
            return
        self.send_frame(Published(id=cmd.id, seq=seq))

    def _refresh(self, cmd: Refresh) -> None:
        try:
            principal = self.auth.verify(cmd.token)
        except AuthError as exc:
            self.close(CLOSE_UNAUTHORIZED, f"refresh failed: {exc}")
            return
        if principal.sub != self.principal.sub:
            self.close(CLOSE_UNAUTHORIZED, "refresh token is for another user")
            return
        self.principal = principal
        self._schedule_expiry()
        for channel in sorted(self.channels):
            if not principal.can_subscribe(channel):
                self.hub.unsubscribe(self, channel)
                self.send_frame(Unsubscribed(channel=channel, reason=FORBIDDEN))
        self.send_frame(Refreshed(exp=principal.exp, id=cmd.id))


async def _resume(coro: Coroutine[Any, Any, None], blocker: Any) -> None:
    """Finish driving ``coro``, which already yielded ``blocker`` (a future or None).

    Used after an eager ``coro.send(None)`` found the send blocked on backpressure:
    awaiting what it waits for and resuming it is what a Task would do.
    """
    try:
        while True:
            if blocker is None:
                await asyncio.sleep(0)
            else:
                await blocker
            blocker = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()
