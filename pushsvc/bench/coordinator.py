"""The bench coordinator: spawns the workers, publishes, gathers results, builds the report.

A run goes through phases, each bounded by ``--duration-limit``: workers start
(``up``), connect + authenticate + subscribe every client (``ready``), the
publisher sends every message, the workers count deliveries until all arrived
or ``--timeout`` seconds after the last publish, results come back, then the
optional ``--reconnect`` storm, then every process exits. With a server pid,
the server's CPU and RSS are sampled from /proc before, after the deliveries
and at the end.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from typing import Any, TypeVar

from ..config import nats as natsconn
from . import messages as pipe
from .client import ERROR_SAMPLES
from .options import BenchError
from .publishers import Publisher, PublishResult
from .report import latency_ms
from .system import add_pipe_reader, cpu_seconds, open_files, run_loop, server_sample
from .tokens import emitters
from .worker import worker_entry

A = TypeVar("A", bound=pipe.Answer)


class Coordinator:
    """Spawns the workers, publishes, gathers the results and builds the report."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg["duration_limit"]
        # connecting, publishing and waiting for deliveries end at work_deadline; the
        # reserve is for results, stalled clients, the reconnect storm and closing
        self.reserve = min(8.0, 0.25 * cfg["duration_limit"])
        self.work_deadline = self.deadline - self.reserve
        cfg["hard_deadline"] = self.deadline + 3.0  # workers exit by themselves then
        self.progress: dict[int, pipe.Progress] = {}
        self.done: dict[int, int] = {}
        self.dead: set[int] = set()
        self.expected_total = 0
        self.phase = "starting"
        self.server_before: dict[str, float] | None = None
        self.server_ready: dict[str, float] | None = None  # sampled once every client is ready
        self.server_pub: dict[str, float] | None = None  # sampled right before the publish
        self.idle_cpu_per_s: float | None = None  # server CPU s/s in the --idle phase
        # set by _run, inside the event loop
        self.loop: asyncio.AbstractEventLoop
        self.inbox: list[asyncio.Queue[pipe.Answer]] = []
        self.all_done: asyncio.Event

    # processes ------------------------------------------------------------------
    def _spawn(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        method = "fork" if "fork" in methods else "spawn"
        ctx = multiprocessing.get_context(method)
        for wid in range(self.cfg["procs"]):
            parent_end, child_end = ctx.Pipe(duplex=True)
            self.conns.append(parent_end)
            close_fds = [c.fileno() for c in self.conns] if method == "fork" else []
            proc = ctx.Process(
                target=worker_entry,
                args=(child_end, self.cfg, wid, close_fds),
                name=f"pushsvc-bench-{wid}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self.procs.append(proc)

    def kill_workers(self) -> None:
        """Kill the workers this coordinator started (by their process objects)."""
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    proc.kill()

    def reap_workers(self) -> None:
        """Wait briefly for the workers to exit, kill the stragglers, close the pipes."""
        end = time.monotonic() + 3.0
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))
        self.kill_workers()
        for proc in self.procs:
            proc.join(1.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()

    # messages ---------------------------------------------------------------------
    def _broadcast(self, msg: pipe.Command) -> None:
        for wid, conn in enumerate(self.conns):
            if wid not in self.dead:
                try:
                    conn.send(msg)
                except (OSError, ValueError):
                    self._mark_dead(wid)

    def _mark_dead(self, wid: int) -> None:
        if wid not in self.dead:
            self.dead.add(wid)
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.conns[wid].fileno())
            self.inbox[wid].put_nowait(pipe.Dead())
            self._check_done()

    def _on_pipe(self, wid: int) -> None:
        conn = self.conns[wid]
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, pipe.Progress):
                    self.progress[wid] = msg
                elif isinstance(msg, pipe.Done):
                    self.done[wid] = msg.last_ns
                    self._check_done()
                else:
                    self.inbox[wid].put_nowait(msg)
        except (EOFError, OSError):
            self._mark_dead(wid)

    def _check_done(self) -> None:
        if self.phase == "delivering" and all(
            w in self.done or w in self.dead for w in range(len(self.conns))
        ):
            self.all_done.set()

    async def _collect(self, kind: type[A], wait_s: float) -> dict[int, A]:
        """Wait until every live worker sent a ``kind`` message (at most ``wait_s`` seconds).

        Returns:
            worker id -> its message, for the workers that sent one in time.
        """
        end = self.loop.time() + max(0.0, wait_s)
        out: dict[int, A] = {}
        for wid in range(len(self.conns)):
            queue = self.inbox[wid]
            while True:
                if queue.empty():  # a dead worker's last messages are still read
                    left = end - self.loop.time()
                    if wid in self.dead or left <= 0:
                        break
                    try:
                        msg = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    msg = queue.get_nowait()
                if isinstance(msg, kind):
                    out[wid] = msg
                    break
        return out

    def _left(self, deadline: float, minimum: float = 0.0) -> float:
        """Seconds until the monotonic ``deadline``, at least ``minimum``."""
        return max(minimum, deadline - time.monotonic())

    async def _show_progress(self) -> None:
        cfg = self.cfg
        total = cfg["clients"] + cfg["stall"]
        while True:
            await asyncio.sleep(1.0)
            rows = list(self.progress.values())
            sub = sum(r.subscribed for r in rows)
            failed = sum(r.failed for r in rows)
            delivered = sum(r.delivered for r in rows)
            errors = sum(r.errors for r in rows)
            expected = self.expected_total
            print(
                f"[bench {time.monotonic() - self.t0:6.1f}s] {self.phase:<11} "
                f"connected {sub}/{total} failed {failed}  "
                f"delivered {delivered}/{expected}  errors {errors}",
                file=sys.stderr,
                flush=True,
            )

    # run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the whole benchmark; returns the report dict."""
        pid = self.cfg["server_pid"]
        self.server_before = server_sample(pid) if pid else None
        if pid and self.server_before is None:
            raise BenchError(f"cannot read /proc/{pid}: no such process?")
        self._spawn()
        return run_loop(self._run())

    async def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.loop = asyncio.get_running_loop()
        self.inbox = [asyncio.Queue() for _ in self.conns]
        self.all_done = asyncio.Event()
        for wid, conn in enumerate(self.conns):
            add_pipe_reader(self.loop, conn, self._on_pipe, wid)
        progress = asyncio.ensure_future(self._show_progress()) if cfg["progress"] else None
        publisher: Publisher | None = None
        try:
            ups = await self._collect(pipe.Up, self._left(self.work_deadline))
            if len(ups) < len(self.conns):
                raise BenchError("workers did not start in time")
            publisher = Publisher(cfg)
            await publisher.open(self._left(self.work_deadline))
            return await self._phases(publisher)
        finally:
            if progress is not None:
                progress.cancel()
            if publisher is not None:
                await publisher.close()
            self._broadcast(pipe.Exit())

    async def _phases(self, publisher: Publisher) -> dict[str, Any]:
        cfg = self.cfg
        # 1. connect + auth + subscribe
        self.phase = "connecting"
        t_connect = time.time_ns()
        self._broadcast(pipe.Connect(self.work_deadline))
        ready = await self._collect(pipe.Ready, self._left(self.work_deadline))
        if cfg["server_pid"]:
            self.server_ready = server_sample(cfg["server_pid"])
        subscribed = sum(m.clients for m in ready.values())
        stalled_ready = sum(m.stalled for m in ready.values())
        last_ready = max((m.last_ready_ns for m in ready.values()), default=0)
        connect_seconds = max(0.0, (last_ready - t_connect) / 1e9)
        chan_clients = [0] * cfg["channels"]
        for m in ready.values():
            for c, k in enumerate(m.per_channel):
                chan_clients[c] += k
        planned = [len(range(c, cfg["messages"], cfg["channels"])) for c in range(cfg["channels"])]
        self.expected_total = sum(map(int.__mul__, chan_clients, planned))
        idle: dict[str, Any] = {}
        if cfg["idle"] and ready:
            self.phase = "idle"
            idle = await self._idle_phase(subscribed + stalled_ready)
        # 2. publish
        self.phase = "publishing"
        if cfg["server_pid"]:
            self.server_pub = server_sample(cfg["server_pid"])
        pub_start = time.time_ns()
        soak = asyncio.ensure_future(self._soak()) if cfg["churn"] else None
        if subscribed:
            pub = await publisher.publish(self.work_deadline)
        else:
            pub = PublishResult(cfg["channels"])
            pub.error("no client subscribed: nothing published")
        pub_end = time.time_ns()
        samples = await _finish(soak)
        # 3. wait for deliveries
        self.phase = "delivering"
        self.expected_total = sum(map(int.__mul__, chan_clients, pub.per_channel))
        self._broadcast(pipe.Published(pub.per_channel))
        # a publish the duration limit cut still gets a short wait for what is in flight
        grace = min(2.0, 0.25 * self.reserve)
        wait = min(max(self._left(self.work_deadline), grace), cfg["timeout"])
        self._check_done()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), wait)
        cut = _cut(cfg, pub, delivered=self.all_done.is_set(), waited=wait)
        server_mid = server_sample(cfg["server_pid"]) if cfg["server_pid"] else None
        # 4. results
        self.phase = "stopping"
        drain_s = max(0.1, min(2.0, 0.25 * self.reserve))
        self._broadcast(pipe.Stop(drain_s))
        results = await self._collect(
            pipe.Result, self._left(self.deadline - 0.5 * self.reserve, drain_s + 1.0)
        )
        report = self._report_base(connect_seconds, subscribed, pub, pub_start, pub_end, results)
        report["cut"] = cut
        if cut and report["lost"]:
            report["error_samples"].insert(0, _cut_sample(cfg, cut, pub))
        report.update(idle)
        if soak is not None:
            report["churned"] = sum(m.stats["churned"] for m in results.values())
            report["churn_failed"] = sum(m.stats["churn_failed"] for m in results.values())
            report["soak_samples"] = samples
        if cfg["broadcast"]:
            report["broadcast_ms"] = broadcast_ms(results, pub.sent, report["latency_ms"])
            self._broadcast_cpu(report, server_mid, pub_start)
        if publisher.probe is not None:
            report["nats_hop_ms"] = publisher.probe.result()
        if cfg["stall"]:
            codes: Counter[str] = Counter()
            for m in results.values():
                codes.update({str(k): v for k, v in m.stats["stall_codes"].items()})
            report["stalled_closed_codes"] = dict(sorted(codes.items()))
            report["stalled_open"] = sum(m.stats["stalled_open"] for m in results.values())
            report["stalled_subscribed"] = stalled_ready
        # 5. reconnect storm
        if cfg["reconnect"]:
            self.phase = "reconnect"
            await self._reconnect_phase(report)
        # 6. server after, generator CPU
        self.phase = "exiting"
        close_s = min(2.0, self._left(self.deadline, 0.2))
        self._broadcast(pipe.Exit(close_s))
        byes = await self._collect(pipe.Bye, close_s + 1.0)
        extra_closes = sum(m.closes for m in byes.values())
        if extra_closes:
            report["closes_after_stop"] = extra_closes
        cpu = cpu_seconds() + sum(m.cpu_s for m in byes.values())
        missing = [w for w in range(len(self.conns)) if w not in byes]
        report["generator_cpu_s"] = round(cpu, 3)
        if missing:
            report["generator_cpu_incomplete"] = len(missing)
        if cfg["server_pid"]:
            self._server_report(report, server_mid, subscribed + stalled_ready)
        report["elapsed_seconds"] = round(time.monotonic() - self.t0, 3)
        return report

    async def _soak(self) -> list[dict[str, float]]:
        """``--churn``: while publishing, a tenth of the per-minute churn every 6 s; with a
        server pid, its RSS (MiB) and open files every 30 s (the soak's flat lines).

        Returns the samples: {"t": seconds since the publish began, "rss_mib", "fds"}.
        """
        cfg = self.cfg
        pid = cfg["server_pid"]
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        tick = 0
        try:
            while True:
                if pid and tick % 5 == 0 and (now := server_sample(pid)) is not None:
                    samples.append(
                        {
                            "t": round(time.monotonic() - t0, 1),
                            "rss_mib": round(now["rss"] / 1024, 1),
                            "fds": open_files(pid),
                        }
                    )
                await asyncio.sleep(6.0)
                tick += 1
                self._broadcast(pipe.Churn(cfg["churn"] / 100 / 10))
        except asyncio.CancelledError:
            return samples

    async def _idle_phase(self, conns: int) -> dict[str, Any]:
        """``--idle``: nothing published for that many seconds; heartbeats, server CPU and RSS.

        Returns the report keys: idle_seconds, idle_heartbeats {app, protocol,
        per_connection}, and with a server pid server_idle_cpu_pct (of one core),
        server_idle_us_per_heartbeat, server_idle_rss_mib, server_idle_rss_per_conn_kib.
        """
        cfg = self.cfg
        pid = cfg["server_pid"]
        wait_s = min(cfg["idle"], self._left(self.work_deadline))
        self._broadcast(pipe.Mark())
        first = await self._collect(pipe.Marked, 5.0)
        before = server_sample(pid) if pid else None
        t0 = time.monotonic()
        await asyncio.sleep(wait_s)
        after = server_sample(pid) if pid else None
        seconds = time.monotonic() - t0
        self._broadcast(pipe.Mark())
        last = await self._collect(pipe.Marked, 5.0)
        app = sum(m.app for m in last.values()) - sum(m.app for m in first.values())
        proto = sum(m.protocol for m in last.values()) - sum(m.protocol for m in first.values())
        out: dict[str, Any] = {
            "idle_seconds": round(seconds, 3),
            "idle_heartbeats": {
                "app": app,
                "protocol": proto,
                "per_connection": round((app + proto) / conns, 3) if conns else 0.0,
            },
        }
        if before is not None and after is not None and seconds > 0:
            cpu = after["cpu"] - before["cpu"]
            self.idle_cpu_per_s = cpu / seconds
            out["server_idle_cpu_pct"] = round(100 * cpu / seconds, 2)
            if app + proto:
                out["server_idle_us_per_heartbeat"] = round(cpu / (app + proto) * 1e6, 1)
            out["server_idle_rss_mib"] = round(after["rss"] / 1024, 1)
            if self.server_before is not None and conns:
                grown = after["rss"] - self.server_before["rss"]
                out["server_idle_rss_per_conn_kib"] = round(grown / conns, 2)
        return out

    def _broadcast_cpu(
        self, report: dict[str, Any], mid: dict[str, float] | None, pub_start: int
    ) -> None:
        """server_cpu_ms_per_broadcast: server CPU from the first publish to the last
        delivery, per round; ``_net`` also takes off the idle phase's rate over that time."""
        start, rounds = self.server_pub, report["published"]
        if start is None or mid is None or not rounds:
            return
        cpu = mid["cpu"] - start["cpu"]
        report["server_cpu_ms_per_broadcast"] = round(cpu / rounds * 1e3, 2)
        if self.idle_cpu_per_s is not None:
            window = max(0.0, (time.time_ns() - pub_start) / 1e9)
            net = max(0.0, cpu - self.idle_cpu_per_s * window)
            report["server_cpu_ms_per_broadcast_net"] = round(net / rounds * 1e3, 2)

    def _report_base(
        self,
        connect_seconds: float,
        subscribed: int,
        pub: PublishResult,
        pub_start: int,
        pub_end: int,
        results: dict[int, pipe.Result],
    ) -> dict[str, Any]:
        cfg = self.cfg
        stats = [m.stats for m in results.values()]
        delivered = sum(s["delivered"] for s in stats)
        unique = sum(s["unique"] for s in stats)
        expected = self.expected_total  # from the clients that subscribed and what was published
        lost = max(0, expected - unique)
        missing_workers = len(self.conns) - len(results)
        errors = sum(s["errors"] for s in stats) + pub.errors + missing_workers
        failed_clients = cfg["clients"] - subscribed
        samples: list[str] = []
        for s in stats:
            samples.extend(s["error_samples"])
        samples.extend(pub.error_samples)
        if missing_workers:
            samples.append(f"{missing_workers} worker(s) sent no results")
        if cfg["via"] == "nats" and pub.sent and subscribed and not unique:
            samples.insert(
                0,
                f"nothing arrived: is {natsconn.display_url(cfg['nats_url'])} the server's "
                "NATS? (--nats-url; `pushsvc serve` prints its URL)",
            )
        last_ns = max((s["last_ns"] for s in stats), default=0)
        first_ns = pub.first_ns or pub_start
        span = (last_ns - first_ns) / 1e9 if last_ns > first_ns else 0.0
        closes: Counter[str] = Counter()
        for s in stats:
            closes.update({str(k): v for k, v in s["closes"].items()})
        publish_seconds = ((pub.last_ns or pub_end) - first_ns) / 1e9 if pub.sent else 0.0
        report: dict[str, Any] = {
            "clients": cfg["clients"],
            "channels": cfg["channels"],
            "messages": cfg["messages"],
            "size": cfg["size"],
            "via": cfg["via"],
            "tokens": "secret" if cfg["tokens"] is None else "dev",
            "procs": cfg["procs"],
            "subscribed": subscribed,
            "failed_clients": failed_clients,
            "connect_seconds": round(connect_seconds, 3),
            "connect_rate": round(subscribed / connect_seconds, 1) if connect_seconds > 0 else 0.0,
            "published": pub.sent,
            "publish_seconds": round(publish_seconds, 3),
            "publish_errors": pub.errors,
            "publish_throttled": pub.throttled,
            "expected": expected,
            "deliveries": delivered,
            "frames": sum(s["frames"] for s in stats),
            "compression": cfg.get("compression", "off"),
            "wire_bytes": sum(s.get("wire_bytes", 0) for s in stats),
            "wire_bytes_per_delivery": round(
                sum(s.get("wire_bytes", 0) for s in stats) / delivered, 1
            )
            if delivered
            else None,
            "unique": unique,
            "deliveries_per_s": round(delivered / span, 1) if span > 0 else 0.0,
            "latency_ms": latency_ms(stats),
            "lost": lost,
            "duplicated": sum(s["dups"] for s in stats),
            "errors": errors,
            "error_samples": samples[:ERROR_SAMPLES],
            "closes": dict(sorted(closes.items())),
        }
        if cfg["via"] == "emit":
            report["emit_concurrency"] = emitters(cfg)
        return report

    async def _reconnect_phase(self, report: dict[str, Any]) -> None:
        close_s = min(5.0, self._left(self.deadline - 0.5 * self.reserve, 0.2))
        self._broadcast(pipe.Close(close_s))
        closed = await self._collect(pipe.Closed, close_s + 1.0)
        pid = self.cfg["server_pid"]
        cpu_before = server_sample(pid) if pid else None
        until = max(time.monotonic() + 1.0, self.deadline - 0.3 * self.reserve)
        self._broadcast(pipe.Reconnect(until))
        t = time.time_ns()
        done = await self._collect(pipe.Reconnected, self._left(until) + 1.0)
        ok = sum(m.ok for m in done.values())
        cpu_after = server_sample(pid) if pid else None
        if cpu_before is not None and cpu_after is not None and ok:
            # handshake + auth (verified-token cache warm) + subscribe, per connection
            cpu = (cpu_after["cpu"] - cpu_before["cpu"]) / ok
            report["server_cpu_ms_per_reconnect"] = round(cpu * 1e3, 3)
        errors = sum(m.errors for m in done.values())
        errors += len(self.conns) - len(done) + len(self.conns) - len(closed)
        end = max((m.last_ready_ns for m in done.values()), default=0)
        # from the reconnect order to the last client re-authenticated and resubscribed
        report["reconnect_seconds"] = round((end - t) / 1e9, 3) if ok and end > t else None
        report["reconnect_errors"] = errors
        report["reconnected"] = ok
        if errors:
            tail: list[str] = []
            for m in done.values():
                tail.extend(m.error_samples)
            report["reconnect_error_samples"] = tail[:ERROR_SAMPLES]

    def _server_report(
        self, report: dict[str, Any], mid: dict[str, float] | None, conns: int
    ) -> None:
        before = self.server_before
        after = server_sample(self.cfg["server_pid"])
        if before is None:
            return
        end = after or mid
        if end is not None:
            report["server_cpu_s"] = round(end["cpu"] - before["cpu"], 3)
        report["server_rss_mib_before"] = round(before["rss"] / 1024, 1)
        report["server_hwm_mib_before"] = round(before["hwm"] / 1024, 1)
        if mid is not None:
            report["server_rss_mib_after"] = round(mid["rss"] / 1024, 1)
            report["server_hwm_mib_after"] = round(mid["hwm"] / 1024, 1)
            report["server_rss_per_conn_kib"] = (
                round((mid["rss"] - before["rss"]) / conns, 2) if conns else 0.0
            )
        ready = self.server_ready
        if ready is not None and conns:
            # handshake + auth + subscribe of every client (first use of each token)
            cpu = (ready["cpu"] - before["cpu"]) / conns
            report["server_cpu_ms_per_connection"] = round(cpu * 1e3, 3)
        start = self.server_pub or ready
        if start is not None and mid is not None and report["frames"]:
            # publish to last delivery: the delivery path only, handshakes left out
            cpu = (mid["cpu"] - start["cpu"]) / report["frames"]
            report["server_cpu_us_per_frame"] = round(cpu * 1e6, 2)
            if report["deliveries"]:
                per = (mid["cpu"] - start["cpu"]) / report["deliveries"]
                report["server_cpu_us_per_delivery"] = round(per * 1e6, 3)
        report["server_procs"] = int(before["procs"])
        if after is None:
            report["server_exited"] = True


