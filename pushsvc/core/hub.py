"""The hub: channel -> local sessions; one encode per message; fan-out to session buffers.

Data flows one way: the bus calls :meth:`Hub.dispatch` with a NATS message, the
hub encodes it once into a ``message`` frame and appends it to the channel's
*batch*; no per-socket work happens per message. Once per loop iteration (or,
with ``PUSHSVC_WRITE_DELAY``, once per delay window) every channel with a batch
is flushed: its frames are joined by ``\n`` into one text (wire contract: a frame
may carry several objects), framed once, and handed to every live subscriber by
:func:`~pushsvc.core.outbox.fan_out` (a direct write when the socket is idle and
writable, else the session's bounded buffer; never waits on a socket). A batch
that reaches ``coalesce_bytes`` is flushed at once. With a write delay a large
live set is written a slice per loop iteration (:mod:`pushsvc.core.flight`).

Batches keep the per-session order of frames exactly: a session joining the live
set while a batch is open is owed only the frames after its join (handed to it
through its own buffer at the flush), a session leaving is handed what the batch
owes it first, and a session with frames already buffered queues the batch
behind them.

Subscribing with ``since`` runs the recovery protocol so a client gets no gap and
no duplicate at the seam between replayed history and live delivery:

1. take the channel's live NATS subscription (confirmed by a flush);
2. put the session in the channel's *pending* map: live frames for it are buffered;
3. read the stream for seq > since (JetStream), send ``subscribed`` + the replay;
4. flush the buffer skipping seq <= the last replayed one; stay in pending with
   that threshold until a live frame passes it, then join the live set.

Live frames of one channel arrive in stream order (one republishing stream, one
NATS subscription), so the threshold check is needed only at the seam.

The same idea covers a NATS outage for the sessions that stay connected
(:mod:`pushsvc.core.recovery`). Connections on several SSE / HTTP-streaming
channels resume from the node's watermark (:mod:`pushsvc.core.watermark`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .. import metrics
from ..bus import Bus, Headers, Unavailable
from ..protocol import (
    EXCLUDE_HEADER,
    Subscribed,
    publisher_of,
)
from .channelstate import (
    ChannelState,
    Seam,
    encode_message,
    encode_stored,
    owed_frames,
    send_frames,
)
from .flight import FAN_OUT_SLICE, Flight
from .member import Member
from .outbox import fan_out
from .recovery import OutageRecovery
from .watermark import Watermark

log = logging.getLogger("pushsvc.core.hub")


class Hub(OutageRecovery):
    """Local registry of channels, users and sessions for one node.

    Args:
        bus: the node's :class:`~pushsvc.bus.Bus` (subscriptions, publish, history).
        write_delay: seconds a channel's batch is held before it is written
            (``PUSHSVC_WRITE_DELAY``; 0 = at the next loop iteration). Each socket
            then gets at most one write per window from the hub, and a message waits
            at most ``write_delay`` plus one loop iteration when the socket is
            writable.
        coalesce_bytes: a batch reaching this many bytes is written at once
            (``PUSHSVC_COALESCE_BYTES``), so a batch never exceeds one frame's cap.

    Attributes:
        node_id: this node's random id (6 hex digits), the prefix of every client id
            it serves: connections are addressed by it plus a session secret, never
            by the public client id alone.
        fan_out_slice: with a write delay, sockets a channel's flush writes per loop
            iteration (:data:`FAN_OUT_SLICE`); 0 = the whole live set at once, which
            is what a hub without a write delay always does.
    """

    def __init__(self, bus: Bus, write_delay: float = 0.0, coalesce_bytes: int = 65536) -> None:
        self.bus = bus
        self.node_id = os.urandom(3).hex()
        self.write_delay = write_delay
        self._coalesce = coalesce_bytes
        self.fan_out_slice = FAN_OUT_SLICE if write_delay > 0 else 0
        self._dirty: list[ChannelState] = []  # channels with a batch, in the order they got it
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._channels: dict[str, ChannelState] = {}
        self.users: dict[str, set[Member]] = {}
        self.clients: set[Member] = set()
        self._by_id: dict[str, Member] = {}  # client id -> session (Pushsvc-Exclude-Client)
        self._background: set[asyncio.Task[None]] = set()
        #: membership observers (presence, join/leave): each is called with
        #: ``(session, channel)`` when a session has joined (NATS interest
        #: confirmed) or left (unsubscribe, close) a channel. Must not block.
        self.on_join: list[Callable[[Member, str], None]] = []
        self.on_leave: list[Callable[[Member, str], None]] = []
        #: connection observers (lifecycle events): called with the session once it
        #: is registered, and once it is gone (after it left its channels). Must not block.
        self.on_connect: list[Callable[[Member], None]] = []
        self.on_disconnect: list[Callable[[Member], None]] = []
        # per-message metrics not yet recorded (see _record_metrics)
        self._received = 0
        self._delivered = 0
        self._latencies: list[float] = []
        self._metrics_handle: asyncio.Handle | None = None
        #: the resume point of connections on several channels (SSE, HTTP-streaming)
        self.watermark = Watermark(self._channels, bus.drained, lambda: self.epoch)

    # --- bus -> hub ------------------------------------------------------------------
    def dispatch(
        self,
        channel: str,
        payload: bytes,
        seq: int | None,
        stamp: float | None = None,
        headers: Headers = None,
    ) -> None:
        """Deliver one NATS message to every local subscriber of ``channel``.

        Encodes once and appends the frame to the channel's batch (see
        :meth:`_deliver`); the batch is handed to the sockets at the next loop
        iteration, or when the ``write_delay`` window ends. Never awaits a socket.

        Args:
            stamp: the message's stream time (Unix seconds, ``Nats-Time-Stamp``);
                when given, the time from it to the hand-over to the hub's batch is
                observed in ``pushsvc_delivery_latency_seconds`` (a write delay
                comes on top). Frames buffered during a NATS outage are not
                observed (their delay is the outage).
            headers: its NATS headers or None: ``Pushsvc-User``/``Pushsvc-Client`` become
                the frame's ``publisher``; the local session ``Pushsvc-Exclude-Client``
                names does not get it (every other subscriber does).
        """
        self.dispatch_pattern(channel, channel, payload, seq, stamp, headers)

    def dispatch_pattern(
        self,
        pattern: str,
        channel: str,
        payload: bytes,
        seq: int | None,
        stamp: float | None = None,
        headers: Headers = None,
    ) -> None:
        """Deliver one NATS message of ``channel`` to the local subscribers of ``pattern``.

        Same path as :meth:`dispatch` (one encode, seam and outage handling and the
        latency observation per subscription); when ``pattern`` is a wildcard the
        frame carries it beside the concrete channel (``pattern == channel`` for a
        plain subscription).
        """
        state = self._channels.get(pattern)
        if state is None:
            return
        publisher = skip = None
        if headers:
            publisher = publisher_of(headers)
            skip = self._skip_of(headers)
        frame, nbytes = encode_message(
            channel, payload, seq, None if pattern == channel else pattern, publisher
        )
        self._received += 1
        if state.catchup is not None:
            state.catchup.append((seq, frame, nbytes, skip))
        else:
            self._deliver(state, seq, frame, nbytes, skip)
            if stamp is not None:
                self._latencies.append(time.time() - stamp)
        if self._metrics_handle is None:
            self._schedule_metrics()

    # --- per-message metrics, recorded after the writes ----------------------------
    def _schedule_metrics(self) -> None:
        # call_soon: a flush scheduled before it (or done by flush_now) goes first
        self._metrics_handle = asyncio.get_running_loop().call_soon(self._record_metrics)

    def _record_metrics(self) -> None:
        """Record the per-message metrics counted since the last call.

        :meth:`dispatch_pattern` and :meth:`_deliver` only count; the counts are
        recorded here, one loop iteration later, after the batch's first writes:
        taking the metrics' locks and the histogram's bucket on the delivery path
        cost ~45 us (cold caches) before every fan-out's first write. The values
        are the same, recorded later.
        """
        self._metrics_handle = None
        received, self._received = self._received, 0
        delivered, self._delivered = self._delivered, 0
        latencies, self._latencies = self._latencies, []
        if received:
            metrics.MESSAGES_RECEIVED.inc(received)
        if delivered:
            metrics.DELIVERIES.inc(delivered)
        observe = metrics.DELIVERY_LATENCY.observe
        for latency in latencies:
            observe(max(0.0, latency))

    def _skip_of(self, headers: Headers) -> Member | None:
        """The local session a message's ``Pushsvc-Exclude-Client`` header names, if any."""
        excluded = headers.get(EXCLUDE_HEADER) if headers else None
        return self._by_id.get(excluded) if excluded else None

    def _deliver(
        self,
        state: ChannelState,
        seq: int | None,
        frame: str,
        nbytes: int,
        skip: Member | None = None,
    ) -> None:
        """Add one encoded frame to the live set's batch; hand it to recovering sessions.

        Recovering sessions (``pending``) get it through :meth:`Member.send` once
        past their seam, joining the live set then; never to ``skip`` (its
        ``Pushsvc-Exclude-Client``).
        """
        if seq is not None:
            if state.last_seq is None or seq > state.last_seq:
                state.last_seq = seq
            if seq > self.watermark.seq:
                self.watermark.seq = seq
        delivered = len(state.clients)
        if delivered:
            batch = state.batch
            if batch:
                if state.batch_bytes + 1 + nbytes > self._coalesce:
                    self._flush_channel(state)  # a full frame's worth goes out now
                    state.batch.append(frame)
                    state.batch_bytes = nbytes
                else:
                    batch.append(frame)
                    state.batch_bytes += 1 + nbytes
            else:
                batch.append(frame)
                state.batch_bytes = nbytes
            if skip is not None and skip in state.clients:
                state.skip.setdefault(skip, []).append(len(state.batch) - 1)
                delivered -= 1
            if not state.flush_scheduled:
                state.flush_scheduled = True
                self._dirty.append(state)
                if self._flush_handle is None:
                    self._schedule_flush()
        if state.pending:
            for session, rec in list(state.pending.items()):
                if session is skip:
                    continue
                if rec.buffer is not None:
                    rec.buffer.append((seq, frame, nbytes))
                elif seq is None or seq > rec.threshold:
                    # join the live set first: send() may close the session, and
                    # closing must find it where it is
                    del state.pending[session]
                    self._join(state, session)
                    session.send(frame, nbytes)
                    if session in self.watermark.followers:
                        self.watermark.owe((session,))
                    delivered += 1
        self._delivered += delivered
        if self._metrics_handle is None:
            self._schedule_metrics()

    # --- batches: one write per socket per loop iteration or write-delay window ----------
    def _schedule_flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self.write_delay > 0:
            self._flush_handle = loop.call_later(self.write_delay, self._flush_batches)
        else:
            self._flush_handle = loop.call_soon(self._flush_batches)

    def flush_now(self) -> None:
        """Write the open batches now instead of at the next loop iteration.

        The bus calls it when a NATS subscription has handed over every message it
        had read (no other message waiting), so the batches hold everything that
        arrived together and nothing is gained by waiting: a message reaches the
        sockets one loop iteration sooner (an iteration that may also serve every
        other ready socket first). With a write delay the window is kept: it does
        nothing.
        """
        handle = self._flush_handle
        if handle is not None and self.write_delay <= 0:
            handle.cancel()
            self._flush_batches()
        elif self.watermark.owed:
            self.watermark.offer()

    def _flush_batches(self) -> None:
        """Write every channel's batch (the scheduled flush)."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        single = len(dirty) == 1
        for state in dirty:
            state.flush_scheduled = False
            try:
                self._flush_channel(state, single)
            except Exception:  # a bug must not leave the other channels unflushed
                log.exception("flush of a channel batch failed")
        if self.watermark.owed:
            self.watermark.offer()

    def _flush_channel(self, state: ChannelState, single: bool = True) -> None:
        """Hand ``state``'s batch to its live set (see :func:`~pushsvc.core.outbox.fan_out`).

        With a write delay, up to ``fan_out_slice`` sessions are written now and a
        larger live set one slice per loop iteration (a :class:`Flight`; a batch
        ready while one goes on joins it); without one, the whole live set is
        written now. A flight whose frames would pass ``coalesce_bytes`` with this
        batch is finished first. Sessions that joined during the batch get only the
        frames after their join, through their own buffer.
        """
        batch = state.batch
        late = state.late
        if late:
            state.late = {}
        skip = state.skip
        if skip:
            state.skip = {}
        if not batch:
            return
        nbytes = state.batch_bytes
        state.batch = []
        state.batch_bytes = 0
        text = batch[0] if len(batch) == 1 else "\n".join(batch)
        if late or skip:
            sessions = tuple(s.outbox for s in state.clients if s not in late and s not in skip)
            for session in {**late, **skip}:
                send_frames(session, owed_frames(batch, late.get(session, 0), skip.get(session)))
        else:
            sessions = state.boxes
            if sessions is None:
                sessions = state.boxes = tuple(s.outbox for s in state.clients)
        if self.watermark.followers:
            self.watermark.owe_channel(state)
        flight = state.flight
        if flight is not None:
            if flight.largest() + 1 + nbytes <= self._coalesce:
                flight.add(sessions, text, nbytes)
                return
            self._land(state)  # a full frame's worth: out now, in order, before this batch
        size = self.fan_out_slice
        if not size or len(sessions) <= size:
            fan_out(sessions, text, nbytes, single=single)
            return
        flight = state.flight = Flight(sessions, text, nbytes, single)
        # scheduled first: a failing slice must not leave the channel's flight open
        asyncio.get_running_loop().call_soon(self._fly, state, flight)
        flight.write(size)

    def _fly(self, state: ChannelState, flight: Flight) -> None:
        """Write the next slice of ``flight``; schedule the one after while any is left."""
        if state.flight is not flight:
            return  # finished by _land meanwhile
        try:
            done = flight.write(self.fan_out_slice or -1)
        except Exception:
            log.exception("flush of a channel batch failed")
            done = True
        if done:
            state.flight = None
        else:
            asyncio.get_running_loop().call_soon(self._fly, state, flight)

    def _land(self, state: ChannelState) -> None:
        """Finish ``state``'s flight now (what follows must go out, in order, behind it)."""
        flight, state.flight = state.flight, None
        if flight is not None:
            flight.write(-1)

    def _join(self, state: ChannelState, session: Member) -> None:
        """Add ``session`` to the live set; it is owed only the batch's frames from now on."""
        if state.batch:
            state.late[session] = len(state.batch)
        state.clients.add(session)
        state.boxes = state.followers = None

    def _leave(self, state: ChannelState, session: Member) -> None:
        """Remove ``session`` from the live set, handing it what the batch owes it first."""
        start = state.late.pop(session, 0)
        skipped = state.skip.pop(session, None)
        member = session in state.clients
        flight = state.flight
        if member and flight is not None:
            owed = flight.leave(session.outbox)
            if owed is not None and not session.closed:
                session.send(*owed)
        if state.batch and member and not session.closed:
            send_frames(session, owed_frames(state.batch, start, skipped))
        state.clients.discard(session)
        state.boxes = state.followers = None

    @property
    def epoch(self) -> str | None:
        """The stream's epoch (None with history off): positions are only valid within it."""
        return self.bus.epoch if self.bus.history_enabled else None

    # --- session registry ------------------------------------------------------------
    def user_connections(self, sub: str) -> int:
        """Number of open sessions of user ``sub`` on this node."""
        return len(self.users.get(sub, ()))

    def add_client(self, session: Member) -> None:
        """Register an authenticated session."""
        self.clients.add(session)
        self._by_id[session.id] = session
        self.users.setdefault(session.principal.sub, set()).add(session)
        metrics.CONNECTIONS.labels(session.transport.name).inc()
        for connected in self.on_connect:
            connected(session)

    def remove_client(self, session: Member) -> None:
        """Forget ``session``: leave its channels (releasing NATS interest) and its user."""
        if session not in self.clients:
            return
        self.clients.discard(session)
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
        metrics.CONNECTIONS.labels(session.transport.name).dec()
        users = self.users.get(session.principal.sub)
        if users is not None:
            users.discard(session)
            if not users:
                del self.users[session.principal.sub]
        for channel in list(session.channels):
            self.unsubscribe(session, channel)
        self.watermark.forget(session)
        for disconnected in self.on_disconnect:
            disconnected(session)

    # --- session -> hub ------------------------------------------------------------------
    async def subscribe(
        self,
        session: Member,
        channel: str,
        since: int | None,
        req_id: object,
        epoch: str | None = None,
    ) -> None:
        """Subscribe ``session`` to ``channel``; sends ``subscribed`` (+ replay) to it.

        ``since``/``epoch`` is the client's position (see :meth:`Bus.history` for
        how a position of another epoch is answered: ``recovered: false`` and a
        replay of everything the current epoch holds for the channel).

        Raises:
            Unavailable: NATS could not confirm the live subscription.
        """
        await self.bus.acquire(channel)
        if session.closed:
            await self.bus.release(channel)
            return
        session.channels.add(channel)
        self.watermark.track(session)
        metrics.SUBSCRIPTIONS.inc()
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = ChannelState()
            metrics.CHANNELS.inc()
            if self.bus.history_enabled:
                self._spawn(self._learn_last_seq(channel, state))
        for joined in self.on_join:
            joined(session, channel)
        if since is None:
            self._join(state, session)
            session.send_frame(Subscribed(channel=channel, id=req_id, epoch=self.epoch))
            return
        if not self.bus.history_enabled:
            self._join(state, session)
            session.send_frame(Subscribed(channel=channel, id=req_id, recovered=False))
            return
        rec = state.pending[session] = Seam()
        try:
            history = await self.bus.history(channel, since, epoch=epoch)
        except Unavailable:
            history = None
        if session.closed or state.pending.get(session) is not rec:
            return  # closed or unsubscribed meanwhile
        if history is None:
            threshold, recovered, replay = 0, False, []
        else:
            replay = history.messages
            # (a pattern's missed messages can exceed one read: the rest would be a gap)
            recovered = history.recovered and not history.more
            threshold = replay[-1].seq if replay else min(history.since, history.last_seq)
        session.send_frame(
            Subscribed(channel=channel, id=req_id, recovered=recovered, epoch=self.epoch)
        )
        for stored in replay:
            session.send(*encode_stored(channel, stored))
        buffered, rec.buffer = rec.buffer or [], None
        for seq, frame, nbytes in buffered:
            if seq is None or seq > threshold:
                session.send(frame, nbytes)
                threshold = seq or threshold
        rec.threshold = threshold
        if history is not None and (state.last_seq is None or threshold > state.last_seq):
            state.last_seq = threshold  # the live set has everything up to the seam too
        if session in self.watermark.followers:
            self.watermark.owe((session,))  # its replay carried no ids
        metrics.REPLAYED.inc(len(replay))

    def unsubscribe(self, session: Member, channel: str) -> None:
        """Remove ``session`` from ``channel``; the last local one releases NATS interest."""
        if channel not in session.channels:
            return
        session.channels.discard(channel)
        self.watermark.track(session)
        for left in self.on_leave:
            left(session, channel)
        metrics.SUBSCRIPTIONS.dec()
        state = self._channels.get(channel)
        if state is not None:
            self._leave(state, session)
            state.pending.pop(session, None)
            if not state.clients and not state.pending:
                del self._channels[channel]
                metrics.CHANNELS.dec()
        self._spawn(self.bus.release(channel))

    async def publish(
        self,
        channel: str,
        payload: bytes,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> int | None:
        """Publish through the bus (with NATS ``headers``: the publisher's stamp);
        returns the stream seq (None with history off).

        Raises:
            Unavailable: NATS did not take it.
        """
        return await self.bus.publish(channel, payload, msg_id, headers)

    def broadcast(self, channel: str, frame: str, nbytes: int) -> None:
        """Hand one encoded non-message frame (join/leave) to ``channel``'s local sessions.

        Through each session's own buffer, not the channel's batch: events carry no
        ``seq`` and are not ordered with messages (they travel on another NATS
        subject), so one may overtake messages of a batch not yet written.
        Sessions still recovering with ``since`` get it after their replay (it
        joins their seam buffer, where frames without ``seq`` always pass).
        """
        state = self._channels.get(channel)
        if state is None:
            return
        for session in tuple(state.clients):
            session.send(frame, nbytes)
        for session, rec in list(state.pending.items()):
            if rec.buffer is not None:
                rec.buffer.append((None, frame, nbytes))
            else:
                session.send(frame, nbytes)

    def subscribers(self, channel: str) -> int:
        """Local sessions subscribed to ``channel`` (live or recovering)."""
        state = self._channels.get(channel)
        return 0 if state is None else len(state.clients) + len(state.pending)

    def close_all(self, code: int, reason: str) -> None:
        """Close every session with ``code`` (graceful drain uses 1012).

        Sliced flushes still going on are finished first: what the sessions were
        owed goes out before the close frames, and no session has to be taken out
        of a flight one by one.
        """
        for state in self._channels.values():
            if state.flight is not None:
                self._land(state)
        for session in list(self.clients):
            session.close(code, reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_idle(self) -> None:
        """Wait for background NATS releases to finish (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
