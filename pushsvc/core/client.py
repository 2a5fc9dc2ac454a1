"""One authenticated WebSocket: command reader, outbound buffer + writer, heartbeat, limits.

Outbound path never awaits the socket. The hub hands each channel batch to its
sessions with :func:`fan_out`: a direct transport write for a session with
nothing pending and an idle, open socket, else :meth:`Session.send`, which (like
every answer and ping) goes through the session's buffer:

- frames are appended to an outbound buffer bounded in bytes
  (``PUSHSVC_SEND_QUEUE_BYTES``, counted exactly in UTF-8 bytes, including a
  send in flight); overflow closes the session with 4009 (slow consumer);
- a flush runs once per event-loop iteration for every session that got frames
  (one ``loop.call_soon`` for all of them: :class:`~pushsvc.core.outbox.FlushQueue`): it
  joins pending frames with ``\\n`` into one text frame of at most
  ``coalesce_bytes`` (wire contract: one frame may carry several objects) and
  hands it to the ASGI ``send`` *eagerly* (``coro.send(None)``): when the server
  can write at once (the usual case) the send completes synchronously and no
  task is woken. A burst that fills a whole batch is written at once, so a
  session whose socket keeps up never holds more than one batch;
- only when the server applies backpressure (uvicorn's ``writable`` event is
  clear: the socket is not draining) does a writer task take over, finish that
  send and drain the buffer; each send is bounded by ``PUSHSVC_SEND_TIMEOUT``
  seconds, after which the session is closed 4009 and its buffer released.

Heartbeat, auth expiry and pong deadlines are coarse (:mod:`pushsvc.core.deadlines`:
one loop timer per 0.1 s tick for every session), not tasks or per-session timers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from operator import methodcaller
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..auth.tokens import Authenticator, AuthError, Principal
from ..bus import Unavailable
from ..channels import (
    InvalidChannel,
    is_pattern,
    personal_channel,
    validate_channel,
    validate_pattern,
)
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_INTERNAL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_SERVICE_RESTART,
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
    Presence,
    PresenceResult,
    PresenceStats,
    PresenceStatsResult,
    ProtocolError,
    Publish,
    Published,
    Refresh,
    Refreshed,
    SubResume,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode_command,
    encode_frame,
    position_error,
)
from .deadlines import deadlines
from .outbox import (
    abort_connection,
    can_write_direct,
    direct_protocol,
    flush_queue,
    resume,
    text_frame,
    utf8_len,
)
from .presence import PresenceRefused, PresenceRegistry
from .ratelimit import TokenBucket

if TYPE_CHECKING:  # the hub imports this module (fan_out); sessions only hold a reference
    from .hub import Hub

log = logging.getLogger("pushsvc.core.client")

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

_ids = itertools.count(1)
_NODE = os.urandom(3).hex()
CLOSE_TIMEOUT = 2.0  # seconds to get a close frame out before dropping the socket
# what the deadlines call on a session (by name: a subclass's override is honoured)
_PING, _PONG_MISSED, _EXPIRED = (methodcaller(n) for n in ("_ping", "_pong_missed", "_expired"))
_PING_WIRE = text_frame(PING_FRAME)  # the ping as a server text frame (RFC 6455 5.2)


class Session:
    """One authenticated connection.

    Args:
        send / receive: the ASGI callables of an *accepted* WebSocket.
        principal: the verified token's principal.
        hub: the node's hub (subscriptions, publish).
        auth: verifies refresh tokens.
        bucket: the user's command token bucket (shared by the user's sessions).
        settings: limits and timers (seconds, bytes).
        resume_subs: the auth frame's ``subs`` map (channel -> ``since``/``epoch``),
            used by the server-side subscriptions (:meth:`server_subscriptions`).
        presence: the node's presence registry (reads for the ``presence`` and
            ``presence_stats`` commands); None: presence is off for this session.

    Attributes:
        channels: channels this session is subscribed to.
        buffered_bytes: UTF-8 bytes accepted by :meth:`send` and not yet handed to
            the server (pending + in flight in a blocked send).
        close_code: the close code once closed.
    """

    # fixed attributes: the hub's fan-out reads a few of them per socket per batch,
    # and a slotted object keeps them together (fewer cache misses than an
    # instance dict; measured in docs/benchmarks.md), and smaller per connection
    # the four slots fan_out reads for every socket come first, so they share a
    # cache line: a fan-out walks thousands of sessions, mostly cold in cache
    __slots__ = (  # noqa: RUF023
        "_transport",
        "_out_bytes",
        "_writer",
        "channels",
        "__weakref__",
        "_closer",
        "_coalesce",
        "_direct",
        "_expiries",
        "_flushes",
        "_inflight_bytes",
        "_loop",
        "_max_bytes",
        "_out",
        "_out_bytes",
        "_pings",
        "_pongs",
        "_reader",
        "_receive",
        "_resume",
        "_scheduled",
        "_send",
        "_strikes",
        "auth",
        "bucket",
        "close_code",
        "closed",
        "hub",
        "id",
        "presence",
        "principal",
        "settings",
    )

    def __init__(
        self,
        send: ASGISend,
        receive: ASGIReceive,
        principal: Principal,
        hub: Hub,
        auth: Authenticator,
        bucket: TokenBucket,
        settings: Settings,
        *,
        resume_subs: Mapping[str, SubResume] | None = None,
        presence: PresenceRegistry | None = None,
    ) -> None:
        self._send = send
        self._receive = receive
        self.principal = principal
        self.hub = hub
        self.auth = auth
        self.bucket = bucket
        self.settings = settings
        self.presence = presence
        self.id = f"{_NODE}-{next(_ids)}"
        self.channels: set[str] = set()
        self.closed = False
        self.close_code: int | None = None
        self._loop = asyncio.get_running_loop()
        self._out: deque[str] = deque()  # pending frames; their UTF-8 sizes sum to _out_bytes
        self._out_bytes = 0
        self._inflight_bytes = 0
        self._max_bytes = settings.send_queue_bytes
        self._coalesce = settings.coalesce_bytes
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._flushes = flush_queue(self._loop)
        self._closer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[Any] | None = None
        # deadlines (pushsvc.core.deadlines): next ping, the pong awaited, the token's expiry
        self._pings = deadlines(self._loop, "ping", _PING)
        self._pongs = deadlines(self._loop, "pong", _PONG_MISSED)
        self._expiries = deadlines(self._loop, "expiry", _EXPIRED)
        self._strikes = 0  # command refusals in a row on this connection
        self._direct = direct_protocol(receive)
        # the direct path's transport, read by fan_out (one attribute, no protocol hop)
        self._transport = None if self._direct is None else self._direct.transport
        self._resume = dict(resume_subs or {})  # server-side subs to resume

    # --- outbound ----------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Bytes queued for this socket and not yet accepted by the server."""
        return self._out_bytes + self._inflight_bytes

    def send(self, frame: str, nbytes: int) -> None:
        """Queue one encoded frame (``nbytes`` = its UTF-8 length). Never blocks.

        The first frame of a loop iteration schedules a flush; when a whole batch
        (``coalesce_bytes``) is pending and no writer is busy it is written at
        once. Closes the session with 4009 when :attr:`buffered_bytes` would
        exceed ``send_queue_bytes``.
        """
        if self.closed:
            return
        self._out.append(frame)
        self._out_bytes += nbytes
        if self._out_bytes + self._inflight_bytes > self._max_bytes:
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send buffer overflow")
        elif self._writer is None:
            if self._out_bytes >= self._coalesce:
                self._write_pending()
            elif not self._scheduled:
                self._scheduled = True
                self._flushes.add(self)

    def send_frame(self, frame: Frame) -> None:
        """Encode and queue one control frame (answers, errors)."""
        raw = encode_frame(frame)
        self.send(raw.decode(), len(raw))

    def _take_batch(self) -> tuple[str, int]:
        """Pop pending frames joined by ``\\n`` into one text of at most ``coalesce_bytes``.

        Returns ``(text, taken)``: ``taken`` is the sum of the popped frames' sizes,
        i.e. what leaves the pending count (separators were never counted). A single
        frame larger than ``coalesce_bytes`` goes out alone. Call only with frames
        pending.
        """
        out = self._out
        taken = self._out_bytes
        if len(out) == 1:
            self._out_bytes = 0
            return out.popleft(), taken
        if taken + len(out) - 1 <= self._coalesce:  # all fits: one join, no per-frame work
            text = "\n".join(out)
            out.clear()
            self._out_bytes = 0
            return text, taken
        frame = out.popleft()
        taken = size = utf8_len(frame)
        parts = [frame]
        while out:
            n = utf8_len(out[0])
            if size + 1 + n > self._coalesce:
                break
            parts.append(out.popleft())
            size += 1 + n
            taken += n
        self._out_bytes -= taken
        return ("\n".join(parts) if len(parts) > 1 else frame), taken

    def _flush(self) -> None:
        """The scheduled flush (see :class:`~pushsvc.core.outbox.FlushQueue`)."""
        self._scheduled = False
        if self._writer is None and not self.closed:
            self._write_pending()

    def _write_pending(self) -> None:
        """Hand pending batches to the server eagerly until done or it applies backpressure.

        Each ASGI send coroutine is started with ``coro.send(None)``: if the server
        writes at once it finishes here (``StopIteration``) with no task. If it
        yields (waiting for the socket to drain), the batch is in flight and the
        writer task :meth:`_drain` takes over.
        """
        out = self._out
        send = self._send
        direct = self._direct
        while out:
            text, taken = self._take_batch()
            if direct is not None and can_write_direct(direct):
                direct.transport.write(text_frame(text))
                continue
            coro = send({"type": "websocket.send", "text": text})
            try:
                blocker = coro.send(None)
            except StopIteration:
                continue
            except Exception as exc:
                self._send_failed(exc)
                return
            self._inflight_bytes = taken
            self._writer = self._loop.create_task(self._drain(coro, blocker))
            return

    async def _drain(self, coro: Coroutine[Any, Any, None], blocker: Any) -> None:
        """Writer task: finish a send that hit backpressure, then drain the buffer.

        Every send is bounded by ``send_timeout`` seconds; a socket that does not
        take a batch in time is closed 4009 and its buffer released. When the
        buffer is empty the task ends and the session is back to eager flushes.
        """
        timeout = self.settings.send_timeout
        try:
            async with asyncio.timeout(timeout):
                await resume(coro, blocker)
            self._inflight_bytes = 0
            while self._out and not self.closed:
                text, taken = self._take_batch()
                self._inflight_bytes = taken
                async with asyncio.timeout(timeout):
                    await self._send({"type": "websocket.send", "text": text})
                self._inflight_bytes = 0
        except TimeoutError:
            self._writer = None  # so close() does not cancel this task
            metrics.SLOW_CONSUMERS.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: send timeout")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._writer is asyncio.current_task():
                self._writer = None  # so close() does not cancel this task
            self._send_failed(exc)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    def _send_failed(self, exc: Exception) -> None:
        """An ASGI send raised: the peer is gone (``OSError``, per the ASGI spec) or a bug.

        A gone peer: drop the buffer, the reader sees the disconnect. Anything else
        must not lose frames silently: log it and close with 1011.
        """
        self._drop_output()
        if not isinstance(exc, OSError):
            log.error("send failed on session %s", self.id, exc_info=exc)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

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
        # a drain closes every session with 1012: one line per socket only at debug
        level = logging.DEBUG if code == CLOSE_SERVICE_RESTART else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "session closed",
                extra={
                    "client": self.id,
                    "code": code,
                    "reason": reason,
                    "channels": len(self.channels),
                },
            )
        self._cancel_timers()
        self._drop_output()
        self.hub.remove_session(self)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()  # closes the ASGI send it was waiting on
        reason = reason.encode()[:120].decode(errors="ignore")
        self._closer = self._loop.create_task(self._send_close(code, reason))

    async def _send_close(self, code: int, reason: str) -> None:
        """Write the close frame; if the peer does not take it in time, drop the connection.

        A peer that does not read keeps the server's buffers (the transport's and
        the kernel's, megabytes) full, and a graceful close waits for them to drain:
        so the TCP connection is aborted (uvicorn) and the reader stopped.
        """
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            return
        except Exception:
            pass
        abort_connection(self._receive)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    def _cancel_timers(self) -> None:
        self._pings.clear(self)
        self._pongs.clear(self)
        self._expiries.clear(self)

    def _schedule_ping(self) -> None:
        self._pings.set(self, self.settings.ping_interval)

    def _ping(self) -> None:
        """The ping deadline: send ``ping``, await a ``pong`` (if not already), re-arm.

        On the direct path with nothing pending the pre-framed ping is written to
        the transport as :func:`fan_out` writes a message (one ``write``, no
        buffer, flush callback or ASGI send): an idle node's CPU is mostly
        heartbeats (docs/capacity.md, "Idle").
        """
        if self.closed:
            return
        transport = self._transport
        if (
            transport is not None
            and not self._out_bytes
            and self._writer is None
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            transport.write(_PING_WIRE)
        else:
            self.send(PING_FRAME, len(PING_FRAME))
        if self not in self._pongs:
            self._pongs.set(self, self.settings.pong_timeout)
        self._schedule_ping()

    def pong(self) -> None:
        """A ``pong`` came: free when it answers a ping, else it costs a command token.

        Called for every pong: from :meth:`handle_frame`, or straight from the
        WebSocket protocol (``on_pong``, :mod:`pushsvc.ws.protocol`) for the
        canonical ``{"op":"pong"}``, which then never reaches the ASGI queue.
        """
        if self in self._pongs:
            self._pongs.clear(self)
        elif not self.closed:  # unsolicited: free for a client answering pings, charged for a flood
            self._charge(None)

    def _pong_missed(self) -> None:
        self.close(CLOSE_HEARTBEAT_TIMEOUT, "no pong")

    def _expired(self) -> None:
        self.close(CLOSE_UNAUTHORIZED, "token expired")

    def _schedule_expiry(self) -> None:
        self._expiries.set(self, self.auth.expires_in(self.principal))

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
                node=self.settings.node_name,
                epoch=self.hub.epoch,
                subs=(server_subs := self.server_subscriptions()),
            )
        )
        self._schedule_ping()
        self._schedule_expiry()
        direct = self._direct
        if direct is not None and getattr(direct, "on_pong", False) is None:
            direct.on_pong = self.pong  # pushsvc.ws.protocol: pongs without the ASGI queue
        try:
            if server_subs:
                await self._server_subscribe(server_subs)
            while True:
                if self.closed:
                    # Closed by a command (4001 refresh, 4008, 1009): returning now would
                    # let the server drop the TCP connection before the close frame is
                    # out (the client would see 1006). _send_close is time-bounded.
                    if self._closer is not None and not self._closer.done():
                        await asyncio.wait([self._closer])
                    break
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
            if not self.closed and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "client disconnected",
                    extra={"client": self.id, "channels": len(self.channels)},
                )
            self.closed = True
            if direct is not None and getattr(direct, "on_pong", None) is not None:
                direct.on_pong = None
            self._cancel_timers()
            self._drop_output()
            self.hub.remove_session(self)
            if self._writer is not None:
                self._writer.cancel()

    # --- inbound -----------------------------------------------------------------------
    async def handle_frame(self, text: str | None, data: bytes | None) -> None:
        """Handle one client frame: a text frame holding one JSON command.

        Args:
            text: the frame's text (None for a binary frame).
            data: the frame's bytes (binary frames; refused).

        Rules (wire contract v1; OWASP WebSocket cheat sheet: validate every
        message, limit rates):

        - binary frames, non-JSON, non-objects, unknown ``op``, wrong field types
          and nesting deeper than msgspec allows get ``error`` ``bad_request``
          and cost one command token, so malformed floods are rate limited too;
        - ``subscribe``/``unsubscribe``/``publish``/``refresh`` (and a repeated
          ``auth``) cost one token of the user's bucket; refused ones get
          ``rate_limited`` with ``retry_after`` seconds and count as strikes;
        - ``pong`` answering a ping is free; an unsolicited one costs a token;
        - a frame longer than ``max_frame_bytes`` closes 1009 (normally uvicorn's
          ``ws_max_size`` does this first, counting bytes after reassembly).

        Never raises for client mistakes (no traceback is logged for them).
        """
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
            self.pong()
            return
        if isinstance(cmd, Auth):
            self._refuse(BAD_REQUEST, "already authenticated", None, charge=True)
            return
        metrics.COMMANDS.labels(type(cmd).__name__.lower()).inc()
        if not self._charge(cmd.id):
            return
        if isinstance(cmd, Subscribe):
            await self._subscribe(cmd)
        elif isinstance(cmd, Unsubscribe):
            await self._unsubscribe(cmd)
        elif isinstance(cmd, Publish):
            await self._publish(cmd)
        elif isinstance(cmd, Refresh):
            self._refresh(cmd)
        elif isinstance(cmd, Presence | PresenceStats):
            await self._presence(cmd)

    def _refuse(self, code: str, message: str, req_id: object, *, charge: bool = False) -> None:
        """Answer ``error``; with ``charge`` the frame also costs a command token."""
        self.send_frame(Error(code=code, message=message, id=req_id))  # type: ignore[arg-type]
        if charge:
            self._charge(None)

    def _charge(self, req_id: object) -> bool:
        """Take one token from the user's command bucket (shared by all their sockets).

        Returns:
            True when granted. When refused, answers ``error`` ``rate_limited``
            with ``retry_after`` (seconds) and returns False; the refusal is this
            session's strike, and a session refused more than
            ``PUSHSVC_RATE_LIMIT_STRIKES`` times in a row is closed with 4008.
            Strikes are counted per connection, so a user's well-behaved socket is
            not closed for the flood of their other one.
        """
        wait = self.bucket.take()
        if not wait:
            self._strikes = 0
            return True
        self._strikes += 1
        metrics.RATE_LIMITED.inc()
        if self._strikes > self.settings.rate_limit_strikes:
            self.close(CLOSE_RATE_LIMITED, "rate limit exceeded repeatedly")
            return False
        self.send_frame(
            Error(
                code=RATE_LIMITED,
                message="too many commands",
                id=req_id,  # type: ignore[arg-type]
                retry_after=round(wait, 3),
            )
        )
        return False

    def _target(self, name: object) -> str:
        """A subscription target: a channel, or a pattern when wildcards are on.

        Raises:
            InvalidChannel: malformed, or a pattern with
                ``PUSHSVC_WILDCARD_SUBSCRIPTIONS=false``.
        """
        if is_pattern(name):
            if not self.settings.wildcard_subscriptions:
                raise InvalidChannel("wildcard subscriptions are off on this server")
            return validate_pattern(name)
        return validate_channel(name)

    async def _subscribe(self, cmd: Subscribe) -> None:
        try:
            channel = self._target(cmd.channel)
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
        if (problem := position_error(cmd.since, cmd.epoch)) is not None:
            self._refuse(BAD_REQUEST, problem, cmd.id)
            return
        try:
            await self.hub.subscribe(self, channel, cmd.since, cmd.id, cmd.epoch)
        except Unavailable as exc:
            self._refuse(UNAVAILABLE, str(exc), cmd.id)

    def server_subscriptions(self) -> list[str]:
        """Channels the server subscribes this session to at ``welcome``, in order.

        The token's ``subs`` claim (Centrifugo's server-side subscriptions),
        preceded by ``user.<sub>`` with ``PUSHSVC_AUTO_SUBSCRIBE_PERSONAL``.
        """
        subs = list(self.principal.subs)
        if self.settings.auto_subscribe_personal:
            subs.insert(0, personal_channel(self.principal.sub))
        return list(dict.fromkeys(subs))

    async def _server_subscribe(self, channels: list[str]) -> None:
        """Subscribe to the server-side subscriptions, each answered ``subscribed``.

        A channel in the auth frame's ``subs`` map resumes from its ``since`` (with
        ``recovered``, then the replay) exactly as a ``subscribe`` with ``since``
        would. Refusals are ``error`` frames naming the channel (no ``id``): over
        ``PUSHSVC_MAX_SUBSCRIPTIONS`` (``limit_exceeded``), a pattern while
        wildcard subscriptions are off (``invalid_channel``), a bad ``since`` or
        ``epoch`` (``bad_request``; subscribed live instead), NATS away (``unavailable``).
        """
        for channel in channels:
            if self.closed:
                return
            try:
                self._target(channel)
            except InvalidChannel as exc:
                self._refuse(INVALID_CHANNEL, f"server-side subscription {channel}: {exc}", None)
                continue
            if len(self.channels) >= self.settings.max_subscriptions:
                self._refuse(
                    LIMIT_EXCEEDED,
                    f"server-side subscription {channel}: at most "
                    f"{self.settings.max_subscriptions} subscriptions per connection",
                    None,
                )
                continue
            resume = self._resume.get(channel)
            since = resume.since if resume is not None else None
            epoch = resume.epoch if resume is not None else None
            if (problem := position_error(since, epoch)) is not None:
                self._refuse(BAD_REQUEST, f"subs.{channel}.{problem}", None)
                since = epoch = None
            try:
                await self.hub.subscribe(self, channel, since, None, epoch)
            except Unavailable as exc:
                self._refuse(UNAVAILABLE, f"server-side subscription {channel}: {exc}", None)

    async def _unsubscribe(self, cmd: Unsubscribe) -> None:
        try:
            channel = self._target(cmd.channel)
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

    async def _presence(self, cmd: Presence | PresenceStats) -> None:
        """Answer ``presence`` / ``presence_stats`` through the registry's one rule
        (:meth:`~pushsvc.core.presence.PresenceRegistry.read_for`).

        Refusals: ``invalid_channel``; ``forbidden`` without a ``presence`` grant;
        ``bad_request`` when the channel is outside ``PUSHSVC_PRESENCE_CHANNELS``
        (or the session has no registry); ``unavailable`` without JetStream or when
        the bucket does not answer.
        """
        channel = cmd.channel
        if self.presence is None:
            self._refuse(BAD_REQUEST, f"presence is not enabled for {channel}", cmd.id)
            return
        stats = isinstance(cmd, PresenceStats)
        limit = 0 if stats else self.settings.presence_limit
        try:
            snap = await self.presence.read_for(self.principal, channel, limit)
        except PresenceRefused as exc:
            self._refuse(exc.code, str(exc), cmd.id)
            return
        if stats:
            self.send_frame(
                PresenceStatsResult(
                    channel=channel, clients=snap.clients_total, users=snap.users, id=cmd.id
                )
            )
            return
        self.send_frame(
            PresenceResult(
                channel=channel,
                clients=snap.clients,
                users=snap.users,
                clients_total=snap.clients_total,
                truncated=True if snap.truncated else None,
                id=cmd.id,
            )
        )

    def _refresh(self, cmd: Refresh) -> None:
        try:
            principal = self.auth.verify(cmd.token)
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
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