def broadcast_ms(
    results: dict[int, pipe.Result], rounds: int, latency: dict[str, float | None]
) -> dict[str, Any]:
    """``--broadcast``'s figures, in milliseconds.

    Returns:
        {rounds, last_p50, last_max (publish to the last delivery of a round: median
        and worst over rounds), last (per round), p50, p99 (across every connection
        and round)}.
    """
    last = [0] * rounds
    for m in results.values():
        per = array.array("q")
        per.frombytes(m.stats["msg_lat"])
        for i, lat in enumerate(per[:rounds]):
            if lat > last[i]:
                last[i] = lat
    ms = [round(v / 1e6, 3) for v in last if v]
    return {
        "rounds": rounds,
        "last_p50": round(statistics.median(ms), 3) if ms else None,
        "last_max": max(ms) if ms else None,
        "last": ms,
        "p50": latency["p50"],
        "p99": latency["p99"],
    }


def run_bench(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one pushsvc benchmark described by ``cfg`` (from :func:`options.build_config`).

    Returns:
        The report dict (keys in :mod:`pushsvc.bench`).

    Raises:
        BenchError: the run could not go on (NATS unreachable, workers did not start...).
        KeyboardInterrupt: interrupted; the workers are killed first.
    """
    coordinator = Coordinator(cfg)
    try:
        return coordinator.run()
    except (KeyboardInterrupt, BenchError):
        coordinator.kill_workers()
        raise
    finally:
        coordinator.reap_workers()


async def _finish(task: asyncio.Task[list[dict[str, float]]] | None) -> list[dict[str, float]]:
    """Stop the soak task (if any) and return its samples."""
    if task is None:
        return []
    task.cancel()
    return await task


def _cut(cfg: dict[str, Any], pub: PublishResult, *, delivered: bool, waited: float) -> str | None:
    """What ``--duration-limit`` cut short: ``"publish"`` (not every message was
    published), ``"deliveries"`` (the wait for deliveries ended before
    ``--timeout``) or None (the run did all it was asked to)."""
    if pub.sent + pub.errors < cfg["messages"] and not pub.error_samples:
        return "publish"
    if not delivered and waited < cfg["timeout"]:
        return "deliveries"
    return None


def _cut_sample(cfg: dict[str, Any], cut: str, pub: PublishResult) -> str:
    """The error sample of a cut run: missing deliveries may still have been in flight."""
    what = (
        f"the publish after {pub.sent} of {cfg['messages']} messages"
        if cut == "publish"
        else "the wait for deliveries"
    )
    return (
        f"--duration-limit {cfg['duration_limit']:g} s cut {what}: deliveries still in "
        "flight are counted as lost; rerun with a longer --duration-limit"
    )
