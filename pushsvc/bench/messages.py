"""The messages between the bench coordinator and its workers, one Struct per kind.

They travel over a ``multiprocessing`` pipe (pickled; msgspec Structs pickle by
field), so both ends name every field instead of indexing tuples. Times are
monotonic seconds (``until``, deadlines) or ``time.time_ns()`` nanoseconds
(``*_ns``), durations seconds.

Coordinator -> worker: :class:`Connect`, :class:`Published`, :class:`Stop`,
:class:`Close`, :class:`Reconnect`, :class:`Churn`, :class:`Mark`, :class:`Exit`.
Worker -> coordinator: :class:`Up`, :class:`Progress`, :class:`Ready`, :class:`Marked`,
:class:`Done`, :class:`Result`, :class:`Closed`, :class:`Reconnected`, :class:`Bye`.
"""

from __future__ import annotations

from typing import Any

import msgspec

# --- coordinator -> worker -------------------------------------------------------------


class Connect(msgspec.Struct):
    """Connect, authenticate and subscribe every client; nothing goes on past ``until``
    (monotonic seconds). Answered :class:`Ready`."""

    until: float


class Published(msgspec.Struct):
    """Everything is published: ``per_channel[c]`` messages went to channel ``c``. The
    worker answers :class:`Done` once its clients have all of them."""

    per_channel: list[int]


class Stop(msgspec.Struct):
    """Freeze the counters, drain the stalled clients for ``drain_s`` seconds at most.
    Answered :class:`Result`."""

    drain_s: float


class Close(msgspec.Struct):
    """Close the normal clients, waiting ``wait_s`` seconds at most. Answered :class:`Closed`."""

    wait_s: float


class Reconnect(msgspec.Struct):
    """Reconnect every normal client at once, nothing past ``until`` (monotonic seconds).
    Answered :class:`Reconnected`."""

    until: float


class Churn(msgspec.Struct):
    """Reconnect ``fraction`` of the normal clients now, each resuming from its last
    seq (``subscribe`` with ``since``). Not answered: counts come with the results."""

    fraction: float


class Mark(msgspec.Struct):
    """Report the heartbeats received so far. Answered :class:`Marked`."""


class Exit(msgspec.Struct):
    """Close every client (``close_s`` seconds at most) and exit. Answered :class:`Bye`."""

    close_s: float = 0.5


Command = Connect | Mark | Published | Stop | Close | Reconnect | Churn | Exit

# --- worker -> coordinator -------------------------------------------------------------


class Up(msgspec.Struct):
    """The worker runs and has built its clients."""


class Progress(msgspec.Struct):
    """Counters so far (every ``PROGRESS_INTERVAL`` seconds, for ``--progress``)."""

    subscribed: int
    failed: int
    delivered: int
    unique: int
    errors: int


class Ready(msgspec.Struct):
    """Answer to :class:`Connect`.

    Attributes:
        clients / stalled: normal and ``--stall`` clients subscribed.
        failed: clients whose setup failed.
        last_ready_ns: when the last client got ``subscribed`` (0: none).
        per_channel: subscribed normal clients per channel index.
    """

    clients: int
    stalled: int
    failed: int
    last_ready_ns: int
    per_channel: list[int]


class Marked(msgspec.Struct):
    """Heartbeats the worker's clients received so far: pushsvc ``ping`` frames
    (``app``) and RFC 6455 ping frames (``protocol``)."""

    app: int
    protocol: int


class Done(msgspec.Struct):
    """Every expected delivery arrived; the last at ``last_ns``."""

    last_ns: int


class Result(msgspec.Struct):
    """Answer to :class:`Stop`: the worker's statistics (keys read by the coordinator
    and :func:`pushsvc.bench.report.latency_ms`: ``delivered``, ``lat``, ``stride``...)."""

    stats: dict[str, Any]


class Closed(msgspec.Struct):
    """Answer to :class:`Close`."""


class Reconnected(msgspec.Struct):
    """Answer to :class:`Reconnect`.

    Attributes:
        ok: clients subscribed again.
        failed / errors: setups failed and errors counted during the storm.
        last_ready_ns: when the last client got ``subscribed`` again (0: none).
        error_samples: a few error messages.
    """

    ok: int
    failed: int
    errors: int
    last_ready_ns: int
    error_samples: list[str]


class Bye(msgspec.Struct):
    """Answer to :class:`Exit`: the worker's CPU seconds and the closes it saw while closing."""

    cpu_s: float
    closes: int


class Dead(msgspec.Struct):
    """Not sent: put in a worker's inbox by the coordinator when its pipe broke."""


Answer = Up | Progress | Ready | Marked | Done | Result | Closed | Reconnected | Bye | Dead
