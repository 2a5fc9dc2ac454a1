"""A command-line subscriber: ``pushsvc subscribe CHANNEL`` (like ``nats sub``).

Speaks the wire contract (docs/protocol.md) over ``GET /ws`` with the
``websockets`` client: auth frame, ``subscribe``, answers every ``ping`` with
``pong``, and prints one line per message. Reconnection is the ``websockets``
client's own (``async for ws in connect(...)``: RFC 6455 7.2.3 backoff with an
initial random delay on failed attempts); after every reconnect the channel is
subscribed again with ``since`` = the last ``seq`` printed and, when the server
announced one in ``subscribed``, the ``epoch`` that seq belongs to (a stream
created anew meanwhile is then answered ``recovered: false`` with everything it
holds), so nothing inside the history TTL is lost and nothing is printed twice.

Close codes (docs/protocol.md "Close codes"): 4001 (token refused; a token minted
from a secret is minted again first), 1008 and every code the table says not to
reconnect after (:func:`~pushsvc.protocol.reconnects`: 4003, 1009, 4011 and the
application's 4500-4999) stop with exit status 1; 4008 waits
:data:`RATE_LIMITED_PAUSE` seconds, then resumes; every other close (1001, 1006,
1011, 1012, 4009, 4010, 4012, 4100-4499, ...) resumes after a short jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections.abc import Callable
from typing import Any, TextIO

import websockets
from websockets.asyncio.client import ClientConnection, connect, process_exception

from .protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_RATE_LIMITED,
    CLOSE_SERVICE_RESTART,
    CLOSE_UNAUTHORIZED,
    reconnects,
)
from .serverurl import parse_server_url

#: seconds to wait after a 4008 close (rate limit exceeded repeatedly)
RATE_LIMITED_PAUSE = 30.0
#: upper bound of the random pause (seconds) before reconnecting after 1001/1012,
#: so the clients of a restarting node do not all come back at once
RESTART_JITTER = 1.0
#: seconds allowed for the TCP connect + WebSocket handshake
OPEN_TIMEOUT = 10.0
#: largest server frame accepted (bytes): NATS payloads are at most 1 MiB by default
#: (max_payload), base64 and batching add to that
MAX_FRAME_BYTES = 16 * 1024 * 1024

CLOSE_MEANINGS = {
    1000: "normal closure",
    1001: "server going away",
    1006: "connection lost",
    1008: "policy violation",
    1009: "frame too big",
    1011: "internal server error",
    1012: "service restart",
    4001: "unauthorized",
    4003: "forbidden",
    4008: "rate limit exceeded",
    4009: "slow consumer",
    4010: "heartbeat timeout",
    4011: "disconnected by the server",
    4012: "disconnected by the server; reconnect",
}


class SubscribeError(Exception):
    """The subscription cannot go on (token refused, forbidden channel, bad URL...).

    The message is one line for the user; ``pushsvc subscribe`` exits with 1.
    """


class Subscriber:
    """Follows one channel over ``/ws`` and prints its messages, resuming after disconnects.

    Args:
        url: server URL (``http://host:port[/base]`` or the ``ws://.../ws`` URL);
            a bad one raises ``ValueError`` (see :func:`~pushsvc.serverurl.parse_server_url`).
        channel: the channel to subscribe to (no wildcards: a channel, not a grant).
        token: returns the JWT to present; called before every connection, so a
            token minted from a secret is always fresh.
        since: resume after this stream sequence from the first connection
            (``0`` = everything the history still holds); None = live only.
        epoch: the stream epoch ``since`` belongs to (sent with ``since``).
        raw: print only each message's ``data`` (strings as they are, other JSON
            compact) instead of the whole ``message`` object.
        out: where messages go (one line each, flushed).
        err: where status lines go (reconnects, recovery gaps).
        renewable: the token can be minted again (a 4001 close reconnects once
            with a new token instead of stopping).

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
        self._connections = 0
        self._welcomed = False

    async def run(self, max_messages: int | None = None) -> None:
        """Subscribe and print until interrupted (or ``max_messages`` were printed).

        Raises:
            SubscribeError: a fatal refusal (see the module docstring), with a
                one-line reason naming the URL or the channel.
        """
        # The library retries failed connects with backoff: network errors and
        # 500/502/503/504 (what a draining or full node answers); anything else,
        # e.g. 403 (token, origin) or 404 (wrong path), is raised.
        connections = connect(
            self.url,
            compression=None,
            open_timeout=OPEN_TIMEOUT,
            max_size=MAX_FRAME_BYTES,
            process_exception=self._connect_failed,
        )
        refused_once = False
        try:
            async with contextlib.aclosing(aiter(connections)) as attempts:
                async for ws in attempts:
                    self._connections += 1
                    self._welcomed = False
                    try:
                        done = await self._session(ws, max_messages)
                    except websockets.ConnectionClosed:
                        done = False
                    if self._welcomed:
                        refused_once = False  # that token worked: a later 4001 may renew again
                    if done:
                        await ws.close()
                        return
                    code = ws.close_code or 1006
                    reason = ws.close_reason or CLOSE_MEANINGS.get(code, "")
                    if code == CLOSE_UNAUTHORIZED and self.renewable and not refused_once:
                        refused_once = True  # mint a fresh token, once; refused again: stop
                    elif code in (CLOSE_UNAUTHORIZED, 1008) or not reconnects(code):
                        raise SubscribeError(f"{self.url} closed the connection: {code} {reason}")
                    pause = 0.0
                    if code == CLOSE_RATE_LIMITED:
                        pause = RATE_LIMITED_PAUSE
                    elif code in (CLOSE_SERVICE_RESTART, CLOSE_GOING_AWAY, 4012):
                        pause = random.uniform(0, RESTART_JITTER)
                    after = "" if self.last_seq is None else f", resuming after seq {self.last_seq}"
                    self._status(f"disconnected ({code} {reason}); reconnecting{after}")
                    await asyncio.sleep(pause)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip()[:200]
            raise SubscribeError(f"{self.url} refused the handshake: {status} {body}") from None
        except (websockets.InvalidURI, websockets.InvalidHandshake) as exc:
            raise SubscribeError(f"{self.url}: {exc}") from None

    async def _session(self, ws: ClientConnection, max_messages: int | None) -> bool:
        """One connection: auth, subscribe (resuming), print. True when done."""
        await ws.send(json.dumps({"op": "auth", "token": self.token()}))
        sub: dict[str, Any] = {"op": "subscribe", "channel": self.channel, "id": "sub"}
        subscribed = False
        async for frame in ws:
            if not isinstance(frame, str):
                continue  # the contract has text frames only
            for line in frame.split("\n"):
                msg = json.loads(line)
                kind = msg.get("type")
                if kind == "ping":
                    await ws.send('{"op":"pong"}')
                elif kind == "welcome":
                    self._welcomed = True
                    # welcome's epoch is the stream's current one, not necessarily the
                    # one of our position: the position keeps the epoch `subscribed` gave
                    if self.last_seq is not None:
                        sub["since"] = self.last_seq
                        if self.epoch is not None:
                            sub["epoch"] = self.epoch
                    await ws.send(json.dumps(sub))
                elif kind == "subscribed":
                    subscribed = True
                    self._note_epoch(msg)
                    if msg.get("recovered") is False:
                        self._status(
                            f"history no longer holds everything after seq {self.last_seq} "
                            f"on {self.channel}: some messages are missing"
                        )
                    elif self._connections == 1:
                        self._status(f"subscribed to {self.channel} at {self.url}")
                    else:
                        self._status(f"subscribed to {self.channel} again")
                elif kind == "message":
                    self._print(msg)
                    if max_messages is not None and self.printed >= max_messages:
                        return True
                elif kind == "error":
                    text = f"{msg.get('code')}: {msg.get('message')}"
                    if msg.get("id") == "sub" and not subscribed:
                        raise SubscribeError(f"cannot subscribe to {self.channel!r}: {text}")
                    self._status(f"server error {text}")
        return False

    def _connect_failed(self, exc: Exception) -> Exception | None:
        """``process_exception`` hook of ``connect``: the library's verdict (retry
        network errors and 500/502/503/504, raise the rest), plus a status line so
        a user waiting for a server that is down sees why nothing happens."""
        verdict = process_exception(exc)
        if verdict is None:
            if isinstance(exc, OSError) and exc.errno:
                cause = os.strerror(exc.errno).lower()  # asyncio's text names no cause
            else:
                cause = str(exc) or type(exc).__name__
            self._status(f"cannot connect to {self.url}: {cause}; retrying")
        return verdict

    def _note_epoch(self, msg: dict[str, Any]) -> None:
        """``subscribed`` names the epoch of every ``seq`` that follows (docs/protocol.md)."""
        if msg.get("epoch") is not None:
            self.epoch = msg["epoch"]

    def _print(self, msg: dict[str, Any]) -> None:
        if msg.get("seq") is not None:
            self.last_seq = msg["seq"]
        if self.raw:
            data = msg.get("data")
            text = data if isinstance(data, str) else _compact(data)
        else:
            text = _compact(msg)
        print(text, file=self.out, flush=True)
        self.printed += 1

    def _status(self, text: str) -> None:
        print(f"pushsvc subscribe: {text}", file=self.err, flush=True)


def _compact(value: Any) -> str:
    """One-line JSON as the server sends it (no spaces; non-ASCII text kept readable)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
