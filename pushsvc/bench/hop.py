"""The NATS hop of a bench run: publish -> a plain NATS subscriber of the subject pushsvc reads.

Every pushsvc latency includes it and the floor (:mod:`pushsvc.bench.floor`), which
has no NATS, does not: :mod:`pushsvc.bench.vsfloor` prints it beside the ratios.
"""

from __future__ import annotations

import array
import time
from typing import Any

import msgspec


class _Stamp(msgspec.Struct):
    t: int


_decode_stamp = msgspec.json.Decoder(_Stamp).decode


class HopProbe:
    """The NATS hop: publish -> a plain NATS subscriber of the subject pushsvc reads.

    ``--via nats`` at a set ``--rate``: the publisher's connection also subscribes
    to ``<prefix>-live.bench.>`` (the stream's RePublish destination, what pushsvc
    reads with history on) and ``<prefix>.bench.>`` (what it reads with history
    off), and stamps each message's arrival. The hop is a share of every pushsvc
    latency that no fan-out can remove, and the floor (which has no NATS) does not
    pay: :mod:`pushsvc.bench.vsfloor` prints it beside the ratios.
    """

    def __init__(self, prefix: str) -> None:
        self.subjects = {"live": f"{prefix}-live.bench.>", "direct": f"{prefix}.bench.>"}
        self.lat: dict[str, array.array[int]] = {k: array.array("q") for k in self.subjects}
        self.subs: list[Any] = []

    async def start(self, nc: Any) -> None:
        """Subscribe on ``nc`` and wait until the server has the interest (a flush)."""
        for kind, subject in self.subjects.items():
            self.subs.append(await nc.subscribe(subject, cb=self._callback(kind)))
        await nc.flush(timeout=5)

    def _callback(self, kind: str) -> Any:
        lat = self.lat[kind]

        async def cb(msg: Any) -> None:
            now = time.time_ns()
            try:
                lat.append(now - _decode_stamp(msg.data).t)
            except msgspec.DecodeError:  # a foreign message on the subject
                pass

        return cb

    def result(self) -> dict[str, Any] | None:
        """``{"subject", "messages", "p50", "p99"}`` (ms) of the live subject if it got
        any message, else of the direct one; None if neither did."""
        for kind in ("live", "direct"):
            lat = sorted(self.lat[kind])
            if lat:
                n = len(lat)
                return {
                    "subject": self.subjects[kind],
                    "messages": n,
                    "p50": round(lat[n // 2] / 1e6, 3),
                    "p99": round(lat[min(n - 1, int(0.99 * n))] / 1e6, 3),
                }
        return None
