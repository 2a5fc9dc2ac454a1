"""Coarse deadlines shared by every session: one event-loop timer per tick, not one per session.

A session has deadlines of seconds to hours: its next heartbeat ``ping``
(``PUSHSVC_PING_INTERVAL``), the ``pong`` it waits for
(``PUSHSVC_PONG_TIMEOUT``), its token's expiry. A ``loop.call_later`` per
deadline costs a timer handle, a libuv timer and a context per session for the
whole connection (objects the garbage collector walks, memory per idle socket)
plus a create and a cancel per reschedule. Here sessions are kept in buckets of
:data:`RESOLUTION` seconds (a timing wheel with a heap of occupied ticks, as in
Varghese & Lauck, "Hashed and hierarchical timing wheels", 1987): arming,
re-arming and disarming are dict operations, and one loop timer (for the
earliest occupied tick) serves them all.

The price is precision: a deadline fires at the first tick at or after it, i.e.
up to :data:`RESOLUTION` seconds (plus the loop's own latency) late, and never
more than a millisecond early. Every deadline served this way is seconds long
(the minimum ping interval is 0.1 s), so 100 ms is well inside what the wire
contract promises (docs/protocol.md, "Heartbeat").
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("pushsvc.core.deadlines")

RESOLUTION = 0.1  # seconds per tick
_EARLY = 0.01  # fraction of a tick a timer may fire early (uvloop rounds to milliseconds)


class Deadlines:
    """One kind of deadline (e.g. "send the next ping") for many owners.

    Args:
        loop: the event loop whose clock (``loop.time()``, seconds) and timer serve it.
        fire: called with the owner when its deadline has passed; exceptions are
            logged and do not stop the other owners of that tick.
        resolution: tick length in seconds.

    An owner (any hashable object; sessions by identity) has at most one deadline
    here: :meth:`set` moves it. Owners of one tick fire in the order they were armed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fire: Callable[[Any], None],
        resolution: float = RESOLUTION,
    ) -> None:
        self._loop = loop
        self._fire = fire
        self._res = resolution
        self._ticks: dict[int, dict[Hashable, None]] = {}  # tick -> owners (ordered)
        self._owner_tick: dict[Hashable, int] = {}
        self._heap: list[int] = []  # occupied ticks (entries of emptied ticks are skipped)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick: int | None = None

    def __len__(self) -> int:
        """Owners with a deadline armed."""
        return len(self._owner_tick)

    def __contains__(self, owner: object) -> bool:
        return owner in self._owner_tick

    def set(self, owner: Hashable, delay: float) -> None:
        """Arm (or move) ``owner``'s deadline ``delay`` seconds from now (<= 0: next tick)."""
        tick = math.ceil((self._loop.time() + max(delay, 0.0)) / self._res)
        old = self._owner_tick.get(owner)
        if old == tick:
            return
        if old is not None:
            self._remove(owner, old)
        bucket = self._ticks.get(tick)
        if bucket is None:
            bucket = self._ticks[tick] = {}
            heapq.heappush(self._heap, tick)
            if self._timer_tick is None or tick < self._timer_tick:
                self._arm(tick)
        bucket[owner] = None
        self._owner_tick[owner] = tick

    def clear(self, owner: Hashable) -> None:
        """Disarm ``owner``'s deadline, if any."""
        tick = self._owner_tick.pop(owner, None)
        if tick is not None:
            self._remove(owner, tick)

    def _remove(self, owner: Hashable, tick: int) -> None:
        bucket = self._ticks[tick]
        del bucket[owner]
        if not bucket:
            del self._ticks[tick]  # its heap entry is skipped when reached

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_tick = tick
        self._timer = self._loop.call_at(tick * self._res, self._run)

    def _run(self) -> None:
        """The loop timer: fire every owner of every tick that has passed, re-arm."""
        self._timer = self._timer_tick = None
        now = math.floor(self._loop.time() / self._res + _EARLY)
        heap = self._heap
        while heap and heap[0] <= now:
            bucket = self._ticks.pop(heapq.heappop(heap), None)
            if not bucket:
                continue
            for owner in bucket:
                del self._owner_tick[owner]
            for owner in bucket:
                try:
                    self._fire(owner)
                except Exception:
                    log.exception("deadline callback failed")
        while heap and heap[0] not in self._ticks:
            heapq.heappop(heap)
        if heap and (self._timer_tick is None or heap[0] < self._timer_tick):
            self._arm(heap[0])


_registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Deadlines]] = (
    weakref.WeakKeyDictionary()
)


def deadlines(loop: asyncio.AbstractEventLoop, kind: str, fire: Callable[[Any], None]) -> Deadlines:
    """The loop's :class:`Deadlines` for ``kind``, created with ``fire`` on first use.

    One per event loop and kind (each uvicorn worker has one loop; tests run several).
    """
    kinds = _registry.get(loop)
    if kinds is None:
        kinds = _registry[loop] = {}
    found = kinds.get(kind)
    if found is None:
        found = kinds[kind] = Deadlines(loop, fire)
    return found
