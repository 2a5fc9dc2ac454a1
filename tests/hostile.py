"""Helpers for the hostile-client suites: a well-behaved bystander and a log capture.

Every attack test keeps a :class:`Bystander` connected during the attack and
checks afterwards that it still receives a message published into NATS: the
server must go on serving good clients while it refuses a bad one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import websockets


class Bystander:
    """A well-behaved client: answers every ``ping`` at once, from a reader task.

    It reads continuously (so heartbeat tests with 100 ms intervals do not close
    it) and queues every non-ping object for :meth:`still_served`.
    """

    def __init__(self, ws: Any, channel: str) -> None:
        self.ws = ws
        self.channel = channel
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def join(
        cls, srv: Any, name: str = "bystander", *, origin: str | None = None
    ) -> Bystander:
        """Connect to ``srv`` as user ``name`` and subscribe to a fresh channel.

        ``origin`` is sent as the Origin header. The token carries the ``aud`` and
        ``typ`` the server is configured to require.
        """
        channel = f"{name}.{uuid.uuid4().hex[:8]}"
        ws = await websockets.connect(srv.ws_url, compression=None, open_timeout=5, origin=origin)
        settings = srv.settings
        token = srv.token(
            name,
            channels=[f"{name}.>"],
            audience=settings.jwt_audience,
            headers={"typ": settings.jwt_type} if settings.jwt_type else None,
        )
        await ws.send(json.dumps({"op": "auth", "token": token}))
        self = cls(ws, channel)
        assert (await self.next())["type"] == "welcome"
        await ws.send(json.dumps({"op": "subscribe", "channel": channel}))
        assert (await self.next())["type"] == "subscribed"
        return self

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                for line in str(text).split("\n"):
                    frame = json.loads(line)
                    if frame.get("type") == "ping":
                        await self.ws.send('{"op":"pong"}')
                    else:
                        self.queue.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next non-ping object."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def still_served(self, nc: Any, prefix: str = "push") -> None:
        """Publish a fresh message into NATS and assert this client receives it."""
        marker = uuid.uuid4().hex
        await nc.publish(f"{prefix}.{self.channel}", json.dumps({"m": marker}).encode())
        await nc.flush()
        while True:
            frame = await self.next()
            if frame.get("type") == "message" and frame["data"] == {"m": marker}:
                return

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 2)


class LogCapture(logging.Handler):
    """Collects fully formatted records (message + traceback) of every logger.

    Attached to the root logger and to the non-propagating uvicorn loggers.
    """

    LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "pushsvc", "websockets")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @contextlib.contextmanager
    def installed(self, level: int = logging.DEBUG) -> Iterator[LogCapture]:
        """Attach to all relevant loggers at ``level`` (DEBUG: the most verbose)."""
        saved = []
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, logger.level))
            logger.setLevel(level)
            if name in ("", "uvicorn", "uvicorn.access"):
                logger.addHandler(self)
        try:
            yield self
        finally:
            for logger, old in saved:
                logger.setLevel(old)
                logger.removeHandler(self)
