"""The NATS side of a node: :class:`Bus` and the parts it is made of.

The bus never touches sockets. It hands every live message to one callback,
``on_message(channel, payload, seq, stamp, headers)``, which ``app.py`` wires to the hub.

Subjects (``prefix`` = ``PUSHSVC_SUBJECT_PREFIX``, default ``push``):

- producers publish to ``<prefix>.<channel>``;
- with history on, the JetStream stream (``PUSHSVC_STREAM``) captures
  ``<prefix>.>`` and *republishes* every stored message to
  ``<prefix>-live.<channel>`` with the headers ``Nats-Sequence`` and
  ``Nats-Subject`` (NATS docs, "Streams: RePublish"). Nodes subscribe to the
  republished subjects, so even plain core publishes arrive with a stream
  sequence, and duplicates by ``Nats-Msg-Id`` are never republished;
- with history off (``PUSHSVC_HISTORY_TTL=0`` or no JetStream) nodes subscribe to
  ``<prefix>.<channel>`` directly and messages carry no sequence;
- revocations arrive on ``<prefix>-control.disconnect``;
- channel events (join/leave) travel on ``<prefix>-joinleave.<channel>`` (core NATS,
  never stored), one refcounted subscription per channel with local subscribers
  where they are on (:meth:`Bus.acquire_events`);
- presence and revocations live in JetStream KV buckets (:meth:`Bus.key_value`).

Interest-based: a node holds one NATS subscription per channel with at least one
local subscriber; :meth:`Bus.release` of the last one unsubscribes.

Modules, one concept each:

- ``core``: :class:`Bus`, the one object the node talks to (start, resume after
  a reconnect, close) composed of the parts below;
- ``connection``: the NATS connection and the state the parts share, :func:`confirm`;
- ``stream``: the history stream's set-up, checks and epoch (:func:`epoch_of`);
- ``subscriptions``: refcounted live subscriptions, the delivery hot path;
- ``publish``: publishing into a channel;
- ``reads``: history reads (:class:`History`, :class:`StoredMessage`);
- ``kv``: JetStream KV buckets (presence, revocations);
- ``events``: channel events (join/leave);
- ``lifecycle``: lifecycle events (``<prefix>-events.<type>``), their stream, expiry markers;
- ``requests``: NATS request/reply (serve a subject, request, scatter-gather);
- ``errors``: :class:`Unavailable`, :class:`StreamConfigError`.
"""

from .connection import Connection, confirm
from .core import Bus, ControlHandler, ResumeHandler
from .errors import StreamConfigError, Unavailable
from .events import EventHandler
from .natsconn import connect_failure
from .reads import History, StoredMessage
from .requests import (
    ERROR_HEADER,
    Handler,
    NoResponders,
    Reply,
    Request,
    RequestTimeout,
    Responder,
    request_once,
)
from .stream import epoch_of, stream_time
from .subscriptions import Headers, MessageHandler, PatternHandler

__all__ = [
    "ERROR_HEADER",
    "Bus",
    "Connection",
    "ControlHandler",
    "EventHandler",
    "Handler",
    "Headers",
    "History",
    "MessageHandler",
    "NoResponders",
    "PatternHandler",
    "Reply",
    "Request",
    "RequestTimeout",
    "Responder",
    "ResumeHandler",
    "StoredMessage",
    "StreamConfigError",
    "Unavailable",
    "confirm",
    "connect_failure",
    "epoch_of",
    "request_once",
    "stream_time",
]
