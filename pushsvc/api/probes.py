"""``GET /healthz`` (liveness) and ``GET /readyz`` (readiness): the probes of a node.

Liveness answers 200 ``{"status": "ok", "version"}`` while the process serves
HTTP. Readiness answers :class:`Readiness` with 200 when the node takes traffic
(started, NATS connected, not draining) and 503 otherwise, so a load balancer
(or a Kubernetes readiness probe) stops sending new connections during a drain
or a NATS outage (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from fastapi import APIRouter
from fastapi.responses import Response
from msgspec import Meta

from .._version import __version__
from .errors import json_response
from .openapi import json_body, ref


class Health(msgspec.Struct):
    """Answer of ``GET /healthz``."""

    status: Literal["ok"]
    version: str


class Readiness(msgspec.Struct):
    """Answer of ``GET /readyz`` (200 when ready, 503 otherwise)."""

    ready: bool
    node: Annotated[str, Meta(description="PUSHSVC_NODE_NAME of the node that answered")]
    nats: Annotated[bool, Meta(description="NATS connected")]
    draining: Annotated[bool, Meta(description="shutdown has started")]
    history: Annotated[bool, Meta(description="JetStream history on")]
    connections: Annotated[int, Meta(ge=0, description="open WebSocket sessions on this node")]


def probes_router(readiness: Callable[[], Readiness]) -> APIRouter:
    """Build ``/healthz`` and ``/readyz``.

    Args:
        readiness: returns the node's state now (:meth:`pushsvc.app.Node.readiness`);
            its ``ready`` decides between 200 and 503.
    """
    router = APIRouter()

    @router.get(
        "/healthz",
        operation_id="healthz",
        summary="Liveness",
        response_model=None,
        responses={200: json_body(ref(Health), "Alive")},
    )
    async def healthz() -> Response:
        """Liveness: the process serves HTTP."""
        return json_response(Health("ok", __version__), 200)

    @router.get(
        "/readyz",
        operation_id="readyz",
        summary="Readiness (for load balancers)",
        response_model=None,
        responses={
            200: json_body(ref(Readiness), "Ready: NATS connected, not draining"),
            503: json_body(ref(Readiness), "Not ready: NATS away, or draining"),
        },
    )
    async def readyz() -> Response:
        """Readiness: NATS connected and not draining (503 otherwise)."""
        body = readiness()
        return json_response(body, 200 if body.ready else 503)

    return router
