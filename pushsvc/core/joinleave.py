"""Join and leave events: who subscribes to / leaves a channel, announced on every node.

For channels matching ``PUSHSVC_JOIN_LEAVE_CHANNELS``, when a session subscribes
(``join``) or unsubscribes or disconnects (``leave``), the node serving it
core-publishes the encoded frame ``{"type":"join"|"leave", channel, client,
user, info?}`` to ``<prefix>-joinleave.<channel>`` (never stored in the stream, so
never in history or replays). Every node holding local subscribers of that
channel subscribes there (one refcounted NATS subscription per channel, see
:meth:`Bus.acquire_events <pushsvc.bus.Bus.acquire_events>`) and hands the frame
to them (:meth:`Hub.broadcast <pushsvc.core.hub.Hub.broadcast>`).

Order: one session's join and leave of one channel are published in that order
(they are chained per session and channel), and NATS delivers one publisher's
messages on one subject in order; events of sessions on different nodes arrive
in the order NATS received them. The joining session receives its own ``join``
(it is a subscriber by then); a leaving session does not receive its ``leave``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec

from .. import metrics
from ..bus import Bus, Unavailable
from ..channels import concrete_match
from ..config.settings import Settings
from ..protocol import NO_INFO, Join, Leave, encode_frame
from .hub import Hub
from .member import Member

log = logging.getLogger("pushsvc.core.joinleave")

_decode_event = msgspec.json.Decoder(Join | Leave)


class JoinLeave:
    """Publishes this node's join/leave events and delivers everyone's to local subscribers.

    Args:
        settings: ``join_leave_channels`` (patterns; none = off).
        bus: publishes and subscribes the events subjects.
        hub: delivers received events to the channel's local sessions.

    Wire :meth:`joined`/:meth:`left` to the hub's ``on_join``/``on_leave`` and
    :meth:`deliver` to the bus's ``on_event``; :meth:`wait_idle` before the bus
    closes.
    """

    def __init__(self, settings: Settings, bus: Bus, hub: Hub) -> None:
        self.patterns = tuple(settings.join_leave_channels)
        self.bus = bus
        self.hub = hub
        self._chains: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._held: set[tuple[str, str]] = set()  # (client, channel) holding events

    def enabled(self, channel: str) -> bool:
        """True when ``channel`` has join/leave events (``PUSHSVC_JOIN_LEAVE_CHANNELS``)."""
        return concrete_match(self.patterns, channel)

    # --- hub observers ---------------------------------------------------------------
    def joined(self, session: Member, channel: str) -> None:
        """``session`` subscribed: hold the channel's events, then publish ``join``."""
        if not self.enabled(channel):
            return
        frame = encode_frame(Join(channel=channel, **_who(session)))

        key = (session.id, channel)

        async def run() -> None:
            await self.bus.acquire_events(channel)  # Unavailable: nothing held, no join
            self._held.add(key)
            await self._publish(channel, frame, "join")

        self._chain(session, channel, run)

    def left(self, session: Member, channel: str) -> None:
        """``session`` left: publish ``leave``, then drop the hold on the channel's events."""
        if not self.enabled(channel):
            return
        frame = encode_frame(Leave(channel=channel, **_who(session)))

        key = (session.id, channel)

        async def run() -> None:
            if key not in self._held:
                return  # its join never got through: nobody was told it joined
            self._held.discard(key)
            try:
                await self._publish(channel, frame, "leave")
            finally:
                await self.bus.release_events(channel)

        self._chain(session, channel, run)

    async def _publish(self, channel: str, frame: bytes, event: str) -> None:
        try:
            await self.bus.publish_event(channel, frame)
        except Unavailable as exc:
            log.warning("%s event of %s not published: %s", event, channel, exc)
            return
        metrics.JOIN_LEAVE_PUBLISHED.labels(event).inc()

    def _chain(self, session: Member, channel: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` after the previous job of the same (session, channel) finished."""
        key = (session.id, channel)
        previous = self._chains.get(key)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await job()
            except Unavailable as exc:
                log.warning("join/leave of %s: %s", channel, exc)

        task = asyncio.ensure_future(run())
        self._chains[key] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._chains.get(key) is t:
                del self._chains[key]

        task.add_done_callback(done)

    async def wait_idle(self) -> None:
        """Wait until every pending join/leave has been published (shutdown, tests)."""
        while self._chains:
            await asyncio.gather(*list(self._chains.values()), return_exceptions=True)

    # --- bus -> hub ----------------------------------------------------------------------
    def deliver(self, channel: str, payload: bytes) -> None:
        """An event arrived from NATS: check it, then hand it to ``channel``'s local sessions.

        Anything that is not a ``join``/``leave`` frame of that very channel (e.g. a
        stray publish by another NATS client) is logged and dropped; accepted frames
        are re-encoded, so what reaches sockets is always compact JSON.
        """
        try:
            event = _decode_event.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            event = None
        if event is None or event.channel != channel:
            log.warning("ignored a malformed event on %s", self.bus.events_subject(channel))
            return
        raw = encode_frame(event)
        self.hub.broadcast(channel, raw.decode(), len(raw))


def _who(session: Member) -> dict[str, object]:
    principal = session.principal
    info = msgspec.Raw(principal.info) if principal.info is not None else NO_INFO
    return {"client": session.id, "user": principal.sub, "info": info}