def fan_out(sessions: Iterable[Session], text: str, nbytes: int, *, single: bool = True) -> None:
    """Hand ``text`` (one or more encoded frames joined by ``\\n``) to every session.

    The hub's delivery loop, once per channel batch (see :class:`~pushsvc.core.hub.Hub`).
    A session with nothing pending (no buffered frame, no writer task busy), on
    uvicorn's direct path (:func:`~pushsvc.core.outbox.direct_protocol`), whose
    transport is open and holds no unsent bytes, gets the pre-framed bytes (RFC 6455
    5.2, framed once for all sessions) written to its transport here: no buffer, no
    flush callback, no ASGI send. Every other session goes through
    :meth:`Session.send`, so the byte bound, 4009, coalescing behind a backlog,
    backpressure (uvicorn's ``writable`` event) and ordering after its pending frames
    hold.

    Why these checks are enough: a transport with an empty write buffer is never
    paused (asyncio and uvloop resume writing when the buffer drains), and the
    connection leaves OPEN only with the transport closing (the peer's close or a
    protocol error: uvicorn closes it) or with the session closed (a closed session
    has already left its channels). Each check is one attribute or one C call: this
    loop runs once per socket per batch.

    Args:
        sessions: a snapshot (the loop must not see the set change under it).
        text: the encoded frame(s); ``nbytes`` its UTF-8 length in bytes.
        single: False when the same flush has more than one channel to write: a
            session subscribed to several channels then queues through its buffer
            so it still gets one write per flush.
    """
    framed = None
    for session in sessions:
        transport = session._transport
        if (
            transport is not None
            and not session._out_bytes
            and session._writer is None
            and (single or len(session.channels) == 1)
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            if framed is None:
                framed = text_frame(text)
            transport.write(framed)
        else:
            session.send(text, nbytes)
