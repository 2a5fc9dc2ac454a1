"""A small test client speaking the pushsvc wire contract over a real socket."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection


class WSClient:
    """Wraps a ``websockets`` connection; splits server text frames on ``\\n``.

    Attributes:
        frames: every server object received, in order (including consumed ones).
        raw_frames: the WebSocket text frames as received (before splitting).
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.raw_frames: list[str] = []
        self._pending: deque[dict[str, Any]] = deque()

    @classmethod
    async def connect(
        cls, url: str, token: str | None = None, *, auth_frame: bool = True, **kwargs: Any
    ) -> WSClient:
        """Open ``url``; with ``token`` and ``auth_frame`` send the auth frame and await welcome."""
        kwargs.setdefault("compression", None)
        kwargs.setdefault("open_timeout", 5)
        ws = await websockets.connect(url, **kwargs)
        client = cls(ws)
        if token is not None and auth_frame:
            await client.send({"op": "auth", "token": token})
            welcome = await client.expect("welcome")
            client.welcome = welcome
        return client

    async def send(self, obj: Any) -> None:
        """Send one JSON command."""
        await self.ws.send(json.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """Next server object (answers ``ping`` with ``pong`` automatically)."""
        while True:
            if self._pending:
                frame = self._pending.popleft()
            else:
                text = await asyncio.wait_for(self.ws.recv(), timeout)
                assert isinstance(text, str), "server sent a binary frame"
                self.raw_frames.append(text)
                for line in text.split("\n"):
                    self._pending.append(json.loads(line))
                continue
            self.frames.append(frame)
            if frame.get("type") == "ping":
                await self.send({"op": "pong"})
                continue
            return frame

    async def expect(self, type_: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Receive the next non-ping object and assert its ``type`` (and ``fields``)."""
        frame = await self.recv(timeout)
        assert frame.get("type") == type_, f"expected {type_}, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"{key}: expected {value!r}, got {frame}"
        return frame

    async def subscribe(
        self, channel: str, since: int | None = None, *, epoch: str | None = None, **fields: Any
    ) -> dict:
        """Subscribe (resuming at ``since``/``epoch`` if given) and await ``subscribed``."""
        cmd: dict[str, Any] = {"op": "subscribe", "channel": channel}
        if since is not None:
            cmd["since"] = since
        if epoch is not None:
            cmd["epoch"] = epoch
        await self.send(cmd)
        return await self.expect("subscribed", channel=channel, **fields)

    async def messages(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Receive exactly ``n`` ``message`` objects (fails on anything else)."""
        out = []
        for _ in range(n):
            out.append(await self.expect("message", timeout))
        return out

    async def nothing(self, within: float = 0.3) -> None:
        """Assert that no (non-ping) object arrives within ``within`` seconds."""
        try:
            frame = await self.recv(within)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {frame}")

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; return the close code."""

        async def drain() -> None:
            try:
                while True:
                    await self.ws.recv()
            except websockets.ConnectionClosed:
                return

        await asyncio.wait_for(drain(), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        """Close from the client side."""
        await self.ws.close()
