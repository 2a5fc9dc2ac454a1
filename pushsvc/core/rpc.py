"""Client RPC: the ``rpc`` command, answered by any NATS service on ``<prefix>-rpc.<method>``.

A client sends ``{"op":"rpc","method":M,"data":D,"id":N}``; the node checks the
method's grammar (the channel grammar: dot-separated tokens, no wildcards) and
the token's ``rpc`` grants (NATS wildcard patterns over method names), then
sends ``D`` (as JSON) as a NATS request to ``<prefix>-rpc.<M>`` with headers
naming the caller, stamped by the server (never by the client):

- ``Pushsvc-User``: the token's ``sub``;
- ``Pushsvc-Client``: the connection's client id (``welcome.client``);
- ``Pushsvc-Node``: the node serving it (``PUSHSVC_NODE_NAME``);
- ``Pushsvc-Info``: the token's ``info`` claim (compact JSON), when it has one.

The service's reply body becomes ``{"type":"rpc_result","id":N,"data":...}``
(:func:`~pushsvc.protocol.payload_to_data`: JSON as is, text as a string, other
bytes base64). A reply with the header ``Pushsvc-Error: <code>`` becomes
``{"type":"error","code":<code>,"message":<body as text>,"id":N}`` instead.
Refusals (``error`` with the command's ``id``): ``bad_request`` (method
grammar), ``forbidden`` (no grant), ``limit_exceeded`` (more than
:data:`MAX_IN_FLIGHT` calls in flight on the connection), ``not_found`` (no
service subscribed: NATS's no-responders answer), ``unavailable`` (no reply
within ``PUSHSVC_RPC_TIMEOUT`` s, or NATS away or refusing the request),
``too_large`` (the result does not fit ``PUSHSVC_MAX_FRAME_BYTES``).

The request goes through the bus's request/reply (:mod:`pushsvc.bus.requests`,
shared with the server API); the subject rule is :func:`rpc_subject`.

Calls run as tasks of their own (:class:`Calls`), so a slow service never holds
up the connection's other commands or its heartbeat; every call costs one
command token like any command (charged by the client before it gets here).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from typing import Any, Final, Protocol

from .. import metrics
from ..auth.tokens import Principal
from ..bus import NoResponders, RequestTimeout, Unavailable
from ..channels import InvalidChannel, validate_channel
from ..config.settings import Settings
from ..protocol import (
    BAD_REQUEST,
    CLIENT_HEADER,
    FORBIDDEN,
    INFO_HEADER,
    LIMIT_EXCEEDED,
    NODE_HEADER,
    NOT_FOUND,
    TOO_LARGE,
    UNAVAILABLE,
    USER_HEADER,
    Rpc,
    RpcResult,
    encode_frame,
    payload_to_data,
)
from .hub import Hub

log = logging.getLogger("pushsvc.core.rpc")

MAX_IN_FLIGHT: Final = 16  # RPC calls one connection may have waiting for replies
MAX_ERROR_MESSAGE: Final = 1024  # characters of a service's error message passed on
MAX_METHOD_LABELS: Final = 1000  # distinct ``method`` label values; beyond: ``_other``
#: a service's ``Pushsvc-Error`` code: 1..64 of ``[A-Za-z0-9_.-]``; else :data:`SERVICE_ERROR`
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SERVICE_ERROR: Final = "error"


_labels: set[str] = set()


class Calls:
    """One connection's RPC calls in flight: tasks kept referenced, cancelled at close."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task until it ends or :meth:`cancel` (asyncio keeps only
        weak references to tasks: the set holds them)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """Cancel every call in flight (the connection closed: nobody reads the answers)."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()


class Caller(Protocol):
    """What an RPC call needs of a connection (:class:`~pushsvc.core.client.Client`)."""

    id: str
    principal: Principal
    closed: bool
    hub: Hub
    settings: Settings
    calls: Calls

    def send(self, frame: str, nbytes: int) -> None: ...
    def refuse(self, code: str, message: str, req_id: object, *, charge: bool = False) -> None: ...


def caller_headers(conn: Caller) -> dict[str, str]:
    """The NATS headers naming the caller of an RPC (see the module docs)."""
    principal = conn.principal
    headers = {
        USER_HEADER: principal.sub,
        CLIENT_HEADER: conn.id,
        NODE_HEADER: conn.settings.node_name or "",
    }
    if principal.info is not None:
        headers[INFO_HEADER] = principal.info.decode()
    return headers


def rpc_subject(prefix: str, method: str) -> str:
    """The NATS subject of RPC ``method``: ``<prefix>-rpc.<method>`` (``push-rpc.orders.get``)."""
    return f"{prefix}-rpc.{method}"


def method_label(method: str) -> str:
    """The ``method`` metrics label: the method, or ``_other`` past :data:`MAX_METHOD_LABELS`."""
    if method in _labels:
        return method
    if len(_labels) >= MAX_METHOD_LABELS:
        return "_other"
    _labels.add(method)
    return method


def rpc(conn: Caller, cmd: Rpc) -> None:
    """``rpc``: check the method, the grant and the in-flight cap, then start the call.

    Returns at once; the answer (``rpc_result`` or ``error``) comes from the
    call's task (:func:`call`).
    """
    try:
        method = validate_channel(cmd.method)
    except InvalidChannel:
        _refused(conn, cmd, BAD_REQUEST, "method must be dot-separated tokens of [A-Za-z0-9_-]")
        return
    if not conn.principal.can_call(method):
        _refused(conn, cmd, FORBIDDEN, f"not allowed to call {method}")
        return
    if len(conn.calls) >= MAX_IN_FLIGHT:
        _refused(conn, cmd, LIMIT_EXCEEDED, f"at most {MAX_IN_FLIGHT} rpc calls in flight")
        return
    conn.calls.start(call(conn, cmd, method))


def _refused(conn: Caller, cmd: Rpc, code: str, message: str) -> None:
    metrics.RPC_CALLS.labels("-", code).inc()
    conn.refuse(code, message, cmd.id)


async def call(conn: Caller, cmd: Rpc, method: str) -> None:
    """Send the request, wait for the reply (``PUSHSVC_RPC_TIMEOUT`` s), answer the client."""
    settings = conn.settings
    started = time.monotonic()
    try:
        reply = await conn.hub.bus.requests.request(
            rpc_subject(settings.subject_prefix, method),
            bytes(cmd.data),
            timeout=settings.rpc_timeout,
            headers=caller_headers(conn),
        )
    except NoResponders:
        _refused(conn, cmd, NOT_FOUND, f"no service answers {method}")
        return
    except RequestTimeout:
        metrics.RPC_CALLS.labels(method_label(method), "timeout").inc()
        conn.refuse(UNAVAILABLE, f"{method} did not answer in time", cmd.id)
        return
    except Unavailable as exc:
        _refused(conn, cmd, UNAVAILABLE, str(exc))
        return
    label = method_label(method)
    metrics.RPC_LATENCY.labels(label).observe(time.monotonic() - started)
    if conn.closed:
        return
    code = reply.error
    if code is not None:
        code = code.strip()
        if _ERROR_CODE.fullmatch(code) is None:
            code = SERVICE_ERROR
        metrics.RPC_CALLS.labels(label, "error").inc()
        text = reply.data.decode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
        conn.refuse(code, text or code, cmd.id)
        return
    data, encoding = payload_to_data(reply.data)
    raw = encode_frame(RpcResult(id=cmd.id, data=data, encoding=encoding))
    if len(raw) > settings.max_frame_bytes:
        metrics.RPC_CALLS.labels(label, TOO_LARGE).inc()
        limit = settings.max_frame_bytes
        conn.refuse(TOO_LARGE, f"the reply of {method} is larger than {limit} bytes", cmd.id)
        return
    metrics.RPC_CALLS.labels(label, "ok").inc()
    conn.send(raw.decode(), len(raw))
