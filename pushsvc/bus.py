"""The NATS side: connection, stream setup, refcounted live subscriptions, publish, history.

The bus never touches sockets. It hands every live message to one callback,
``on_message(channel, payload, seq, stamp)``, which ``app.py`` wires to the hub.

Subjects (``prefix`` = ``PUSHSVC_SUBJECT_PREFIX``, default ``push``):

- producers publish to ``<prefix>.<channel>``;
- with history on, the JetStream stream (``PUSHSVC_STREAM``) captures
  ``<prefix>.>`` and *republishes* every stored message to
  ``<prefix>-live.<channel>`` with the headers ``Nats-Sequence`` and
  ``Nats-Subject`` (NATS docs, "Streams: RePublish"). Nodes subscribe to the
  republished subjects, so even plain core publishes arrive with a stream
  sequence, and duplicates by ``Nats-Msg-Id`` are never republished;
- with history off (``PUSHSVC_HISTORY_TTL=0`` or no JetStream) nodes subscribe to
  ``<prefix>.<channel>`` directly and messages carry no sequence;
- revocations arrive on ``<prefix>-control.disconnect``;
- channel events (join/leave) travel on ``<prefix>-events.<channel>`` (core NATS,
  never stored), one refcounted subscription per channel with local subscribers
  where they are on (:meth:`Bus.acquire_events`);
- presence and revocations live in JetStream KV buckets (:meth:`Bus.key_value`).

Interest-based: a node holds one NATS subscription per channel with at least one
local subscriber; :meth:`Bus.release` of the last one unsubscribes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from jetstreamext import (
    BatchUnsupportedError,
    InvalidResponseError,
    NoMessagesError,
    get_batch,
)
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    KeyValueConfig,
    RawStreamMsg,
    RePublish,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.kv import KeyValue

from . import metrics, natsconn
from .channels import channel_for, is_pattern, pattern_reaches, subject_for
from .settings import Settings

log = logging.getLogger("pushsvc.bus")

#: ``(channel, payload, seq, stamp)``: ``stamp`` is the message's stream time (Unix
#: seconds, from the republished ``Nats-Time-Stamp`` header) or None.
MessageHandler = Callable[[str, bytes, int | None, float | None], None]
#: ``(pattern, channel, payload, seq, stamp)``: a message of a wildcard subscription.
PatternHandler = Callable[[str, str, bytes, int | None, float | None], None]
ControlHandler = Callable[[bytes], None]
EventHandler = Callable[[str, bytes], None]
ResumeHandler = Callable[[bool], Awaitable[None]]

STREAM_RETRY_MAX = 2.0  # s, longest pause between stream set-up attempts after a reconnect
STREAM_CHECK_INTERVAL = 2.0  # s, how often a running node checks that its stream still exists
READ_BATCH = 256  # messages per JetStream batch direct get
MIN_SERVER = (2, 11)  # nats-server with batch direct gets (ADR-31) and per-message TTL (ADR-43)


class Unavailable(Exception):
    """NATS (or JetStream) cannot take or serve the request right now.

    Attributes:
        retry_after: seconds a client should wait before retrying.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamConfigError(Unavailable):
    """The history stream exists with settings that cannot be changed in place.

    Examples: another storage type, subjects overlapping another stream. Raised at
    start (the node does not start) with a message naming the stream and the reason.
    """


class _NoJetStream(Exception):
    """Nothing answers the JetStream API: JetStream is not enabled on this NATS."""


def connect_failure(exc: BaseException, attempts: list[Exception] | None = None) -> str:
    """Why a NATS connect failed, in a few words, e.g. ``connection refused``.

    Args:
        exc: the exception that ended the connect (often a timeout).
        attempts: errors nats-py reported to ``error_cb`` on the way; the last
            one is the real cause when ``exc`` is only the timeout.
    """
    last = attempts[-1] if attempts else exc
    if isinstance(last, ConnectionRefusedError):
        return "connection refused"
    if isinstance(last, OSError) and last.strerror:
        return last.strerror[:1].lower() + last.strerror[1:]
    if isinstance(last, TimeoutError | asyncio.TimeoutError | nats.errors.TimeoutError):
        return "no answer (timeout)"
    text = str(last).strip()
    return f"{type(last).__name__}: {text}" if text else type(last).__name__


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


def stream_time(value: str | None) -> float | None:
    """A ``Nats-Time-Stamp`` header (RFC 3339, UTC, nanoseconds) as Unix seconds.

    JetStream adds the header to republished messages (NATS docs, "Streams:
    RePublish"); it is the time the stream stored the message, by the NATS
    server's clock. Returns None when absent or malformed.
    """
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


@dataclass
class StoredMessage:
    """A message read back from the stream: stream ``seq``, raw ``payload`` bytes and
    its concrete ``channel`` (None when not known)."""

    seq: int
    payload: bytes
    channel: str | None = None


