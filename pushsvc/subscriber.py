"""A command-line subscriber: ``pushsvc subscribe CHANNEL`` (like ``nats sub``).

A thin layer over :class:`pushsvc.client.Client`: it subscribes to one channel
or pattern (``orders.*``), prints one line per message and status lines on
stderr. Everything else is the client's: the auth frame, ``pong`` answers,
reconnecting with full-jitter backoff after the close codes that allow it
(:mod:`pushsvc.client.closecodes`), and resuming with ``since`` = the last
``seq`` and the ``epoch`` it belongs to, so nothing inside the history TTL is
lost and nothing is printed twice (a stream created anew meanwhile is answered
``recovered: false`` with everything it holds).

Stops with exit status 1 (one line saying why): a token refused with 4001 (a
token minted from a secret is minted again once first; refused again: stop),
4003 and the other close codes after which the client does not reconnect, a
handshake refused with a status retrying cannot change (403, 404...), a channel
the server refuses (``forbidden``, ``invalid_channel``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from .client import Client, CommandError, Stopped, Unauthorized
from .client.events import Connected, Disconnected, Event, ServerError, Subscribed
from .client.messages import Message
from .serverurl import parse_server_url


class SubscribeError(Exception):
    """The subscription cannot go on (token refused, forbidden channel, bad URL...).

    The message is one line for the user; ``pushsvc subscribe`` exits with 1.
    """


class Subscriber:
    """Follows one channel or pattern and prints its messages, resuming after disconnects.

    Args:
        url: server URL (``http://host:port[/base]`` or the ``ws://.../ws`` URL);
            a bad one raises ``ValueError`` (see :func:`~pushsvc.serverurl.parse_server_url`).
        channel: the channel or pattern (``orders.*``, ``orders.>``) to subscribe to.
        token: returns the JWT to present. Called once for a fixed token; with
            ``renewable``, again whenever the client needs a new one (after a
            4001 close, before the token's ``exp``).
        since: resume after this stream sequence from the first connection
            (``0`` = everything the history still holds); None = live only.
        epoch: the stream epoch ``since`` belongs to (sent with ``since``).
        raw: print only each message's ``data`` (strings as they are, other JSON
            compact) instead of the whole ``message`` object.
        out: where messages go (one line each, flushed).
        err: where status lines go (reconnects, recovery gaps).
        renewable: the token can be minted again (a 4001 close reconnects with a
            new token instead of stopping; refused again before a ``welcome``: stop).

    Attributes:
        last_seq: the ``seq`` of the last message printed (None before any).
        epoch: the stream epoch ``last_seq`` belongs to, from the last ``subscribed``
            (or the ``epoch`` argument); None when the server announces none.
        printed: messages printed so far.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        token: Callable[[], str],
        *,
        since: int | None = None,
        epoch: str | None = None,
        raw: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
        renewable: bool = False,
    ) -> None:
        self.url = parse_server_url(url).ws_url
        self.channel = channel
        self.token = token
        self.last_seq = since
        self.epoch = epoch
        self.raw = raw
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.renewable = renewable
        self.printed = 0
        self._subscribed = 0
        self._minted = False  # a token was minted and no welcome came since
        self._refused: Disconnected | None = None  # the last 4001 close

    async def run(self, max_messages: int | None = None) -> None:
        """Subscribe and print until interrupted (or ``max_messages`` were printed).

        Raises:
            SubscribeError: a fatal refusal (see the module docstring), with a
                one-line reason naming the URL or the channel.
        """
        if self.renewable:
            client = Client(self.url, get_token=self._mint, on_event=self._on_event)
        else:
            client = Client(self.url, token=self.token(), on_event=self._on_event)
        try:
            async with client:
                try:
                    sub = await client.subscribe(
                        self.channel, since=self.last_seq, epoch=self.epoch
                    )
                except CommandError as exc:
                    raise SubscribeError(f"cannot subscribe to {self.channel!r}: {exc}") from None
                async for message in sub:
                    self.epoch = message.epoch
                    self._print(message)
                    if max_messages is not None and self.printed >= max_messages:
                        return
        except Stopped as exc:
            raise SubscribeError(str(exc)) from None

    def _mint(self) -> str:
        """``get_token`` of a renewable token: a fresh one, unless the last one was
        refused (4001) before any ``welcome``: minting again would not help."""
        if self._minted and self._refused is not None:
            d = self._refused
            raise Unauthorized(f"{self.url} closed the connection: {d.code} {d.reason}")
        self._minted = True
        self._refused = None
        return self.token()

    def _on_event(self, event: Event) -> None:
        match event:
            case Connected():
                self._minted = False
            case Disconnected(code=4001, error=None):
                self._refused = event
                if event.reconnect:
                    self._disconnected(event)
            case Disconnected(reconnect=True, error=error) if error is not None:
                self._status(f"cannot connect to {self.url}: {event.reason}; retrying")
            case Disconnected(reconnect=True):
                self._disconnected(event)
            case Subscribed(channel=self.channel):
                self._on_subscribed(event)
            case ServerError(error=error):
                self._status(f"server error {error}")

    def _disconnected(self, event: Disconnected) -> None:
        after = "" if self.last_seq is None else f", resuming after seq {self.last_seq}"
        self._status(f"disconnected ({event.code} {event.reason}); reconnecting{after}")

    def _on_subscribed(self, event: Subscribed) -> None:
        self._subscribed += 1
        if event.epoch is not None:
            self.epoch = event.epoch  # the epoch of every seq that follows
        if event.recovered is False:
            self._status(
                f"history no longer holds everything after seq {self.last_seq} "
                f"on {self.channel}: some messages are missing"
            )
        elif self._subscribed == 1:
            self._status(f"subscribed to {self.channel} at {self.url}")
        else:
            self._status(f"subscribed to {self.channel} again")

    def _print(self, message: Message) -> None:
        if message.seq is not None:
            self.last_seq = message.seq
        if self.raw:
            data = message.data
            text = data if isinstance(data, str) else _compact(data)
        else:
            text = _compact(message.to_frame())
        print(text, file=self.out, flush=True)
        self.printed += 1

    def _status(self, text: str) -> None:
        print(f"pushsvc subscribe: {text}", file=self.err, flush=True)


def _compact(value: Any) -> str:
    """One-line JSON as the server sends it (no spaces; non-ASCII text kept readable)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
