"""The history stream: its configuration, set-up, verification and epoch.

With history on, the JetStream stream (``PUSHSVC_STREAM``) captures
``<prefix>.>`` and republishes every stored message to ``<prefix>-live.>`` with
the headers ``Nats-Sequence``, ``Nats-Subject`` and ``Nats-Time-Stamp`` (NATS
docs, "Streams: RePublish"). :class:`Streams` creates or updates it at start,
verifies it after each reconnect and every ``STREAM_CHECK_INTERVAL`` s, and
tracks its *epoch* (:func:`epoch_of`): a stream created anew restarts its
sequences, so positions of the old one are void.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.api import RePublish, StorageType, StreamConfig, StreamInfo

from .connection import Connection
from .errors import NoJetStream, StreamConfigError, Unavailable

log = logging.getLogger("pushsvc.bus")

STREAM_RETRY_MAX = 2.0  # s, longest pause between stream set-up attempts after a reconnect
STREAM_CHECK_INTERVAL = 2.0  # s, how often a running node checks that its stream still exists
MIN_SERVER = (2, 11)  # nats-server with batch direct gets (ADR-31) and per-message TTL (ADR-43)

_UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


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


def epoch_of(info: StreamInfo) -> str | None:
    """The epoch of a stream: its creation time, in microseconds, as lowercase hex.

    JetStream records when a stream was created (``created`` in the stream info,
    the same on every replica) and a stream created anew, after a delete or after
    NATS lost its store, gets a new creation time while its sequences restart at 1.
    Deriving the epoch from it needs no state of our own: every node computes the
    same value, including nodes started after the reset, and operators'
    ``nats stream add`` gets an epoch too. Clients treat it as opaque.
    """
    created = _created(info)
    if created is None:
        return None
    micros = (created - _UNIX_EPOCH) // datetime.timedelta(microseconds=1)
    return format(micros, "x")


def created_at(info: StreamInfo) -> float | None:
    """When the stream was created (``created`` in its info, by the NATS server's
    clock), as Unix seconds; None when the info does not say."""
    created = _created(info)
    return None if created is None else created.timestamp()


def _created(info: StreamInfo) -> datetime.datetime | None:
    created = info.created
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=datetime.UTC)
    return created


class Streams:
    """The history stream of one node: set-up, checks and epoch.

    Args:
        conn: the node's shared :class:`~pushsvc.bus.connection.Connection`.

    Attributes:
        epoch: the stream's epoch (:func:`epoch_of`); None with history off or
            before start.
        stream_reset: True once this process saw the stream re-created under it.
        on_epoch_changed: called (synchronously) with the new epoch when the
            stream turns out to have been re-created (deleted and created again,
            or NATS lost its store).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.epoch: str | None = None
        self.stream_reset = False
        self.on_epoch_changed: Callable[[str], None] | None = None

    def check_server(self) -> None:
        """Refuse a nats-server too old for history (older than ``MIN_SERVER``).

        Raises:
            Unavailable: naming the version and the way out (upgrade, or live only).
        """
        assert self.conn.nc is not None
        version = self.conn.nc.connected_server_version
        if (version.major, version.minor) < MIN_SERVER and version.major:
            raise Unavailable(
                f"nats-server {version} is too old for history: 2.11 or later is needed "
                "(batch direct gets, per-message TTL); upgrade NATS or set "
                "PUSHSVC_HISTORY_TTL=0 (live only)"
            )

    async def setup(self) -> bool:
        """Create or update the stream at start; False when NATS has no JetStream.

        Retries for up to ``connect_timeout`` s while JetStream is reachable but not
        ready (timeouts, "temporarily unavailable", e.g. a cluster electing its
        leader), so a node never silently runs without the history it was
        configured with.

        Raises:
            StreamConfigError: the stream exists with settings that cannot change.
            Unavailable: JetStream did not become ready within ``connect_timeout`` s.
        """
        s = self.conn.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.connect_timeout
        delay = 0.05
        while True:
            try:
                await self.ensure()
                return True
            except NoJetStream:
                log.warning("JetStream is not enabled on this NATS: history is off (live only)")
                return False
            except StreamConfigError:
                raise
            except Unavailable as exc:
                if loop.time() + delay > deadline:
                    raise Unavailable(
                        f"JetStream did not set up stream {s.stream} within "
                        f"{s.connect_timeout:g} s: {exc}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def verify_after_reconnect(self) -> bool | None:
        """After a reconnect: verify the stream; True when it was re-created meanwhile.

        Verification asks the stream leader (stream info), so it does not wait for
        a JetStream meta leader election; only a missing or differently configured
        stream is created/updated (which needs the meta leader). Retries with
        backoff (up to ``STREAM_RETRY_MAX`` s between attempts) while connected:
        right after a NATS restart JetStream may need a moment to recover its store.
        A stream whose epoch changed was re-created: NATS lost its store and
        sequences restarted at 1. Gives up (None) when the connection drops
        again or closes: the next reconnect verifies anew.
        """
        conn = self.conn
        epoch = self.epoch
        delay = 0.05
        while True:
            if conn.closing or not conn.is_connected:
                return None
            try:
                await self.ensure()
                break
            except StreamConfigError as exc:
                log.error("%s; history keeps the old stream settings", exc)
                break
            except (Unavailable, NoJetStream) as exc:
                log.warning("stream %s not ready after reconnect: %s", conn.settings.stream, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, STREAM_RETRY_MAX)
        return epoch is not None and self.epoch != epoch

    async def watch(self, busy: Callable[[], bool]) -> None:
        """Every ``STREAM_CHECK_INTERVAL`` s: notice a deleted or re-created stream.

        A deleted stream is created again (emits would otherwise answer 503 until
        another node starts); either way the epoch changes and
        :attr:`on_epoch_changed` closes the sessions that hold positions of the old
        one. Reads stream info only (answered by the stream leader). Skips a round
        while ``busy()`` (a verification after a reconnect is running).
        """
        conn = self.conn
        while not conn.closing:
            await asyncio.sleep(STREAM_CHECK_INTERVAL)
            if conn.closing or not conn.is_connected or busy():
                continue
            try:
                await self.ensure()
            except (Unavailable, NoJetStream) as exc:
                log.debug("stream check: %s", exc)
            except StreamConfigError as exc:
                log.error("%s", exc)
            except Exception:  # never let the watcher die
                log.exception("stream check failed")

    def config(self) -> StreamConfig:
        """The history stream's configuration as derived from the settings.

        ``max_age`` = ``history_ttl`` s, ``max_msgs_per_subject`` = ``history_size``,
        ``duplicate_window`` = ``min(dedupe_window, history_ttl)`` s (JetStream
        refuses a window longer than the max age), file storage,
        ``stream_replicas`` replicas, RePublish ``<prefix>.>`` -> ``<prefix>-live.>``.
        """
        s = self.conn.settings
        prefix = self.conn.prefix
        return StreamConfig(
            name=s.stream,
            subjects=[f"{prefix}.>"],
            max_age=s.history_ttl,
            max_msgs_per_subject=s.history_size,
            duplicate_window=min(s.dedupe_window, s.history_ttl),
            storage=StorageType.FILE,
            num_replicas=s.stream_replicas,
            republish=RePublish(src=f"{prefix}.>", dest=f"{self.conn.live_prefix}.>"),
            allow_direct=True,
        )

    async def ensure(self) -> None:
        """Make sure the stream exists with the configured settings; note its epoch.

        Reads the stream info first (answered by the stream leader, so a JetStream
        meta leader election does not delay it); creates the stream only when it
        is missing and updates it only when its configuration differs, the two
        operations that need the meta leader (NATS docs, "JetStream Clustering").

        Raises:
            NoJetStream: no JetStream responder (not enabled on this server).
            StreamConfigError: JetStream refused the configuration.
            Unavailable: JetStream timed out or is temporarily unavailable.
        """
        s = self.conn.settings
        js = self.conn.js
        config = self.config()
        assert js is not None
        created = False
        try:
            try:
                info = await js.stream_info(s.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(config)
                    created = True
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != 10058:  # name in use: created meanwhile by another node
                        raise
                    info = await js.stream_info(s.stream)
            if _config_differs(info.config, config):
                info = await js.update_stream(config)
        except nats.js.errors.ServiceUnavailableError as exc:
            if exc.err_code is None:  # no responders: JetStream is not enabled
                raise NoJetStream() from None
            raise Unavailable(f"JetStream unavailable: {exc.description}") from None
        except nats.errors.NoRespondersError:
            raise NoJetStream() from None
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
        self.note(info)
        if created or first:
            log.info(
                "stream %s %s (epoch %s): %s.> -> %s.>, ttl %gs, %d per channel",
                s.stream,
                "created" if created else "ready",
                self.epoch,
                self.conn.prefix,
                self.conn.live_prefix,
                s.history_ttl,
                s.history_size,
            )

    def note(self, info: StreamInfo) -> None:
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
            self.conn.settings.stream,
            old,
            epoch,
        )
        if self.on_epoch_changed is not None:
            self.on_epoch_changed(epoch)


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
