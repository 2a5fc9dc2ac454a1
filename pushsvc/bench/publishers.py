"""The bench's publishers: payloads into NATS (``--via nats``) or ``POST /emit`` (``--via emit``).

Each payload is a JSON object padded to ``--size`` bytes::

    {"i": <message index>, "t": <time.time_ns() at publish>, "p": "xxxx..."}

Messages go round-robin over channels ``bench.0..bench.N-1``, at ``--rate`` per
second (0 = as fast as the path takes them). Over HTTP, ``--emit-concurrency``
POSTs are in flight at once, each on its own keep-alive connection
(:mod:`pushsvc.bench.httpclient`, h11) and as its own emit user; a POST
answered 429 is retried after its ``Retry-After`` (at most EMIT_RETRIES
times); with 1, each POST waits for the previous 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from ..bus import natsconn
from ..config.settings import split_servers
from .client import ERROR_SAMPLES
from .hop import HopProbe
from .httpclient import HttpConnection
from .options import BenchError, sample_payload
from .system import ssl_context
from .tokens import emit_token, emitters

EMIT_RETRIES = 3  # retries of one emit answered 429
PUBLISH_BATCH = 100  # messages between event-loop yields (as fast as possible)
PUBLISH_FLUSH = 10_000  # messages between NATS flushes (PING/PONG round trips)


class PublishResult:
    """What the publisher did: counts per channel, error count, first/last send (ns)."""

    def __init__(self, channels: int = 0) -> None:
        self.per_channel = [0] * channels
        self.sent = 0
        self.errors = 0
        self.throttled = 0  # emits answered 429 and retried
        self.error_samples: list[str] = []
        self.first_ns = 0
        self.last_ns = 0

    def error(self, text: str) -> None:
        """Count one publish error; keep its text (300 chars) among the first ERROR_SAMPLES."""
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(text[:300])


def _payload_factory(size: int, sample: bool = False) -> Callable[[int], bytes]:
    """Return ``make(i)``: the padded JSON payload of message ``i``, stamped now (ns).

    With ``sample``: one of :data:`SAMPLE_VARIANTS` versions of the shipped order
    book (:func:`sample_variants`) in turn, with ``"i"`` and ``"t"`` added as its
    first members (``size`` is ignored).
    """
    if sample:
        rests = [v[1:] for v in sample_variants()]  # the members after each "{"
        k = len(rests)

        def make_sample(i: int) -> bytes:
            return b'{"i":%d,"t":%d,%b' % (i, time.time_ns(), rests[i % k])

        return make_sample
    pad = b"x" * (size + 64)

    def make(i: int) -> bytes:
        head = b'{"i":%d,"t":%d,"p":"' % (i, time.time_ns())
        return head + pad[: max(0, size - len(head) - 2)] + b'"}'

    return make


SAMPLE_VARIANTS = 64  # distinct order books a --sample run cycles through


def sample_variants(n: int = SAMPLE_VARIANTS) -> list[bytes]:
    """``n`` versions of the sample order book, as a feed would send them one after another.

    Version ``k`` has the sample's prices, its update ids moved on by ``64 k``
    and every level's quantity drawn again (seeded by ``k``, same format: 8
    decimals, 3-5 significant), so consecutive messages differ as real depth
    updates do and a batch of them does not compress as one book repeated.
    Version 0 is the sample itself.
    """
    base = sample_payload()
    book = json.loads(base)
    out = [base]
    for k in range(1, n):
        rng = random.Random(k)
        variant = dict(book)
        for key in ("U", "u"):
            if isinstance(book.get(key), int):
                variant[key] = book[key] + 64 * k
        for side in ("b", "a"):
            levels = book.get(side)
            if isinstance(levels, list):
                variant[side] = [
                    [price, f"{round(rng.uniform(0.0001, 3.0), rng.choice((3, 4, 5))):.8f}"]
                    for price, _ in levels
                ]
        out.append(json.dumps(variant, separators=(",", ":")).encode())
    return out


class _Pacer:
    """Hands out message indices 0..n-1, no faster than ``rate`` per second (0 = no limit)."""

    def __init__(self, n: int, rate: float, deadline: float) -> None:
        self.n = n
        self.rate = rate
        self.deadline = deadline
        self.next = 0
        self.start = time.monotonic()

    async def take(self) -> int | None:
        """The next index (sleeping until it is due), or None when done or out of time."""
        if self.next >= self.n or time.monotonic() >= self.deadline:
            return None
        i = self.next
        self.next += 1
        if self.rate > 0:
            delay = self.start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return i


class Publisher:
    """Publishes the bench messages through NATS or pushsvc's HTTP emit endpoint."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.nc: Any = None
        self.http: list[tuple[HttpConnection, str]] = []  # (connection, emit token)
        self.probe: HopProbe | None = None

    async def open(self, wait_s: float) -> None:
        """Connect to NATS (``--via nats``) or prepare the emit connections, within wait_s s."""
        cfg = self.cfg
        if cfg["via"] == "nats":
            try:
                self.nc = await natsconn.connect(
                    split_servers(cfg["nats_url"]),
                    cfg["nats_security"],
                    timeout=max(0.5, wait_s),
                    connect_timeout=min(5.0, max(0.5, wait_s)),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # one try per server (0 would mean forever)
                    reconnect_time_wait=0.1,
                    name="pushsvc-bench",
                )
            except (natsconn.NatsRefused, natsconn.NatsUnreachable) as exc:
                raise BenchError(str(exc)) from None
            if cfg["rate"] > 0 and cfg["messages"]:  # at full rate it would slow the publisher
                self.probe = HopProbe(cfg["prefix"])
                await self.probe.start(self.nc)
        else:
            tls = ssl_context(cfg["tls"])
            self.http = [
                (HttpConnection(cfg["host"], cfg["port"], cfg["netloc"], tls), emit_token(cfg, k))
                for k in range(emitters(cfg))
            ]

    async def close(self) -> None:
        """Close the NATS connection / HTTP connections."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2.0)
            self.nc = None
        for conn, _ in self.http:
            conn.close()

    async def publish(self, deadline: float) -> PublishResult:
        """Publish every message (or until the monotonic ``deadline``); returns the counts."""
        if self.cfg["via"] == "nats":
            return await self._publish_nats(deadline)
        return await self._publish_emit(deadline)

    async def _publish_nats(self, deadline: float) -> PublishResult:
        cfg = self.cfg
        nc = self.nc
        channels = cfg["channels"]
        res = PublishResult(channels)
        subjects = [f"{cfg['prefix']}.bench.{c}" for c in range(channels)]
        make = _payload_factory(cfg["size"], cfg.get("sample", False))
        pacer = _Pacer(cfg["messages"], cfg["rate"], deadline)
        publish = nc.publish
        res.first_ns = time.time_ns()
        try:
            if cfg["rate"] > 0:
                while (i := await pacer.take()) is not None:
                    await publish(subjects[i % channels], make(i))
                    res.per_channel[i % channels] += 1
            else:
                n = cfg["messages"]
                for i in range(n):
                    await publish(subjects[i % channels], make(i))
                    res.per_channel[i % channels] += 1
                    if i % PUBLISH_BATCH == PUBLISH_BATCH - 1:
                        if i % PUBLISH_FLUSH == PUBLISH_FLUSH - 1:
                            await nc.flush(timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                        else:
                            await asyncio.sleep(0)
                        if time.monotonic() >= deadline:
                            res.error("publishing stopped at the duration limit")
                            break
            await nc.flush(timeout=5)
        except Exception as exc:
            res.error(f"NATS publish failed: {exc!r}")
        res.last_ns = time.time_ns()
        res.sent = sum(res.per_channel)
        return res

    async def _publish_emit(self, deadline: float) -> PublishResult:
        cfg = self.cfg
        channels = cfg["channels"]
        res = PublishResult(channels)
        make = _payload_factory(cfg["size"], cfg.get("sample", False))
        pacer = _Pacer(cfg["messages"], cfg["rate"], deadline)
        paths = [f"{cfg['base']}/emit/{quote(f'bench.{c}')}" for c in range(channels)]
        res.first_ns = time.time_ns()

        async def sender(conn: HttpConnection, token: str) -> None:
            headers = [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")]
            while (i := await pacer.take()) is not None:
                c = i % channels
                for attempt in range(EMIT_RETRIES + 1):
                    try:
                        status, answer, body = await asyncio.wait_for(
                            conn.request("POST", paths[c], headers, make(i)),
                            max(0.1, deadline - time.monotonic()),
                        )
                    except Exception as exc:
                        res.error(f"emit {i}: {exc!r}")
                        break
                    if 200 <= status < 300:
                        res.per_channel[c] += 1
                        break
                    if status == 429 and attempt < EMIT_RETRIES:
                        res.throttled += 1
                        try:
                            delay = float(answer.get("retry-after", "0.1"))
                        except ValueError:
                            delay = 0.1
                        await asyncio.sleep(min(1.0, max(0.01, delay)))
                        continue
                    res.error(f"emit {i}: HTTP {status} {body[:120]!r}")
                    break

        await asyncio.gather(*(sender(conn, token) for conn, token in self.http))
        res.last_ns = time.time_ns()
        res.sent = sum(res.per_channel)
        if time.monotonic() >= deadline and res.sent + res.errors < cfg["messages"]:
            res.error("publishing stopped at the duration limit")
        return res
