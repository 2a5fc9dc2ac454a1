"""Small helpers shared by test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx


def bearer(token: str) -> dict[str, str]:
    """``Authorization: Bearer <token>`` header."""
    return {"Authorization": f"Bearer {token}"}


async def until(check: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> float:
    """Poll ``check`` every 20 ms until true; return the seconds taken (fail after ``within``)."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        assert time.monotonic() - start < within, "condition not met in time"
        await asyncio.sleep(0.02)


async def http_ready(http: httpx.AsyncClient, port: int) -> bool:
    """True when ``GET /readyz`` on 127.0.0.1:``port`` answers 200 (False: not yet up)."""
    try:
        return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
    except httpx.TransportError:
        return False