@dataclass
class History:
    """Result of :meth:`Bus.history`.

    Attributes:
        messages: stored messages of the channel with seq > since, oldest first.
        recovered: False when messages after ``since`` may have been removed from
            the stream (age or per-channel cap) or history is off.
        last_seq: the stream's last sequence when read (0 if empty/off).
        more: True when ``limit`` cut the result (page on with ``since`` = last seq).
        epoch: the stream's epoch when read (see :attr:`Bus.epoch`).
        since: the ``since`` actually applied: 0 when the caller's position belongs
            to another epoch of the stream (then ``recovered`` is False and every
            message the stream holds for the channel is returned).
    """

    messages: list[StoredMessage] = field(default_factory=list)
    recovered: bool = True
    last_seq: int = 0
    more: bool = False
    epoch: str | None = None
    since: int = 0


@dataclass
class _LiveSub:
    refs: int = 0
    ready: asyncio.Future[None] | None = None
    sub: Subscription | None = None


class Bus:
    """One NATS connection for a pushsvc node.

    Args:
        settings: NATS URL(s), prefix, stream and history settings, timeouts.
        on_message: called with ``(channel, payload, seq, stamp)`` for every live
            message of a channel this node holds (``stamp``: stream time, Unix
            seconds, or None); must not block (it runs on the NATS subscription's
            task).
        on_control: called with the raw payload of each control message.
        name: the NATS connection name (shown by ``nats server report
            connections`` and ``/connz``); default ``pushsvc/<node>``.
    """

    def __init__(
        self,
        settings: Settings,
        on_message: MessageHandler,
        on_control: ControlHandler | None = None,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or f"pushsvc/{settings.node_name or 'pushsvc'}"
        self.prefix = settings.subject_prefix
        self.live_prefix = f"{self.prefix}-live"
        self.control_subject = f"{self.prefix}-control.disconnect"
        self._on_message = on_message
        self._on_control = on_control
        self.nc: NatsClient | None = None
        self.js = None
        self.history_enabled = settings.history
        self._subs: dict[str, _LiveSub] = {}
        self._control_sub: Subscription | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.closing = False
        #: called (synchronously) when the NATS connection drops.
        self.on_disconnected: Callable[[], None] | None = None
        #: awaited after a reconnect once the stream is verified, with ``True`` when
        #: the stream was re-created (NATS lost its store: sequences restarted).
        self.on_resumed: ResumeHandler | None = None
        #: True once this process saw the stream re-created under it.
        self.stream_reset = False
        #: the stream's epoch: changes whenever the stream is created anew (see
        #: :func:`epoch_of`); None with history off or before start.
        self.epoch: str | None = None
        #: called (synchronously) with the new epoch when the stream turns out to
        #: have been re-created (deleted and created again, or NATS lost its store).
        self.on_epoch_changed: Callable[[str], None] | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self.events_prefix = f"{self.prefix}-events"
        #: called with ``(channel, payload)`` for every channel event (join/leave)
        #: of a channel held with :meth:`acquire_events`; must not block.
        self.on_event: EventHandler | None = None
        self._event_subs: dict[str, list[Any]] = {}  # channel -> [refs, Subscription | None]
        #: called with ``(pattern, channel, payload, seq, stamp)`` for every live
        #: message of a wildcard subscription (:meth:`acquire` of a pattern); must not block.
        self.on_pattern_message: PatternHandler | None = None
        self._connect_errors: list[Exception] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect (bounded by ``connect_timeout`` s) and set up the stream.

        After start, nats-py reconnects forever (every 0.5 s) and resubscribes by
        itself; after each reconnect the stream is verified again and
        :attr:`on_resumed` is awaited (see :meth:`_resume`).

        Raises:
            natsconn.NatsRefused: NATS refused the credentials or TLS (at once,
                without retrying).
            Unavailable: NATS could not be reached within ``connect_timeout`` s, or
                JetStream did not set up the stream within that time.
            StreamConfigError: the stream exists with settings that cannot be
                changed in place (history on).
        """
        servers = self.settings.nats_servers
        # nats-py reports every failed attempt to error_cb; during the initial
        # connect they are collected and summed up in one Unavailable instead.
        self._connect_errors: list[Exception] | None = []
        try:
            self.nc = await natsconn.connect(
                servers,
                natsconn.NatsSecurity.from_settings(self.settings),
                timeout=self.settings.connect_timeout,
                name=self.name,
                connect_timeout=max(1, int(self.settings.connect_timeout)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=self._error_cb,
                disconnected_cb=self._disconnected_cb,
                reconnected_cb=self._reconnected_cb,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if isinstance(exc, natsconn.NatsRefused):
                raise
            cause = connect_failure(exc, self._connect_errors)
            raise Unavailable(
                f"cannot reach NATS at {', '.join(map(natsconn.display_url, servers))} within "
                f"{self.settings.connect_timeout:g} s: {cause}"
            ) from None
        finally:
            self._connect_errors = None
        metrics.NATS_CONNECTED.set(1)
        self.js = self.nc.jetstream(timeout=self.settings.publish_timeout)
        if self.history_enabled:
            version = self.nc.connected_server_version
            if (version.major, version.minor) < MIN_SERVER and version.major:
                await self.close()
                raise Unavailable(
                    f"nats-server {version} is too old for history: 2.11 or later is needed "
                    "(batch direct gets, per-message TTL); upgrade NATS or set "
                    "PUSHSVC_HISTORY_TTL=0 (live only)"
                )
            try:
                self.history_enabled = await self._setup_stream()
            except Unavailable:
                await self.close()
                raise
        if self._on_control is not None:
            self._control_sub = await self.nc.subscribe(self.control_subject, cb=self._control_cb)
        if self.history_enabled:
            self._watch_task = asyncio.ensure_future(self._watch_stream())

    async def _error_cb(self, exc: Exception) -> None:
        if self._connect_errors is not None:  # initial connect: summed up by start()
            self._connect_errors.append(exc)
            return
        log.warning("NATS: %s: %s", type(exc).__name__, exc)

    async def _disconnected_cb(self) -> None:
        metrics.NATS_CONNECTED.set(0)
        if self.closing or self._connect_errors is not None:
            return  # closing, or the first connect gave up: start() says why, once
        log.warning("NATS disconnected; reconnecting (emits answer 503 meanwhile)")
        if self._resume_task is not None:
            self._resume_task.cancel()
            self._resume_task = None
        if self.on_disconnected is not None:
            self.on_disconnected()

    async def _reconnected_cb(self) -> None:
        """nats-py has reconnected and re-sent every SUB (confirmed by a flush).

        Runs inside nats-py's reconnect loop, so it must neither raise nor wait:
        stream verification and the hub's catch-up run in a task.
        """
        metrics.NATS_CONNECTED.set(1)
        metrics.NATS_RECONNECTS.inc()
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        log.info("NATS reconnected to %s; subscriptions restored", url)
        if self._resume_task is not None:
            self._resume_task.cancel()
        task = self._resume_task = asyncio.ensure_future(self._resume())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self) -> None:
        """After a reconnect: verify the stream, then tell the hub.

        Verification asks the stream leader (stream info), so it does not wait for
        a JetStream meta leader election; only a missing or differently configured
        stream is created/updated (which needs the meta leader). Retries with
        backoff (up to ``STREAM_RETRY_MAX`` s between attempts) while connected:
        right after a NATS restart JetStream may need a moment to recover its store.
        A stream whose epoch changed was re-created: NATS lost its store and
        sequences restarted at 1.
        """
        reset = False
        s = self.settings
        if self.history_enabled:
            epoch = self.epoch
            delay = 0.05
            while True:
                if self.closing or not self.is_connected:
                    return  # the next reconnect starts a new resume
                try:
                    await self._ensure_stream()
                    break
                except StreamConfigError as exc:
                    log.error("%s; history keeps the old stream settings", exc)
                    break
                except (Unavailable, _NoJetStream) as exc:
                    log.warning("stream %s not ready after reconnect: %s", s.stream, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STREAM_RETRY_MAX)
            reset = epoch is not None and self.epoch != epoch
        if self.on_resumed is not None:
            try:
                await self.on_resumed(reset)
            except Exception:
                log.exception("resume after reconnect failed")

    async def _watch_stream(self) -> None:
        """Every ``STREAM_CHECK_INTERVAL`` s: notice a deleted or re-created stream.

        A deleted stream is created again (emits would otherwise answer 503 until
        another node starts); either way the epoch changes and
        :attr:`on_epoch_changed` closes the sessions that hold positions of the old
        one. Reads stream info only (answered by the stream leader).
        """
        while not self.closing:
            await asyncio.sleep(STREAM_CHECK_INTERVAL)
            if self.closing or not self.is_connected or self._resume_task_running():
                continue
            try:
                await self._ensure_stream()
            except (Unavailable, _NoJetStream) as exc:
                log.debug("stream check: %s", exc)
            except StreamConfigError as exc:
                log.error("%s", exc)
            except Exception:  # never let the watcher die
                log.exception("stream check failed")

    def _resume_task_running(self) -> bool:
        return self._resume_task is not None and not self._resume_task.done()

    async def close(self, timeout: float = 5.0) -> None:
        """Drain the NATS connection (pending deliveries finish, then close).

        The drain is bounded by ``timeout`` seconds; after it the connection is closed.
        """
        self.closing = True
        for task in (self._resume_task, self._watch_task):
            if task is not None:
                task.cancel()
        self._resume_task = self._watch_task = None
        nc, self.nc = self.nc, None
        metrics.NATS_CONNECTED.set(0)
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=timeout)
            except (TimeoutError, nats.errors.Error):
                await nc.close()

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up."""
        return self.nc is not None and self.nc.is_connected

    async def _setup_stream(self) -> bool:
        """Create or update the stream at start; False when NATS has no JetStream.

        Retries for up to ``connect_timeout`` s while JetStream is reachable but not
        ready (timeouts, "temporarily unavailable", e.g. a cluster electing its
        leader), so a node never silently runs without the history it was
        configured with.

        Raises:
            StreamConfigError: the stream exists with settings that cannot change.
            Unavailable: JetStream did not become ready within ``connect_timeout`` s.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        delay = 0.05
        while True:
            try:
                await self._ensure_stream()
                return True
            except _NoJetStream:
                log.warning("JetStream is not enabled on this NATS: history is off (live only)")
                return False
            except StreamConfigError:
                raise
            except Unavailable as exc:
                if loop.time() + delay > deadline:
                    raise Unavailable(
                        f"JetStream did not set up stream {self.settings.stream} within "
                        f"{self.settings.connect_timeout:g} s: {exc}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def stream_config(self) -> StreamConfig:
        """The history stream's configuration as derived from the settings.

        ``max_age`` = ``history_ttl`` s, ``max_msgs_per_subject`` = ``history_size``,
        ``duplicate_window`` = ``min(dedupe_window, history_ttl)`` s (JetStream
        refuses a window longer than the max age), file storage,
        ``stream_replicas`` replicas, RePublish ``<prefix>.>`` -> ``<prefix>-live.>``.
        """
        s = self.settings
        return StreamConfig(
            name=s.stream,
            subjects=[f"{self.prefix}.>"],
            max_age=s.history_ttl,
            max_msgs_per_subject=s.history_size,
            duplicate_window=min(s.dedupe_window, s.history_ttl),
            storage=StorageType.FILE,
            num_replicas=s.stream_replicas,
            republish=RePublish(src=f"{self.prefix}.>", dest=f"{self.live_prefix}.>"),
            allow_direct=True,
        )

    async def _ensure_stream(self) -> None:
        """Make sure the stream exists with the configured settings; note its epoch.

        Reads the stream info first (answered by the stream leader, so a JetStream
        meta leader election does not delay it); creates the stream only when it
        is missing and updates it only when its configuration differs, the two
        operations that need the meta leader (NATS docs, "JetStream Clustering").

        Raises:
            _NoJetStream: no JetStream responder (not enabled on this server).
            StreamConfigError: JetStream refused the configuration.
            Unavailable: JetStream timed out or is temporarily unavailable.
        """
        s = self.settings
        config = self.stream_config()
        assert self.js is not None
        created = False
        try:
            try:
                info = await self.js.stream_info(s.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await self.js.add_stream(config)
                    created = True
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != 10058:  # name in use: created meanwhile by another node
                        raise
                    info = await self.js.stream_info(s.stream)
            if _config_differs(info.config, config):
                info = await self.js.update_stream(config)
        except nats.js.errors.ServiceUnavailableError as exc:
            if exc.err_code is None:  # no responders: JetStream is not enabled
                raise _NoJetStream() from None
            raise Unavailable(f"JetStream unavailable: {exc.description}") from None
        except nats.errors.NoRespondersError:
            raise _NoJetStream() from None
        except nats.js.errors.APIError as exc:
            if exc.code == 503 or exc.err_code in (10008, 10074):  # leaderless / unavailable
                raise Unavailable(f"JetStream unavailable: {exc.description}") from None
            raise StreamConfigError(
                f"stream {s.stream} cannot be set up with the configured settings: "
                f"{exc.description} (err {exc.err_code}); delete or fix the stream, "
                "or choose another PUSHSVC_STREAM"
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"JetStream did not answer ({type(exc).__name__})") from None
        first = self.epoch is None
        self._note_stream(info)
        if created or first:
            log.info(
                "stream %s %s (epoch %s): %s.> -> %s.>, ttl %gs, %d per channel",
                s.stream,
                "created" if created else "ready",
                self.epoch,
                self.prefix,
                self.live_prefix,
                s.history_ttl,
                s.history_size,
            )

    def _note_stream(self, info: StreamInfo) -> None:
        """Record the epoch of ``info``; a change means the stream was re-created.

        Calls :attr:`on_epoch_changed` (synchronously) on a change.
        """
        epoch = epoch_of(info)
        if epoch is None or epoch == self.epoch:
            return
        old, self.epoch = self.epoch, epoch
        if old is None:
            return
        self.stream_reset = True
        log.error(
            "stream %s was re-created (epoch %s -> %s): sequences restarted; "
            "history from before is gone; sessions resume with recovered: false",
            self.settings.stream,
            old,
            epoch,
        )
        if self.on_epoch_changed is not None:
            self.on_epoch_changed(epoch)

    # --- live subscriptions (refcounted) -----------------------------------------
    def live_subject(self, channel: str) -> str:
        """The subject this node subscribes to for ``channel``."""
        prefix = self.live_prefix if self.history_enabled else self.prefix
        return subject_for(prefix, channel)

    def holds(self, channel: str) -> bool:
        """True when this node holds a NATS subscription for ``channel``."""
        live = self._subs.get(channel)
        return live is not None and live.sub is not None

    @property
    def subscription_count(self) -> int:
        """Number of live channel subscriptions held in NATS."""
        return sum(1 for s in self._subs.values() if s.sub is not None)

    async def acquire(self, channel: str) -> None:
        """Take a reference on ``channel``'s live subscription, subscribing on the first.

        Returns once NATS has confirmed the subscription (see :func:`confirm`), so
        every message published after this returns is delivered.

        Raises:
            Unavailable: NATS is down or did not confirm in time.
        """
        live = self._subs.get(channel)
        if live is None:
            live = self._subs[channel] = _LiveSub()
        live.refs += 1
        if live.sub is not None:
            return
        if live.ready is not None:
            await asyncio.shield(live.ready)
            return
        live.ready = asyncio.get_running_loop().create_future()
        try:
            if self.nc is None or not self.nc.is_connected:
                raise Unavailable("NATS is not connected")
            cb = self._make_callback(channel)
            live.sub = await self.nc.subscribe(self.live_subject(channel), cb=cb)
            await confirm(self.nc, self.settings.publish_timeout)
        except Unavailable as exc:
            self._fail_acquire(channel, live, exc)
            raise
        except (nats.errors.Error, TimeoutError) as exc:
            err = Unavailable(f"NATS did not confirm the subscription ({type(exc).__name__})")
            self._fail_acquire(channel, live, err)
            raise err from None
        live.ready.set_result(None)
        live.ready = None
        if live.refs == 0:  # released while subscribing
            await self._drop(channel, live)

    def _fail_acquire(self, channel: str, live: _LiveSub, exc: Exception) -> None:
        assert live.ready is not None
        live.ready.set_exception(exc)
        live.ready.exception()  # mark retrieved
        live.ready = None
        live.refs -= 1
        if live.sub is not None:
            task = asyncio.ensure_future(self._unsubscribe(live.sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            live.sub = None
        if live.refs <= 0:
            self._subs.pop(channel, None)

    async def release(self, channel: str) -> None:
        """Drop a reference; the last one unsubscribes ``channel`` in NATS."""
        live = self._subs.get(channel)
        if live is None:
            return
        live.refs -= 1
        if live.refs <= 0 and live.ready is None:
            await self._drop(channel, live)

    async def _drop(self, channel: str, live: _LiveSub) -> None:
        self._subs.pop(channel, None)
        if live.sub is not None:
            sub, live.sub = live.sub, None
            await self._unsubscribe(sub)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass  # connection closing: the server forgets the subscription anyway

    def _make_callback(self, channel: str) -> Callable[[Msg], Awaitable[None]]:
        if is_pattern(channel):
            return self._make_pattern_callback(channel)
        on_message = self._on_message
        if self.history_enabled:

            async def cb(msg: Msg) -> None:
                headers = msg.headers
                if headers:
                    seq = headers.get("Nats-Sequence")
                    stamp = stream_time(headers.get("Nats-Time-Stamp"))
                    on_message(channel, msg.data, int(seq) if seq else None, stamp)
                else:
                    on_message(channel, msg.data, None, None)

        else:

            async def cb(msg: Msg) -> None:
                on_message(channel, msg.data, None, None)

        return cb

    def _make_pattern_callback(self, pattern: str) -> Callable[[Msg], Awaitable[None]]:
        """Callback of a wildcard subscription: the concrete channel comes from the subject.

        Personal channels are skipped unless the pattern starts with ``user``
        (:func:`~pushsvc.channels.pattern_reaches`).
        """
        prefix = self.live_prefix if self.history_enabled else self.prefix
        history = self.history_enabled

        async def cb(msg: Msg) -> None:
            channel = channel_for(prefix, msg.subject)
            if channel is None or not pattern_reaches(pattern, channel):
                return
            seq = stamp = None
            if history and msg.headers:
                raw = msg.headers.get("Nats-Sequence")
                seq = int(raw) if raw else None
                stamp = stream_time(msg.headers.get("Nats-Time-Stamp"))
            if self.on_pattern_message is not None:
                self.on_pattern_message(pattern, channel, msg.data, seq, stamp)

        return cb

    async def _control_cb(self, msg: Msg) -> None:
        if self._on_control is not None:
            self._on_control(msg.data)

    # --- publish -------------------------------------------------------------------
    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> int | None:
        """Publish ``payload`` to ``channel`` and wait until NATS has it.

        With history on this is a JetStream publish: returns the stream sequence
        after the ack (for a duplicate ``msg_id`` inside the dedupe window, the
        original sequence). With history off it is a core publish followed by a
        round trip (:func:`confirm`); returns None.

        Raises:
            Unavailable: not connected, no ack within ``publish_timeout`` s, or
                JetStream refused the message.
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        subject = subject_for(self.prefix, channel)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            if self.history_enabled:
                js = self.js
                assert js is not None
                for attempt in (1, 2):
                    try:
                        ack = await js.publish(
                            subject,
                            payload,
                            timeout=self.settings.publish_timeout,
                            stream=self.settings.stream,
                            headers=headers,
                        )
                        return ack.seq
                    except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                        if attempt == 2:
                            raise
                    # no stream captures the subject: it was deleted; create it again
                    try:
                        await self._ensure_stream()
                    except (_NoJetStream, StreamConfigError) as exc:
                        raise Unavailable(f"stream {self.settings.stream} is missing") from exc
            await nc.publish(subject, payload, headers=headers)
            await confirm(nc, self.settings.publish_timeout)
            return None
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"JetStream refused the message: {exc.description}") from None
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise Unavailable(f"NATS did not take the message ({type(exc).__name__})") from None

    # --- history -------------------------------------------------------------------
    async def history(
        self,
        channel: str,
        since: int,
        limit: int | None = None,
        *,
        seen: int = 0,
        epoch: str | None = None,
    ) -> History:
        """Stored messages of ``channel`` with seq > ``since``, oldest first, at most ``limit``.

        Positions belong to an epoch of the stream (:attr:`epoch`). ``since`` is
        taken as a position of *another* epoch, answered like ``since=0`` with
        ``recovered`` False (every message of the channel the stream holds is newer
        than anything the caller saw), when ``epoch`` is given and differs from
        the stream's, or when ``epoch`` is not given and ``since`` is past the
        stream's last sequence (no position of this epoch can be).

        ``recovered`` is also False when something after ``since`` may be gone: the
        stream's first sequence is past ``since + 1`` (max age), or the channel is
        at its per-channel cap and every retained message is newer than ``since``.
        JetStream would silently start at its first sequence in both cases.

        Reads use stream info and JetStream batch direct gets (ADR-31), answered by
        the stream's replicas without creating a consumer, so they work while the
        JetStream meta leader is being elected. With replicas, a follower's answer
        is checked against the stream leader's last message of the channel and
        read again if it lagged.

        Args:
            channel: a valid channel name, or a wildcard pattern: then the stream's
                messages of every matching channel (personal ones only for a
                ``user.`` pattern), each with its ``channel``; ``recovered`` is
                also False when a matching channel is at its cap and nothing
                retained is older than ``since`` (a pattern's read may need
                paging: see ``more``).
            since: stream sequence; messages with a greater one are returned.
            limit: at most this many messages (default ``history_size``).
            seen: the caller is known to hold every message of the channel up to
                this stream sequence (>= ``since``), e.g. a node catching up after
                a reconnect: only messages stored after it count as lost when the
                stream's head has expired. 0 = nothing known beyond ``since``.
            epoch: the epoch ``since`` belongs to, if the caller knows it.

        Raises:
            Unavailable: history is off, NATS is not connected, or NATS/JetStream
                did not answer within ``publish_timeout`` s.
        """
        if not self.history_enabled or self.js is None:
            raise Unavailable("history is off")
        if not self.is_connected:
            raise Unavailable("NATS is not connected")
        limit = limit or self.settings.history_size
        subject = subject_for(self.prefix, channel)
        wildcard = is_pattern(channel)
        stream = self.settings.stream
        try:
            info = await self.js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            raise Unavailable(f"stream {stream} does not exist (being re-created)") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"history read failed ({type(exc).__name__})") from None
        self._note_stream(info)
        current = self.epoch
        state = info.state
        stale = (epoch is not None and epoch != current) or (
            epoch is None and since > state.last_seq
        )
        if stale:
            since, seen = 0, 0
        if since >= state.last_seq:
            return History([], not stale, state.last_seq, epoch=current, since=since)
        subjects = state.subjects or {}
        count = sum(subjects.values()) if wildcard else subjects.get(subject, 0)
        if count == 0:
            intact = state.first_seq <= max(since, seen) + 1
            return History([], not stale and intact, state.last_seq, epoch=current, since=since)
        messages, pending = await self._read(subject, since, limit)
        if pending > len(messages) or self.settings.stream_replicas <= 1:
            pass
        elif await self._lagged(subject, messages[-1].seq if messages else since):
            messages, pending = await self._read(subject, since, limit, retry=True)
        lost_by_age = state.first_seq > max(since, seen) + 1
        lost_by_cap = count >= self.settings.history_size and pending >= count
        fetched = len(messages)
        if wildcard:
            # a pattern: any of its channels may be at its cap; personal channels stay out
            cap = self.settings.history_size
            lost_by_cap = pending >= count and any(n >= cap for n in subjects.values())
            messages = [m for m in messages if m.channel and pattern_reaches(channel, m.channel)]
        return History(
            messages,
            not (stale or lost_by_age or lost_by_cap),
            state.last_seq,
            pending > fetched,
            epoch=current,
            since=since,
        )

    async def _read(
        self, subject: str, since: int, limit: int, *, retry: bool = False
    ) -> tuple[list[StoredMessage], int]:
        """Read up to ``limit`` messages of ``subject`` after ``since`` by batch direct gets.

        Returns ``(messages, pending)``: ``pending`` is how many messages of the
        subject the stream held after ``since`` (``Nats-Num-Pending`` of the first
        one + 1), which may exceed ``limit``.

        Raises:
            Unavailable: no answer within ``publish_timeout`` s (after one retry
                when ``retry``).
        """
        messages: list[StoredMessage] = []
        pending = 0
        error: Exception | None = None
        for attempt in range(2 if retry else 1):
            if attempt:
                await asyncio.sleep(0.05)
            messages, pending = [], 0
            try:
                async with (
                    asyncio.timeout(self.settings.publish_timeout),
                    aclosing(
                        self.scan(
                            self.settings.stream, subject, after=since, batch=min(limit, READ_BATCH)
                        )
                    ) as stored,
                ):
                    async for raw in stored:
                        if not messages:
                            pending = int((raw.headers or {}).get("Nats-Num-Pending", 0)) + 1
                        channel = channel_for(self.prefix, raw.subject)
                        messages.append(StoredMessage(raw.seq or 0, raw.data or b"", channel))
                        if len(messages) >= limit:
                            break
                return messages, pending
            except BatchUnsupportedError:
                raise Unavailable("history needs nats-server 2.11 or later") from None
            except (
                nats.errors.Error,
                nats.js.errors.Error,
                InvalidResponseError,
                TimeoutError,
            ) as e:
                error = e
        raise Unavailable(f"history read failed ({type(error).__name__})") from None

    async def scan(
        self, stream: str, subject: str, *, after: int = 0, batch: int = 1024
    ) -> AsyncIterator[RawStreamMsg]:
        """Every message of ``stream`` on ``subject`` (wildcards allowed) with a sequence
        greater than ``after``, oldest first.

        JetStream batch direct gets (ADR-31), page by page until none is pending:
        no consumer, so no meta leader and no "initial values done" marker to
        trust. The stream needs ``allow_direct``.

        Raises:
            nats.errors.NoRespondersError: the stream has no ``allow_direct``.
            nats.errors.Error, nats.js.errors.Error, InvalidResponseError: NATS or
                JetStream failed; callers bound the time.
        """
        assert self.js is not None
        while True:
            left = 0
            try:
                async for raw in get_batch(
                    self.js, stream, batch=batch, seq=after + 1, subject=subject
                ):
                    left = int((raw.headers or {}).get("Nats-Num-Pending", 0))
                    after = raw.seq or after
                    yield raw
            except NoMessagesError:
                return
            if not left:
                return

    async def _lagged(self, subject: str, read_to: int) -> bool:
        """True when the stream leader holds a message of ``subject`` past ``read_to``.

        A non-direct get of the subject's last message is answered by the stream
        leader, which has every acknowledged message; a direct get may have come
        from a follower that had not applied the newest ones yet.
        """
        assert self.js is not None
        try:
            last = await self.js.get_msg(self.settings.stream, subject=subject)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return False
        return (last.seq or 0) > read_to

    async def channel_last_seq(self, channel: str) -> int:
        """Stream sequence of the newest stored message of ``channel`` (0: none stored).

        One JetStream direct get (no consumer).

        Raises:
            Unavailable: history is off, NATS is not connected or did not answer.
        """
        if not self.history_enabled or self.js is None:
            raise Unavailable("history is off")
        if not self.is_connected:
            raise Unavailable("NATS is not connected")
        subject = subject_for(self.prefix, channel)
        try:
            msg = await self.js.get_last_msg(self.settings.stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"last message lookup failed ({type(exc).__name__})") from None
        return msg.seq or 0

    # --- presence KV bucket ------------------------------------------------------------
    async def key_value(
        self,
        bucket: str,
        ttl: float,
        *,
        storage: StorageType = StorageType.MEMORY,
        description: str | None = None,
    ) -> tuple[KeyValue, float]:
        """Create (or open) the JetStream KV bucket ``bucket`` (presence, revocations).

        New buckets keep one value per key (``history=1``) in ``storage`` with
        ``max_age`` = ``ttl`` seconds, ``stream_replicas`` replicas and direct gets
        allowed (read by :meth:`scan_kv`; NATS docs, "Key/Value Store"). A bucket
        that already exists with another configuration (e.g. another node's TTL)
        is opened as it is and its own TTL is returned, so every node works at the
        pace the bucket actually expires.

        Returns:
            ``(kv, ttl_seconds)``; ``ttl_seconds`` is 0 for a bucket without max age.

        Raises:
            Unavailable: history/JetStream is off, NATS is not connected, or
                JetStream did not create/open the bucket.
        """
        if not self.history_enabled or self.js is None:
            raise Unavailable(f"bucket {bucket} needs JetStream (history is off)")
        if not self.is_connected:
            raise Unavailable("NATS is not connected")
        config = KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            ttl=ttl,
            storage=storage,
            replicas=self.settings.stream_replicas,
            direct=True,
        )
        try:
            try:
                return await self.js.create_key_value(config), ttl
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # exists with a different configuration
                    raise
            kv = await self.js.key_value(bucket)
            status = await kv.status()
            actual = status.ttl or 0.0
            log.warning(
                "bucket %s exists with other settings (ttl %gs); using it as it is",
                bucket,
                actual,
            )
            return kv, actual
        except nats.errors.NoRespondersError:
            raise Unavailable("JetStream is not enabled on this NATS") from None
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"bucket {bucket}: {exc.description}") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"bucket {bucket} not ready ({type(exc).__name__})") from None

    def scan_kv(self, bucket: str, keys: str) -> AsyncIterator[RawStreamMsg]:
        """Every stored entry of ``bucket`` whose key matches ``keys`` (wildcards allowed).

        :meth:`scan` over the bucket's stream ``KV_<bucket>`` and subjects
        ``$KV.<bucket>.<keys>`` (ADR-8); delete/purge markers are included (header
        ``KV-Operation``), for the caller to skip.
        """
        return self.scan(f"KV_{bucket}", f"$KV.{bucket}.{keys}")

    async def kv_put(self, bucket: str, key: str, value: bytes, *, ttl: float, msg_id: str) -> None:
        """Write ``key`` of ``bucket`` with a per-message TTL of ``ttl`` seconds.

        A KV put is a JetStream publish to ``$KV.<bucket>.<key>`` (ADR-8); nats-py's
        ``KeyValue.put`` sets no TTL, so it is published here with ``Nats-TTL``
        (nats-server 2.11+) and ``Nats-Msg-Id`` = ``msg_id`` (writers of the same
        entry inside the dedupe window store it once).

        Raises:
            Unavailable: JetStream did not take it within ``publish_timeout`` s.
        """
        if self.js is None or not self.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            await self.js.publish(
                f"$KV.{bucket}.{key}",
                value,
                headers={"Nats-Msg-Id": msg_id},
                msg_ttl=max(1.0, ttl),
                timeout=self.settings.publish_timeout,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"{bucket} write failed ({type(exc).__name__})") from None

    # --- channel events (join/leave) ------------------------------------------------
    def events_subject(self, channel: str) -> str:
        """Subject of ``channel``'s events: ``<prefix>-events.<channel>``."""
        return subject_for(self.events_prefix, channel)

    async def publish_event(self, channel: str, payload: bytes) -> None:
        """Core-publish one event of ``channel`` (not stored, no ack awaited).

        Raises:
            Unavailable: NATS is not connected or refused the write.
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        try:
            await nc.publish(self.events_subject(channel), payload)
        except (nats.errors.Error, OSError) as exc:
            raise Unavailable(f"NATS did not take the event ({type(exc).__name__})") from None

    async def acquire_events(self, channel: str) -> None:
        """Take a reference on ``channel``'s event subscription, subscribing on the first.

        The SUB is written before any later PUB on this connection, so this node's
        own events published after this returns reach it (NATS processes a
        connection's protocol in order).

        Raises:
            Unavailable: NATS is not connected.
        """
        entry = self._event_subs.get(channel)
        if entry is not None:
            entry[0] += 1
            return
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("NATS is not connected")
        entry = self._event_subs[channel] = [1, None]

        async def cb(msg: Msg) -> None:
            if self.on_event is not None:
                self.on_event(channel, msg.data)

        try:
            sub = await nc.subscribe(self.events_subject(channel), cb=cb)
        except nats.errors.Error as exc:
            if self._event_subs.get(channel) is entry:
                del self._event_subs[channel]
            raise Unavailable(f"NATS refused the subscription ({type(exc).__name__})") from None
        if self._event_subs.get(channel) is not entry:  # released meanwhile
            await self._unsubscribe(sub)
            return
        entry[1] = sub

    async def release_events(self, channel: str) -> None:
        """Drop a reference; the last one unsubscribes ``channel``'s events."""
        entry = self._event_subs.get(channel)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self._event_subs[channel]
            if entry[1] is not None:
                await self._unsubscribe(entry[1])


def epoch_of(info: StreamInfo) -> str | None:
    """The epoch of a stream: its creation time, in microseconds, as lowercase hex.

    JetStream records when a stream was created (``created`` in the stream info,
    the same on every replica) and a stream created anew, after a delete or after
    NATS lost its store, gets a new creation time while its sequences restart at 1.
    Deriving the epoch from it needs no state of our own: every node computes the
    same value, including nodes started after the reset, and operators'
    ``nats stream add`` gets an epoch too. Clients treat it as opaque.
    """
    created = info.created
    if created is None:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.UTC)
    micros = (created - _UNIX_EPOCH) // datetime.timedelta(microseconds=1)
    return format(micros, "x")


_UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _config_differs(have: StreamConfig | None, want: StreamConfig) -> bool:
    """True when the live stream's settings differ from the ones pushsvc manages."""
    if have is None:
        return True

    def close(a: float | None, b: float | None) -> bool:
        return abs((a or 0.0) - (b or 0.0)) < 1e-3

    repub_have = have.republish
    repub_want = want.republish
    assert repub_want is not None
    return not (
        sorted(have.subjects or []) == sorted(want.subjects or [])
        and close(have.max_age, want.max_age)
        and have.max_msgs_per_subject == want.max_msgs_per_subject
        and close(have.duplicate_window, want.duplicate_window)
        and have.storage == want.storage
        and (have.num_replicas or 1) == (want.num_replicas or 1)
        and bool(have.allow_direct) == bool(want.allow_direct)
        and repub_have is not None
        and repub_have.src == repub_want.src
        and repub_have.dest == repub_want.dest
    )
