"""A bench worker process: its share of the clients and the command loop with the coordinator.

The coordinator (:mod:`pushsvc.bench.coordinator`) forks ``--procs`` workers;
each runs one uvloop event loop and owns clients ``wid, wid + procs, ...``
(normal ones first, then the ``--stall`` ones). Commands arrive on a pipe as
the Structs of :mod:`pushsvc.bench.messages` (``Connect``, ``Published``,
``Stop``, ``Close``, ``Reconnect``, ``Exit``); answers go back the same way
(``Up``, ``Progress``, ``Ready``, ``Done``, ``Result``, ``Closed``,
``Reconnected``, ``Bye``). Every worker exits by itself at the run's hard
deadline or when the coordinator is gone.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Iterable
from typing import Any

from websockets.uri import parse_uri

from . import messages as pipe
from .client import Client, Tally
from .streamclient import StreamClient
from .system import add_pipe_reader, cpu_seconds, raise_nofile_limit, run_loop, ssl_context
from .tokens import client_token

SETUP_TIMEOUT = 30.0  # seconds for connect + auth + subscribe of one client
PROGRESS_INTERVAL = 0.5  # seconds between worker progress messages
# Linux ip(7): bind() to an address only, the port chosen at connect() for the 4-tuple
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Worker(Tally):
    """One worker process: its clients, counters and the command loop with the coordinator."""

    def __init__(self, conn: Any, cfg: dict[str, Any], wid: int) -> None:
        super().__init__(asyncio.get_running_loop(), parse_uri(cfg["ws_url"]), cfg)
        self.conn = conn
        self.cfg = cfg
        self.wid = wid
        self.ssl = ssl_context(cfg["tls"])
        self.cmds: asyncio.Queue[pipe.Command] = asyncio.Queue()
        self.clients: list[Client] = []
        self.stalled: list[Client] = []
        self.done_sent = False
        self.wire_at_ready = 0
        self._churns: set[asyncio.Task[None]] = set()
        self._churn_next = 0  # the next client to churn (round robin)
        self.churned = 0  # clients reconnected and resumed by --churn
        self.churn_failed = 0

    # plumbing ------------------------------------------------------------------
    def send(self, msg: pipe.Answer) -> None:
        """Send ``msg`` to the coordinator (dropped when the pipe is gone)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(msg)

    def _on_pipe(self) -> None:
        try:
            while self.conn.poll():
                self.cmds.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.cmds.put_nowait(pipe.Exit())

    def notify_done(self) -> None:
        """Tell the coordinator (once) that every expected delivery arrived."""
        if not self.done_sent:
            self.done_sent = True
            self.send(pipe.Done(self.last_ns))

    # run -----------------------------------------------------------------------
    async def run(self) -> None:
        """Create the clients, then obey the coordinator's commands until ``exit``.

        On the way out every client is closed (at most the ``exit`` command's
        seconds) and :class:`~pushsvc.bench.messages.Bye` is sent.
        """
        cfg = self.cfg
        add_pipe_reader(self.loop, self.conn, self._on_pipe)
        watchdog = asyncio.ensure_future(self._watchdog())
        procs = cfg["procs"]
        gids = range(self.wid, cfg["clients"] + cfg["stall"], procs)
        for gid in gids:
            token = client_token(cfg, gid)
            client = self._client(gid, token, stalled=gid >= cfg["clients"])
            (self.stalled if client.stalled else self.clients).append(client)
        self.send(pipe.Up())
        progress = asyncio.ensure_future(self._progress())
        close_s = 0.5
        try:
            while True:
                cmd = await self.cmds.get()
                if isinstance(cmd, pipe.Connect):
                    await self._connect_all(until=cmd.until)
                elif isinstance(cmd, pipe.Mark):
                    self.send(pipe.Marked(app=self.app_pings, protocol=self.ws_pings))
                elif isinstance(cmd, pipe.Published):
                    self._arm(cmd.per_channel)
                elif isinstance(cmd, pipe.Stop):
                    await self._stop(drain_s=cmd.drain_s)
                elif isinstance(cmd, pipe.Close):
                    await self._close(self.clients, cmd.wait_s)
                    self.send(pipe.Closed())
                elif isinstance(cmd, pipe.Reconnect):
                    await self._reconnect(until=cmd.until)
                elif isinstance(cmd, pipe.Churn):
                    self._churns.add(task := asyncio.ensure_future(self._churn(cmd.fraction)))
                    task.add_done_callback(self._churns.discard)
                elif isinstance(cmd, pipe.Exit):
                    close_s = cmd.close_s
                    break
        finally:
            progress.cancel()
            closes_before = sum(self.closes.values())
            await self._close(self.clients + self.stalled, close_s)
            extra = sum(self.closes.values()) - closes_before
            self.send(pipe.Bye(cpu_seconds(), extra))
            watchdog.cancel()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.conn.fileno())

    def _client(self, gid: int, token: str, stalled: bool) -> Client:
        """A client of the run's transport (``--transport``: ws, sse or stream)."""
        kind = self.cfg.get("transport", "ws")
        if kind == "ws":
            return Client(self, gid, token, stalled=stalled)
        return StreamClient(self, gid, token, stalled, kind)

    async def _watchdog(self) -> None:
        """Exit by ourselves at the hard deadline or when the coordinator is gone."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(0.5)
            if time.monotonic() >= self.cfg["hard_deadline"] or os.getppid() != parent:
                os._exit(3)

    async def _progress(self) -> None:
        while True:
            self.send(
                pipe.Progress(
                    self.subscribed, self.failed, self.delivered, self.unique, self.errors
                )
            )
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _setup(self, client: Client, start_at: float, until: float) -> bool:
        """Connect, authenticate and subscribe ``client`` no sooner than ``start_at``.

        Times are monotonic seconds; one client gets at most SETUP_TIMEOUT s, and
        nothing goes on past ``until``.
        """
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cfg = self.cfg
        loop = self.loop
        try:
            async with asyncio.timeout(max(0.01, min(SETUP_TIMEOUT, until - time.monotonic()))):
                sources = cfg["source_addresses"]
                if sources:
                    sock = await self._bound_socket(sources[client.gid % len(sources)])
                    await loop.create_connection(
                        lambda: client,
                        sock=sock,
                        ssl=self.ssl,
                        server_hostname=cfg["host"] if self.ssl else None,
                    )
                else:
                    await loop.create_connection(
                        lambda: client,
                        cfg["host"],
                        cfg["port"],
                        ssl=self.ssl,
                        server_hostname=cfg["host"] if self.ssl else None,
                    )
                await client.waiter  # handshake response (a stream: its "subscribed")
                if isinstance(client, StreamClient):
                    raise _Ready
                welcome = client.expect("welcome")
                client.send_obj({"op": "auth", "token": client.token})
                await welcome
                subscribed = client.expect("subscribed")
                sub: dict[str, Any] = {"op": "subscribe", "channel": client.channel}
                if client.since is not None:
                    sub["since"] = client.since
                client.send_obj(sub)
                await subscribed
        except _Ready:
            pass
        except Exception as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            self.error(f"client {client.gid}: setup failed: {reason}")
            self.failed += 1
            client.abort()
            return False
        self.subscribed += 1
        self.last_ready_ns = time.time_ns()
        if client.stalled and client.transport is not None:
            client.transport.pause_reading()
        return True

    async def _bound_socket(self, source: str) -> socket.socket:
        """A TCP socket from ``source`` (an IPv4 address), connected to the server.

        ``IP_BIND_ADDRESS_NO_PORT`` defers the port choice to ``connect()``, so a
        source address's ephemeral ports are shared by every destination instead
        of each bind() taking one for good (ip(7)).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            await self.loop.sock_connect(sock, (self.cfg["host"], self.cfg["port"]))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _connect_all(self, until: float) -> None:
        cfg = self.cfg
        everyone = [c for pair in zip(self.clients, self.stalled, strict=False) for c in pair]
        everyone += self.clients[len(self.stalled) :] + self.stalled[len(self.clients) :]
        rate = cfg["connect_rate"] / cfg["procs"] if cfg["connect_rate"] > 0 else 0.0
        start = time.monotonic()
        oks = await asyncio.gather(
            *(
                self._setup(c, start + (k / rate if rate else 0.0), until)
                for k, c in enumerate(everyone)
            )
        )
        ready = [c for c, ok in zip(everyone, oks, strict=True) if ok]
        self.clients = [c for c in ready if not c.stalled]
        self.stalled = [c for c in ready if c.stalled]
        per_channel = [0] * self.n_channels
        for c in self.clients:
            per_channel[c.chan] += 1
        self.wire_at_ready = self.wire_bytes  # what the handshakes and answers took
        gc.collect()
        gc.freeze()  # the clients live until the end: keep them out of GC passes
        self.send(
            pipe.Ready(
                clients=len(self.clients),
                stalled=len(self.stalled),
                failed=self.failed,
                last_ready_ns=self.last_ready_ns,
                per_channel=per_channel,
            )
        )

    def _arm(self, per_channel: list[int]) -> None:
        self.expected = sum(per_channel[c.chan] for c in self.clients)
        self.armed = True
        if self.unique >= self.expected:
            self.notify_done()

    async def _stop(self, drain_s: float) -> None:
        """Freeze the counters, drain stalled clients, send the results."""
        for c in self.clients:
            c.counting = False
        self.fold()
        stats = {
            "delivered": self.delivered,
            "frames": self.frames,
            "wire_bytes": self.wire_bytes - self.wire_at_ready,
            "unique": self.unique,
            "expected": self.expected,
            "dups": self.dups,
            "last_ns": self.last_ns,
            "lat": self.lat_done.tobytes(),
            "stride": self.stride,
            "lat_max": self.lat_max,
            "closes": dict(self.closes),
            "churned": self.churned,
            "churn_failed": self.churn_failed,
            "msg_lat": self.msg_lat.tobytes() if self.msg_lat is not None else b"",
        }
        self.lat_done = array.array("q")
        if self.stalled:
            for c in self.stalled:
                c.discard = True
                if c.transport is not None and not c.transport.is_closing():
                    c.transport.resume_reading()
            await _wait_lost(self.stalled, drain_s)
        stats["stall_codes"] = dict(self.stall_codes)
        stats["stalled_open"] = sum(1 for c in self.stalled if not c.lost.done())
        stats["errors"] = self.errors
        stats["error_samples"] = self.error_samples
        self.send(pipe.Result(stats))

    async def _close(self, clients: list[Client], wait_s: float) -> None:
        live = [c for c in clients if not c.lost.done()]
        for c in live:
            c.close()
        await _wait_lost(live, wait_s)
        for c in live:
            if not c.lost.done():
                c.abort()

    async def _churn(self, fraction: float) -> None:
        """Reconnect ``fraction`` of the normal clients (round robin), each resuming.

        The old connection's counters pass to the new one, which subscribes with
        ``since`` = the last seq counted: the replay brings what it missed, and the
        run's unique/duplicate accounting shows whether anything was lost or twice.
        """
        clients = self.clients
        count = min(len(clients), round(len(clients) * fraction))
        start = self._churn_next
        picked = [(start + k) % len(clients) for k in range(count)] if clients else []
        self._churn_next = (start + count) % max(1, len(clients))
        until = self.cfg["hard_deadline"]

        async def one(index: int) -> None:
            old = clients[index]
            old.counting = False  # from here its deliveries count on the new connection
            new = self._client(old.gid, old.token, stalled=False)
            new.next_i, new.early, new.unique = old.next_i, old.early, old.unique
            new.since = new.last_seq = old.last_seq
            old.close()
            await _wait_lost([old], 2.0)
            if not old.lost.done():
                old.abort()
            self.subscribed -= 1
            clients[index] = new
            if await self._setup(new, time.monotonic(), until):
                self.churned += 1
            else:
                self.churn_failed += 1

        await asyncio.gather(*(one(i) for i in picked))

    async def _reconnect(self, until: float) -> None:
        """Reconnect every (normal) client at once with its token, report errors and end time."""
        errors_before, failed_before = self.errors, self.failed
        self.error_samples = []  # the run's samples went out with the results
        self.subscribed -= len(self.clients)
        self.last_ready_ns = 0
        fresh = [self._client(c.gid, c.token, stalled=False) for c in self.clients]
        for c in fresh:
            c.counting = False
        start = time.monotonic()
        oks = await asyncio.gather(*(self._setup(c, start, until) for c in fresh))
        self.clients = fresh
        self.send(
            pipe.Reconnected(
                ok=sum(oks),
                failed=self.failed - failed_before,
                errors=self.errors - errors_before,
                last_ready_ns=self.last_ready_ns,
                error_samples=self.error_samples,
            )
        )


class _Ready(Exception):
    """A stream client is set up by its request alone (token and channel in it)."""


async def _wait_lost(clients: Iterable[Client], wait_s: float) -> None:
    """Wait up to ``wait_s`` seconds for the connections of ``clients`` to be gone."""
    futs = [c.lost for c in clients if not c.lost.done()]
    if futs:
        await asyncio.wait(futs, timeout=wait_s)


def worker_entry(conn: Any, cfg: dict[str, Any], wid: int, close_fds: list[int]) -> None:
    """Process entry point of one worker (fork or spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:  # the coordinator's pipe ends inherited through fork
        with contextlib.suppress(OSError):
            os.close(fd)
    raise_nofile_limit()

    async def run() -> None:
        await Worker(conn, cfg, wid).run()

    run_loop(run())
