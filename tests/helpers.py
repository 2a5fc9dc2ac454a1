"""Small helpers shared by test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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
