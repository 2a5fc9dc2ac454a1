"""NATS outage recovery for the connections that stay: suspend, then catch up from the stream.

Each channel remembers the last seq handed to its clients (``last_seq``); when the
NATS connection drops (:meth:`OutageRecovery.suspend`) live frames are buffered,
and once nats-py has reconnected and resubscribed (:meth:`OutageRecovery.resume`)
the stream is read after ``last_seq``, what was missed is delivered, then the
buffered frames past it: no gap, no duplicate. A re-created stream (new epoch)
closes every connection with 1012 (:meth:`OutageRecovery.stream_reset`).

A base class of :class:`~pushsvc.core.hub.Hub`, which provides the attributes
declared below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from .. import metrics
from ..bus import Bus, Headers, StoredMessage, Unavailable
from ..protocol import CLOSE_SERVICE_RESTART
from .channelstate import ChannelState, encode_stored
from .member import Member

log = logging.getLogger("pushsvc.core.hub")

CATCHUP_CONCURRENCY = 16  # channels read from the stream at once after a reconnect


class OutageRecovery:
    """Suspend and catch-up over the hub's channels (see the module docstring)."""

    bus: Bus
    _channels: dict[str, ChannelState]

    def _deliver(
        self,
        state: ChannelState,
        seq: int | None,
        frame: str,
        nbytes: int,
        skip: Member | None = None,
    ) -> None:
        raise NotImplementedError

    def _skip_of(self, headers: Headers) -> Member | None:
        raise NotImplementedError

    def close_all(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def suspend(self) -> None:
        """The NATS connection dropped: buffer every channel's live frames until resumed.

        Records each channel's ``last_seq`` as the point to catch up from. Called
        by the bus (synchronously) on disconnect; a second drop before the catch-up
        finished keeps the first point.
        """
        if not self.bus.history_enabled:
            return
        seen = max((s.last_seq or 0 for s in self._channels.values()), default=0)
        for state in self._channels.values():
            if state.catchup is None:
                state.catchup = []
                state.catchup_since = state.last_seq
                state.catchup_seen = seen

    def stream_reset(self, epoch: str) -> None:
        """The stream was re-created (new ``epoch``): every position handed out is void.

        Called by the bus (synchronously) whenever it notices, on a reconnect, on
        its periodic check or while answering a resume. Every session is closed
        with 1012 so its client reconnects, learns the new epoch from ``welcome``
        and resumes with ``recovered: false`` and a full replay, instead of
        filtering the new epoch's (restarted, smaller) sequences as duplicates.
        """
        for state in self._channels.values():
            state.catchup = None
            state.last_seq = None
            state.catchup_since = None
        self.close_all(CLOSE_SERVICE_RESTART, "message stream was reset; resume")

    async def resume(self, reset: bool) -> None:
        """NATS is back, subscriptions restored, stream verified: fill every channel's gap.

        For each suspended channel (at most ``CATCHUP_CONCURRENCY`` at once) reads
        the stream after the seq recorded by :meth:`suspend`, delivers what the
        live set missed in order, then the buffered live frames past it: no gap,
        no duplicate. When the gap cannot be filled (the stream did not answer
        ``CATCHUP_ATTEMPTS`` times, or messages expired or were capped meanwhile)
        the channel's sessions are closed with 1012 so clients resume with
        ``since`` and learn ``recovered: false``.

        Args:
            reset: the stream was re-created (NATS lost its store, sequences
                restarted): every session is closed with 1012 instead.
        """
        if reset:
            self.stream_reset(self.bus.epoch or "")
            return
        limit = asyncio.Semaphore(CATCHUP_CONCURRENCY)
        jobs = [
            self._catch_up(channel, state, limit)
            for channel, state in list(self._channels.items())
            if state.catchup is not None
        ]
        if jobs:
            await asyncio.gather(*jobs)

    async def _catch_up(self, channel: str, state: ChannelState, limit: asyncio.Semaphore) -> None:
        """Deliver what ``channel`` missed while NATS was away, then its buffered frames.

        The stream reads are retried with backoff for up to ``connect_timeout``
        seconds (a stream leader election after a cluster member died takes a few
        seconds) before the channel's sessions are told to resume elsewhere.
        """
        async with limit:
            since = state.catchup_since
            replay: list[StoredMessage] = []
            recovered = since is not None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.bus.settings.connect_timeout
            delay = 0.05
            while since is not None:
                if self._channels.get(channel) is not state or state.catchup is None:
                    return  # every session left meanwhile, or the stream was reset
                try:
                    replay = []
                    after = since
                    while True:
                        history = await self.bus.history(channel, after, seen=state.catchup_seen)
                        replay += history.messages
                        recovered = recovered and history.recovered
                        if not history.more or not history.messages:
                            break
                        after = history.messages[-1].seq
                    break
                except Unavailable as exc:
                    if loop.time() + delay > deadline:
                        log.warning("catch-up of %s failed: %s", channel, exc)
                        recovered = False
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        if self._channels.get(channel) is not state or state.catchup is None:
            return
        if since is not None and not recovered:
            state.catchup = None
            for session in (*state.clients, *state.pending):
                session.close(CLOSE_SERVICE_RESTART, "messages missed during a NATS outage")
            return
        buffered, state.catchup = state.catchup, None
        threshold = since or 0
        for stored in replay:
            frame, nbytes = encode_stored(channel, stored)
            self._deliver(state, stored.seq, frame, nbytes, self._skip_of(stored.headers))
            threshold = stored.seq
        for seq, frame, nbytes, skip in buffered:
            if since is None or seq is None or seq > threshold:
                self._deliver(state, seq, frame, nbytes, skip)
        metrics.REPLAYED.inc(len(replay))
        if replay:
            log.info("caught up %s: %d message(s) missed during the outage", channel, len(replay))

    async def _learn_last_seq(self, channel: str, state: ChannelState) -> None:
        """Set a new channel's ``last_seq`` from the stream (its newest stored message).

        Runs once the channel's NATS subscription is confirmed, so every later
        message arrives live; without it a channel that had no message yet when
        NATS went away would have no point to catch up from.
        """
        try:
            seq = await self.bus.channel_last_seq(channel)
        except Unavailable:
            return
        if self._channels.get(channel) is state and state.catchup is None:
            state.last_seq = max(state.last_seq or 0, seq)
