"""Small helpers shared by test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import os
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx

#: ``max_age`` (seconds) of the session NATS's shared stream, for every node on it.
#: The suite runs longer than the 300 s default: a stream with that max age expires
#: the first tests' messages, and a later ``since=0`` read is then honestly answered
#: ``recovered: false``. A node with another value would re-configure the stream.
SESSION_HISTORY_TTL = 3600.0


def node_env(**extra: str) -> dict[str, str]:
    """Environment for a ``pushsvc`` subprocess: this process's variables without
    ``PUSHSVC_*``, then ``PUSHSVC_HISTORY_TTL`` = :data:`SESSION_HISTORY_TTL` (the
    shared stream keeps its max age), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    env["PUSHSVC_HISTORY_TTL"] = str(SESSION_HISTORY_TTL)
    env.update(extra)
    return env


def thread_names(pid: int) -> list[str]:
    """The OS names of a process's threads (``/proc/<pid>/task/*/comm``, what ``top -H`` shows)."""
    names = []
    for path in glob.glob(f"/proc/{pid}/task/*/comm"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:  # a thread may end
            names.append(f.read().strip())
    return names


def bearer(token: str) -> dict[str, str]:
    """``Authorization: Bearer <token>`` header."""
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def refcounting_only() -> Iterator[None]:
    """Inside the block nothing is freed except by reference counting (cyclic GC off)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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
