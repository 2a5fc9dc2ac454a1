"""Process plumbing shared by the bench's processes: loops, limits, CPU, pipes, /proc.

Nothing here knows about WebSockets or pushsvc; every other bench module may
import it, and it imports no other bench module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..server import capacity as server_capacity

T = TypeVar("T")

try:  # pragma: no cover - uvloop is a Linux/macOS dependency
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard one (every client is a socket)."""
    server_capacity.raise_nofile_limit()


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def user_seconds() -> float:
    """User-space CPU seconds used so far by this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed (as ``pushsvc serve`` uses), else asyncio's."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a :func:`new_loop` loop (``asyncio.Runner``), then
    close the loop; returns what ``main`` returns (each bench process's entry)."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


def ssl_context(tls: bool) -> ssl.SSLContext | None:
    """The default client TLS context when ``tls``, else None."""
    return ssl.create_default_context() if tls else None


def add_pipe_reader(
    loop: asyncio.AbstractEventLoop, conn: Any, callback: Callable[..., None], *args: Any
) -> None:
    """Watch a multiprocessing pipe end from the loop, keeping it in blocking mode.

    Event loops make the descriptors they watch non-blocking; Connection.send and
    recv of a message larger than the socket buffer would then fail with EAGAIN.
    The callback only runs when data is ready, so blocking reads never stall long.
    """
    loop.add_reader(conn.fileno(), callback, *args)
    os.set_blocking(conn.fileno(), True)


def _proc_table() -> tuple[dict[int, list[int]], dict[int, str]]:
    """(parent pid -> child pids, pid -> command name) of every process in /proc."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        names[int(entry)] = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    return parents, names


def server_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds and RSS/HWM (KiB) of ``pid`` and its descendants.

    Left out: bundled nats-server children, and this process with its own
    children (a bench started by the server process, as in the tests).
    Source: /proc/<pid>/stat fields 14-15 (utime, stime, clock ticks) and
    /proc/<pid>/status VmRSS/VmHWM (proc(5)).

    Returns:
        {"cpu": seconds, "rss": KiB, "hwm": KiB, "procs": count}, or None when
        ``pid`` does not exist (or /proc is unreadable).
    """
    tick = os.sysconf("SC_CLK_TCK")
    parents, names = _proc_table()
    if pid not in names:
        return None
    me = os.getpid()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p != pid and (names.get(p) == "nats-server" or p == me):
            continue
        tree.append(p)
        todo.extend(parents.get(p, []))
    cpu = rss = hwm = 0.0
    for p in tree:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
            fields = stat[stat.rfind(")") + 2 :].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return {"cpu": cpu, "rss": rss, "hwm": hwm, "procs": len(tree)}


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` of this host, or None if none is visible.

    Reads /proc/net/tcp and tcp6 (proc(5): state ``0A`` is LISTEN) for the
    socket's inode, then /proc/<pid>/fd for its owners; of several owners (a
    uvicorn supervisor and its workers share the socket) the outermost one is
    returned, so :func:`server_sample` covers all of them. Processes of other
    users are invisible without privileges.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if (
                        len(cols) > 9
                        and cols[3] == "0A"
                        and int(cols[1].rsplit(":", 1)[1], 16) == port
                    ):
                        inodes.add(cols[9])
        except (OSError, ValueError):
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                        owners.add(int(entry))
                        break
    owners.discard(os.getpid())
    if not owners:
        return None
    parents, _ = _proc_table()
    parent_of = {child: ppid for ppid, kids in parents.items() for child in kids}
    roots = [p for p in owners if parent_of.get(p) not in owners]
    return min(roots or owners)


def open_files(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/<pid>/fd, proc(5)); -1 unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
