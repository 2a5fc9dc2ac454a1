"""Server frames -> client state: what each frame of docs/protocol.md does to a
:class:`~pushsvc.client.Client` (a mixin of :class:`~pushsvc.client.connection.Connection`,
which owns the state these handlers read and write)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection

from .. import protocol as wire
from .errors import CommandError
from .events import Connected, Join, Leave, ServerError, Subscribed, Unsubscribed
from .messages import Message, Publisher
from .subscription import Subscription

log = logging.getLogger("pushsvc.client")

#: seconds before a subscribe refused ``unavailable`` (no ``retry_after``) is sent again
RESUBSCRIBE_DELAY = 5.0
_PONG = msgspec.json.encode(wire.Pong()).decode()


def _encode(command: msgspec.Struct) -> str:
    """A command as JSON text (sent as a text frame: the contract has no binary frames)."""
    return msgspec.json.encode(command).decode()


class FrameHandlers:
    """The frame handlers of a connection. :class:`~pushsvc.client.connection.Connection`
    owns the state below and the helpers they call (``_emit``, ``_later``, ``_new_id``,
    ``_new_subscription``, ``_send_subscribe``, ``_schedule_refresh``, ``_wake``)."""

    welcome: Connected | None
    _subs: dict[str, Subscription]  # by channel or pattern, as subscribed
    _left: set[str]  # server-side subscriptions the app unsubscribed
    _pending: dict[Any, Any]  # command id -> what waits for its answer
    _ws: ClientConnection | None
    _welcomed: bool
    _heartbeat_timeout: float  # seconds without a frame before closing 4010
    _attempt: int
    _state: str

    async def _on_line(self, ws: ClientConnection, line: str) -> None:
        """One server object (a text frame holds one or more, separated by newlines)."""
        try:
            frame = wire.decode_frame(line)
        except (msgspec.DecodeError, RecursionError):
            # frame types and fields this client does not know are ignored (docs/protocol.md)
            log.debug("pushsvc client: ignoring frame %.200s", line)
            return
        match frame:
            case wire.Message():
                await self._on_message(frame)
            case wire.Ping():
                await ws.send(_PONG)
            case wire.Welcome():
                await self._on_welcome(ws, frame)
            case wire.Subscribed():
                self._on_subscribed(frame)
            case wire.Unsubscribed():
                self._on_unsubscribed(frame)
            case wire.Error():
                self._on_error(ws, frame)
            case wire.Join():
                self._emit(Join(frame.channel, frame.client, frame.user, json_field(frame.info)))
            case wire.Leave():
                self._emit(Leave(frame.channel, frame.client, frame.user, json_field(frame.info)))
            case _:  # published, refreshed, presence, presence_stats
                p = self._pending.pop(frame.id, None) if frame.id is not None else None  # type: ignore[union-attr]
                if p is not None and p.future is not None and not p.future.done():
                    p.future.set_result(frame)

    async def _on_message(self, f: wire.Message) -> None:
        key = f.pattern if f.pattern is not None else f.channel  # the subscription it came by
        sub = self._subs.get(key)
        if sub is None:
            return  # unsubscribed meanwhile
        if f.seq is not None:
            if sub.last_seq is not None and f.seq <= sub.last_seq:
                sub.duplicates += 1
                log.debug("pushsvc client: duplicate %s seq %d dropped", key, f.seq)
                return
            sub.last_seq = f.seq
            if sub.own:  # our own no-echo publishes: replayed after a reconnect, never live
                mine = f.seq in sub.own
                sub.own = {s for s in sub.own if s > f.seq}
                if mine:
                    sub.duplicates += 1
                    return
        data = msgspec.json.decode(f.data)
        p = f.publisher
        publisher = None if p is None else Publisher(p.user, p.client)
        await sub._put(Message(f.channel, data, f.seq, sub.epoch, f.pattern, f.encoding, publisher))

    async def _on_welcome(self, ws: ClientConnection, f: wire.Welcome) -> None:
        interval = f.ping_interval if f.ping_interval > 0 else 25.0
        self._heartbeat_timeout = max(interval * 1.5, interval + 10)
        self._welcomed = True
        self._attempt = 0
        server = set(f.subs)
        for name in f.subs:
            sub = self._subs.get(name)
            if sub is not None:
                sub.server = True
            elif name not in self._left:
                self._subs[name] = self._new_subscription(name, server=True)
        self.welcome = Connected(
            f.client, f.user, f.node, f.epoch, list(f.subs), f.ping_interval, f.exp
        )
        self._state = "connected"
        self._emit(self.welcome)
        for name in f.subs:
            if name in self._left:  # left by the app: leave it again
                await ws.send(_encode(wire.Unsubscribe(name, id=self._new_id())))
        for sub in list(self._subs.values()):
            if sub.channel not in server:
                sub.server = False
                await self._send_subscribe(ws, sub)
        self._schedule_refresh(f.exp)
        self._wake()

    def _on_subscribed(self, f: wire.Subscribed) -> None:
        p = self._pending.pop(f.id, None) if f.id is not None else None  # type: ignore[arg-type]
        sub = p.sub if p is not None and p.sub is not None else self._subs.get(f.channel)
        if sub is None or self._subs.get(sub.channel) is not sub:
            if p is not None or f.channel in self._left:
                return  # the app left it meanwhile
            # subscribed by the server after welcome (server API `subscribe`, issue 21)
            sub = self._subs[f.channel] = self._new_subscription(f.channel, server=True)
        sub._settle(f)
        self._emit(Subscribed(f.channel, f.recovered, sub.epoch, sub.server))

    def _on_unsubscribed(self, f: wire.Unsubscribed) -> None:
        p = self._pending.pop(f.id, None) if f.id is not None else None  # type: ignore[arg-type]
        if p is not None:
            if p.future is not None and not p.future.done():
                p.future.set_result(f)
            return
        sub = self._subs.pop(f.channel, None)
        if sub is None:
            return  # the answer to an unsubscribe of ours
        sub._end(f.reason or "unsubscribed by the server")
        self._emit(Unsubscribed(f.channel, f.reason))

    def _on_error(self, ws: ClientConnection, f: wire.Error) -> None:
        p = self._pending.pop(f.id, None) if f.id is not None else None  # type: ignore[arg-type]
        err = CommandError(
            f.code, f.message, id=f.id, retry_after=f.retry_after, channel=p.channel if p else None
        )
        if p is None:
            self._emit(ServerError(err))
        elif p.sub is not None:
            self._subscribe_refused(ws, p.sub, err)
        elif p.future is not None and not p.future.done():
            p.future.set_exception(err)

    def _subscribe_refused(
        self, ws: ClientConnection, sub: Subscription, err: CommandError
    ) -> None:
        if self._subs.get(sub.channel) is not sub:
            return
        if err.code in (wire.RATE_LIMITED, wire.UNAVAILABLE):  # transient: again on this socket
            self._emit(ServerError(err))

            async def again() -> None:
                if self._ws is ws and self._welcomed and self._subs.get(sub.channel) is sub:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await self._send_subscribe(ws, sub)

            self._later(err.retry_after or RESUBSCRIBE_DELAY, again)
            return
        del self._subs[sub.channel]
        sub._end(err.code, err)


def json_field(raw: msgspec.Raw | msgspec.UnsetType | None) -> Any:
    """Decode an optional raw JSON field (``info``)."""
    if raw is None or raw is msgspec.UNSET:
        return None
    return msgspec.json.decode(raw)  # type: ignore[arg-type]
