"""The hub: channel -> local sessions; one encode per message; fan-out to session buffers.

Data flows one way: the bus calls :meth:`Hub.dispatch` with a NATS message, the
hub encodes it once into a ``message`` frame and hands that same ``str`` to every
local subscriber's :meth:`Session.send` (which never waits on the socket).

Subscribing with ``since`` runs the recovery protocol so a client gets no gap and
no duplicate at the seam between replayed history and live delivery:

1. take the channel's live NATS subscription (confirmed by a flush);
2. put the session in the channel's *pending* map: live frames for it are buffered;
3. read the stream for seq > since (JetStream), send ``subscribed`` + the replay;
4. flush the buffer skipping seq <= the last replayed one; stay in pending with
   that threshold until a live frame passes it, then join the live set.

Live frames of one channel arrive in stream order (one republishing stream, one
NATS subscription), so the threshold check is needed only at the seam.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from . import metrics
from .bus import Bus, Unavailable
from .protocol import (
    CLOSE_UNAUTHORIZED,
    Message,
    Subscribed,
    encode_frame,
    payload_to_data,
)

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pushsvc.hub")


class _Recovery:
    """A session catching up on one channel: buffers live frames, then filters by seq."""

    __slots__ = ("buffer", "threshold")

    def __init__(self) -> None:
        self.buffer: list[tuple[int | None, str, int]] | None = []
        self.threshold = 0


class _Channel:
    __slots__ = ("pending", "sessions")

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.pending: dict[Session, _Recovery] = {}


def encode_message(channel: str, payload: bytes, seq: int | None) -> tuple[str, int]:
    """Encode one ``message`` frame: returns ``(text, utf8_byte_length)``."""
    data, encoding = payload_to_data(payload)
    raw = encode_frame(Message(channel=channel, data=data, seq=seq, encoding=encoding))
    return raw.decode(), len(raw)


class Hub:
    """Local registry of channels, users and sessions for one node.

    Args:
        bus: the node's :class:`~pushsvc.bus.Bus` (subscriptions, publish, history).
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._channels: dict[str, _Channel] = {}
        self.users: dict[str, set[Session]] = {}
        self.sessions: set[Session] = set()
        self._background: set[asyncio.Task[None]] = set()

    # --- bus -> hub ------------------------------------------------------------------
    def dispatch(self, channel: str, payload: bytes, seq: int | None) -> None:
        """Deliver one NATS message to every local subscriber of ``channel``.

        Encodes once; each session gets the same ``str``. Never awaits a socket.
        """
        state = self._channels.get(channel)
        if state is None:
            return
        frame, nbytes = encode_message(channel, payload, seq)
        for session in state.sessions:
            session.send(frame, nbytes)
        delivered = len(state.sessions)
        if state.pending:
            for session, rec in list(state.pending.items()):
                if rec.buffer is not None:
                    rec.buffer.append((seq, frame, nbytes))
                elif seq is None or seq > rec.threshold:
                    session.send(frame, nbytes)
                    delivered += 1
                    del state.pending[session]
                    state.sessions.add(session)
        metrics.MESSAGES_RECEIVED.inc()
        metrics.DELIVERIES.inc(delivered)

    def control(self, payload: bytes) -> None:
        """Handle a control message ``{"sub":..., "jti":...}``: close matching sessions 4001."""
        try:
            msg = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            log.warning("ignored malformed control message")
            return
        if not isinstance(msg, dict):
            return
        sub, jti = msg.get("sub"), msg.get("jti")
        if not isinstance(sub, str) and not isinstance(jti, str):
            return
        for session in list(self.sessions):
            p = session.principal
            if (sub is None or p.sub == sub) and (jti is None or p.jti == jti):
                session.close(CLOSE_UNAUTHORIZED, "token revoked")

    # --- session registry ------------------------------------------------------------
    def user_connections(self, sub: str) -> int:
        """Number of open sessions of user ``sub`` on this node."""
        return len(self.users.get(sub, ()))

    def add_session(self, session: Session) -> None:
        """Register an authenticated session."""
        self.sessions.add(session)
        self.users.setdefault(session.principal.sub, set()).add(session)
        metrics.CONNECTIONS.inc()

    def change_user(self, session: Session, old_sub: str) -> None:
        """Move ``session`` after its principal changed (refresh keeps sub, so rare)."""
        users = self.users.get(old_sub)
        if users is not None:
            users.discard(session)
        self.users.setdefault(session.principal.sub, set()).add(session)

    def remove_session(self, session: Session) -> None:
        """Forget ``session``: leave its channels (releasing NATS interest) and its user."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        metrics.CONNECTIONS.dec()
        users = self.users.get(session.principal.sub)
        if users is not None:
            users.discard(session)
            if not users:
                del self.users[session.principal.sub]
        for channel in list(session.channels):
            self.unsubscribe(session, channel)

    # --- session -> hub ------------------------------------------------------------------
    async def subscribe(
        self, session: Session, channel: str, since: int | None, req_id: object
    ) -> None:
        """Subscribe ``session`` to ``channel``; sends ``subscribed`` (+ replay) to it.

        Raises:
            Unavailable: NATS could not confirm the live subscription.
        """
        await self.bus.acquire(channel)
        if session.closed:
            await self.bus.release(channel)
            return
        session.channels.add(channel)
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        if since is None:
            state.sessions.add(session)
            session.send_frame(Subscribed(channel=channel, id=req_id))
            return
        if not self.bus.history_enabled:
            state.sessions.add(session)
            session.send_frame(Subscribed(channel=channel, id=req_id, recovered=False))
            return
        rec = state.pending[session] = _Recovery()
        try:
            history = await self.bus.history(channel, since)
        except Unavailable:
            history = None
        if session.closed or state.pending.get(session) is not rec:
            return  # closed or unsubscribed meanwhile
        if history is None:
            threshold, recovered, replay = 0, False, []
        else:
            replay = history.messages
            recovered = history.recovered
            threshold = replay[-1].seq if replay else min(since, history.last_seq)
        session.send_frame(Subscribed(channel=channel, id=req_id, recovered=recovered))
        for stored in replay:
            session.send(*encode_message(channel, stored.payload, stored.seq))
        buffered, rec.buffer = rec.buffer or [], None
        for seq, frame, nbytes in buffered:
            if seq is None or seq > threshold:
                session.send(frame, nbytes)
                threshold = seq or threshold
        rec.threshold = threshold
        metrics.REPLAYED.inc(len(replay))

    def unsubscribe(self, session: Session, channel: str) -> None:
        """Remove ``session`` from ``channel``; the last local one releases NATS interest."""
        if channel not in session.channels:
            return
        session.channels.discard(channel)
        state = self._channels.get(channel)
        if state is not None:
            state.sessions.discard(session)
            state.pending.pop(session, None)
            if not state.sessions and not state.pending:
                del self._channels[channel]
        self._spawn(self.bus.release(channel))

    async def publish(self, channel: str, payload: bytes, msg_id: str | None = None) -> int | None:
        """Publish through the bus; returns the stream seq (None with history off).

        Raises:
            Unavailable: NATS did not take it.
        """
        return await self.bus.publish(channel, payload, msg_id)

    def subscribers(self, channel: str) -> int:
        """Local sessions subscribed to ``channel`` (live or recovering)."""
        state = self._channels.get(channel)
        return 0 if state is None else len(state.sessions) + len(state.pending)

    def close_all(self, code: int, reason: str) -> None:
        """Close every session with ``code`` (graceful drain uses 1012)."""
        for session in list(self.sessions):
            session.close(code, reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_idle(self) -> None:
        """Wait for background NATS releases to finish (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
