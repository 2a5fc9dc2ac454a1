"""Wiring: ``create_app(settings)`` and ``setup_app(app, settings)``.

This is the only module that connects the pieces: bus -> hub -> session. The
:class:`Node` owns them for one process; its lifespan connects NATS (starting the
bundled nats-server first when ``PUSHSVC_NATS_URL`` is unset), and on shutdown
stops accepting, turns readiness false, closes sessions with 1012 and drains NATS.

With ``PUSHSVC_DRAIN_DELAY`` > 0 the node also delays the server's SIGTERM
handling (see :mod:`pushsvc.server.drain`): readiness turns false at once, the
server keeps serving for the delay, then the shutdown above runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from . import metrics
from ._version import __version__
from .api.demo import demo_router, dev_token_router, static_file_route
from .api.emit import emit_router
from .api.history import history_router
from .api.openapi import ErrorBody, install, ref, text_body
from .api.presence import presence_router
from .api.probes import Readiness, probes_router
from .api.serverapi import server_api_router
from .api.streams import streams_router
from .auth.callouts import Callouts
from .auth.revocations import RevocationStore
from .auth.tokens import Authenticator, Revocation, parse_revocation
from .bus import Bus, Headers, Unavailable
from .bus.nodes import NodeRequests
from .bus.tickets import Tickets
from .config.nats import NatsRefused, NatsSecurity
from .config.settings import Settings, default_node_name
from .core.admission import Admission
from .core.client import ClientFactory
from .core.hub import Hub
from .core.joinleave import JoinLeave
from .core.presence import PresenceRegistry
from .core.ratelimit import BucketRegistry
from .core.revoke import disconnect_matching
from .lifecycle.events import LifecycleEvents
from .lifecycle.lost import NodeLost
from .lifecycle.occupancy import Occupancy
from .logs import install_redaction
from .protocol import CLOSE_SERVICE_RESTART
from .server.capacity import fd_budget
from .server.drain import SigtermDelay
from .server.embedded import EmbeddedNats, start_default
from .serverapi.cluster import ServerAPI
from .serverapi.local import LocalOps
from .sse.endpoint import StreamEndpoint
from .sse.sessions import OP as STREAM_COMMANDS
from .sse.sessions import StreamSessions
from .ws.endpoint import WebSocketEndpoint

log = logging.getLogger("pushsvc")

DEV_ROOMS = ("chat.>",)  # with --dev and no settings: presence and join/leave of the demo's rooms


class Node:
    """One pushsvc node: bus, hub, authenticator and limits for this process.

    Attributes:
        ready: True once NATS is connected and until shutdown (or the drain) starts.
        embedded: the bundled nats-server when this node started one (library
            mode without ``PUSHSVC_NATS_URL``); its URL is :attr:`nats_url`.
        name: the node name (``PUSHSVC_NODE_NAME``, default the host name).
        worker: this process's id under ``serve --workers N`` (N > 1), else None.
        draining: readiness is false (SIGTERM received or shutting down).
        stopping: the shutdown proper runs: new handshakes are refused with 503.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.dev and settings.jwt_secret is None and settings.jwt_public_key is None:
            settings.jwt_secret = secrets.token_urlsafe(32)
        if settings.dev:  # the demo's chat rooms show who is here
            settings.presence_channels = settings.presence_channels or list(DEV_ROOMS)
            settings.join_leave_channels = settings.join_leave_channels or list(DEV_ROOMS)
        if settings.node_name is None:
            settings.node_name = default_node_name()
        self.settings = settings
        self.name = settings.node_name
        self.worker = str(os.getpid()) if settings.workers > 1 else None
        self.auth = Authenticator(settings)
        self.bus = Bus(
            settings,
            on_message=self._hub_dispatch,
            on_control=self._control,
            name=self.connection_name,
        )
        # connect/subscribe callouts over NATS (PUSHSVC_*_AUTH_SUBJECT; none: off)
        Callouts(settings, self.bus.requests).install(self.auth)
        self.hub = Hub(
            self.bus, write_delay=settings.write_delay, coalesce_bytes=settings.coalesce_bytes
        )
        # NATS outage: buffer live frames, then fill the gap from the stream (history on)
        self.bus.on_disconnected = self.hub.suspend
        self.bus.on_resumed = self.hub.resume
        # presence: the hub tells the registry who joins and leaves which channel
        self.presence = PresenceRegistry(settings, self.bus, settings.node_name)
        self.hub.on_join.append(self.presence.joined)
        self.hub.on_leave.append(self.presence.left)
        # join/leave events: published through NATS, delivered by every node's hub
        self.join_leave = JoinLeave(settings, self.bus, self.hub)
        self.hub.on_join.append(self.join_leave.joined)
        self.hub.on_leave.append(self.join_leave.left)
        self.bus.on_event = self.join_leave.deliver
        self.bus.on_pattern_message = self.hub.dispatch_pattern
        # a NATS read handed over: write its batches now, not a loop iteration later
        self.bus.on_drained = self.hub.flush_now
        # stream re-created (new epoch): every position handed out is void
        self.bus.on_epoch_changed = self.hub.stream_reset
        self.command_buckets = BucketRegistry(settings.command_rate, settings.command_burst)
        self.emit_buckets = BucketRegistry(settings.emit_rate, settings.emit_burst)
        #: origin allowlist and connection caps, every transport's connections together
        #: this process's open-file budget (connections it can hold; pushsvc.server.capacity)
        self.fds = fd_budget()
        self.admission = Admission(settings, self.hub, self.accepting, self.fds.full)
        #: what every transport's endpoint makes its clients with
        self.clients = ClientFactory(
            settings, self.hub, self.auth, self.command_buckets, self.presence
        )
        self.endpoint = WebSocketEndpoint(self.clients, self.admission)
        self._wire_backends(settings)
        # SSE and HTTP-streaming: stream sessions reached by POST /sse/commands on any node
        self.stream_sessions = StreamSessions(self.hub.node_id)
        self.tickets = Tickets(self.bus.kv, settings.ticket_ttl)
        self.stream_endpoints = {
            kind: StreamEndpoint(
                kind, self.clients, self.admission, self.stream_sessions, self.tickets
            )
            for kind in ("sse", "stream")
        }
        self.embedded: EmbeddedNats | None = None
        #: revocations kept in NATS (history on), shared by every node
        self.revocations: RevocationStore | None = None
        self.draining = False
        self.stopping = False
        self.started = False
        self._sigterm = SigtermDelay(settings.drain_delay, self._begin_drain)

    def _wire_backends(self, settings: Settings) -> None:
        """What backends use: the server API and lifecycle events (docs/server-api.md)."""
        #: lifecycle events (PUSHSVC_EVENTS): connect/disconnect/subscribe/unsubscribe,
        #: cluster-wide occupied/vacated, and the disconnects of nodes that died
        self.events = LifecycleEvents(settings, self.bus, self.hub.node_id)
        self.occupancy = Occupancy(self.bus, settings.node_bucket, self.events, self.hub.node_id)
        self.node_lost = NodeLost(self.bus, settings.node_bucket, self.events, self.hub.node_id)
        if self.events.enabled:
            self.hub.on_connect.append(self.events.connected)
            self.hub.on_disconnect.append(self.events.disconnected)
            self.hub.on_join.extend((self.events.joined, self.occupancy.joined))
            self.hub.on_leave.extend((self.events.left, self.occupancy.left))
        #: the cluster-wide server API (NATS <prefix>-api.<op>, POST /api/<op>)
        self.server_api = ServerAPI(
            settings, self.bus, LocalOps(settings, self.hub, self.hub.node_id), self.presence
        )

    @property
    def connection_name(self) -> str:
        """The NATS connection name: ``pushsvc/<node>``, plus ``/<worker pid>`` under workers.

        Operators find each node (and worker) in ``nats server report connections``
        or the server's ``/connz`` monitoring endpoint by this name.
        """
        base = f"pushsvc/{self.name}"
        return f"{base}/{self.worker}" if self.worker else base

    def _hub_dispatch(
        self,
        channel: str,
        payload: bytes,
        seq: int | None,
        stamp: float | None,
        headers: Headers = None,
    ) -> None:
        """The bus's ``on_message``: hand a live NATS message to the hub."""
        self.hub.dispatch(channel, payload, seq, stamp, headers)

    def _control(self, payload: bytes) -> None:
        """A revocation from NATS: refuse the token(s) from now on, close their sessions.

        With history on it is also stored in the revocation bucket (every node
        that receives it writes the same entry; JetStream keeps one), so nodes
        started later refuse the token(s) too.
        """
        revocation = parse_revocation(payload)
        if revocation is None:
            log.warning("ignored malformed control message")
            return
        at = time.time()
        if self.revocations is not None:
            self.revocations.record(revocation, at, payload)
        else:
            self._revoke(revocation, at)

    def _revoke(self, revocation: Revocation, at: float) -> None:
        """Refuse the revoked token(s) from now on and close their sessions."""
        self.auth.revoke(revocation, at)
        disconnect_matching(self.hub.clients, revocation.sub, revocation.jti, issued_before=at)

    @property
    def nats_url(self) -> str | None:
        """The NATS URL(s) this node uses, comma-separated: ``PUSHSVC_NATS_URL``, or the
        bundled nats-server's ``nats://127.0.0.1:PORT`` once started (None before).

        Producers publish to ``<prefix>.<channel>`` there, e.g. with
        ``Publisher(app.state.pushsvc.nats_url)``.
        """
        return self.settings.nats_url

    @property
    def ready(self) -> bool:
        """Ready to take traffic: started, NATS connected, not draining."""
        return self.started and not self.draining and self.bus.is_connected

    def readiness(self) -> Readiness:
        """What ``GET /readyz`` answers: :attr:`ready` and the state behind it."""
        return Readiness(
            ready=self.ready,
            node=self.name,
            nats=self.bus.is_connected,
            draining=self.draining,
            history=self.bus.history_enabled,
            connections=len(self.hub.clients),
        )

    def accepting(self) -> bool:
        """New WebSocket handshakes are accepted (also during the drain delay; not once
        the shutdown proper has started)."""
        return not self.stopping

    async def start(self) -> None:
        """Start the bundled NATS if needed, then connect the bus.

        Raises:
            Unavailable: NATS not reachable within ``connect_timeout`` seconds.
        """
        if self.settings.nats_url is None:
            self.embedded = await asyncio.to_thread(start_default, self.settings.data_dir)
            self.settings.nats_url = self.embedded.url
            # WARNING, not INFO: under a plain uvicorn only warnings of other loggers
            # are shown, and producers must learn where to publish.
            log.warning(
                "PUSHSVC_NATS_URL is unset: started the bundled nats-server at %s "
                "(publish to it: PUSHSVC_NATS_URL=%s pushsvc publish CHANNEL DATA; "
                "the app sees it as app.state.pushsvc.nats_url)",
                self.embedded.url,
                self.embedded.url,
            )
        await self.bus.start()
        requests = NodeRequests(self.bus.conn, self.stream_sessions.node_id)
        await requests.serve(STREAM_COMMANDS, self.stream_sessions.serve_remote)
        self.stream_sessions.requests = requests
        if self.bus.history_enabled:
            store = RevocationStore(self.bus, self.settings.revocation_bucket, self._revoke)
            try:
                await store.start(self.settings.connect_timeout)
            except Unavailable:
                await self.bus.close()
                raise
            self.revocations = store
        await self.presence.start()
        try:
            await self.server_api.start()
        except Unavailable:
            await self.bus.close()
            raise
        await self.events.start()
        await self.node_lost.start()
        self._log_capacity()
        self.started = True
        metrics.INFO.labels(self.name, __version__).set(1)
        if self.settings.drain_delay > 0:
            self._sigterm.install()

    def _log_capacity(self) -> None:
        """Log how many connections this process can hold (once per worker, at start)."""
        fds = self.fds
        capacity = fds.measure()
        cap = self.settings.max_connections
        log.info(
            "capacity: %d connections in this process (open files: limit %d, %d held at "
            "start, %d kept spare; PUSHSVC_MAX_CONNECTIONS=%d%s)",
            min(capacity, cap),
            fds.limit,
            fds.baseline,
            fds.reserve,
            cap,
            "" if capacity >= cap else ", the open-file limit comes first",
            extra={
                "capacity": min(capacity, cap),
                "fd_limit": fds.limit,
                "fd_baseline": fds.baseline,
                "fd_reserve": fds.reserve,
                "worker": self.worker,
            },
        )
        metrics.CONNECTION_CAPACITY.set(min(capacity, cap))

    def _begin_drain(self) -> bool:
        """SIGTERM with a drain delay: readiness off now; False if already draining."""
        if self.draining:
            return False
        self.draining = True
        log.info(
            "SIGTERM: readiness off, closing sessions after the drain delay",
            extra={"drain_delay": self.settings.drain_delay, "connections": len(self.hub.clients)},
        )
        return True

    async def stop(self) -> None:
        """Graceful drain: refuse new sessions, close open ones with 1012, drain NATS.

        The NATS drain is bounded by ``min(5, shutdown_timeout)`` seconds.
        """
        self.draining = self.stopping = True
        self._sigterm.uninstall()
        await self.server_api.stop()
        if self.hub.clients:
            log.info(
                "closing sessions: service restart (1012)",
                extra={"connections": len(self.hub.clients)},
            )
        self.hub.close_all(CLOSE_SERVICE_RESTART, "service restart")
        await asyncio.sleep(0.05)  # let close frames go out
        await self.hub.wait_idle()
        await self.join_leave.wait_idle()
        await self.occupancy.stop()
        await self.events.stop()
        await self.bus.lifecycle.stop()
        await self.presence.stop()
        if self.revocations is not None:
            await self.revocations.close()
        await self.bus.close(timeout=min(5.0, self.settings.shutdown_timeout))
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.cleanup)
            self.embedded = None
        metrics.mark_self_dead()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the node for the duration of the block."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def router(self) -> APIRouter:
        """All HTTP and WebSocket routes of the node (paths relative to the base path)."""
        settings = self.settings
        router = APIRouter()
        router.routes.append(WebSocketRoute("/ws", self.endpoint))

        # Plain HTTP on /ws (WebSocket scopes never reach this route: they go to the
        # endpoint above, or straight to it through Shortcut).
        @router.get(
            "/ws",
            status_code=426,
            operation_id="websocket",
            summary="WebSocket endpoint (wire contract: docs/protocol.md)",
            response_model=None,
            responses={
                101: {"description": "Switching Protocols: a WebSocket (docs/protocol.md)"},
                **_WS_REFUSALS,
            },
        )
        async def ws_upgrade_required() -> JSONResponse:
            """The WebSocket endpoint; a request without a WebSocket upgrade gets 426.

            RFC 9110 15.5.22 (was RFC 7231 6.5.15): a 426 carries ``Upgrade``
            naming the protocol, here ``websocket`` version 13 (RFC 6455 4.2.2, 4.4).
            """
            return JSONResponse(
                {"error": "upgrade_required", "message": "GET /ws needs a WebSocket upgrade"},
                status_code=426,
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                },
            )

        router.include_router(emit_router(settings, self.hub, self.auth, self.emit_buckets))
        router.include_router(history_router(settings, self.bus, self.auth))
        router.include_router(presence_router(settings, self.presence, self.auth))
        router.include_router(server_api_router(settings, self.server_api, self.auth))

        router.include_router(probes_router(self.readiness))
        router.routes.append(Route("/sse", self.stream_endpoints["sse"], methods=["GET"]))
        router.routes.append(Route("/stream", self.stream_endpoints["stream"], methods=["POST"]))
        router.include_router(
            streams_router(settings, self.auth, self.admission, self.stream_sessions, self.tickets)
        )

        @router.get(
            "/metrics",
            operation_id="metrics",
            summary="Prometheus metrics",
            response_class=Response,
            responses={200: text_body("text/plain", "Prometheus text exposition format")},
        )
        async def metrics_endpoint() -> Response:
            """Prometheus metrics (of every worker under ``serve --workers N``)."""
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

        static_file_route(
            router,
            "/static/pushsvc.js",
            "pushsvc.js",
            "text/javascript",
            "clientScript",
            "The browser client (pushsvc.js)",
        )

        if settings.dev:
            router.include_router(demo_router())
            router.include_router(dev_token_router(settings))

        return router


class Shortcut:
    """ASGI middleware sending the connection endpoints' requests straight to them.

    ``GET /ws`` (WebSocket), ``GET /sse`` and ``POST /stream`` skip Starlette's
    layers: its exception middleware wraps ``send`` in one more coroutine per call
    (~5% of the server's CPU on the delivery hot path, py-spy, 1000 sockets at 50
    msg/s), and for a long-lived stream every layer is a coroutine frame held for
    the connection's life (memory per connection). The routes stay registered, so
    behaviour is the same without this middleware.

    Args:
        app: the ASGI app for everything else.
        base: the base path (``PUSHSVC_BASE_PATH`` or the mount prefix).
        node: the node whose endpoints serve those paths.
    """

    def __init__(self, app: Any, base: str, node: Node) -> None:
        self.app = app
        self.routes: dict[tuple[str, str, str], Any] = {
            ("websocket", "GET", base + "/ws"): node.endpoint,
            ("http", "GET", base + "/sse"): node.stream_endpoints["sse"],
            ("http", "POST", base + "/stream"): node.stream_endpoints["stream"],
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "lifespan":
            key = (kind, scope.get("method", "GET"), scope["path"])
            endpoint = self.routes.get(key)
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve_app(app: FastAPI) -> Shortcut:
    """The ASGI callable ``pushsvc serve`` hands uvicorn: ``app`` with the connection
    endpoints (``/ws``, ``/sse``, ``/stream``) routed first.

    Inside ``app`` a handshake still passes FastAPI's own layers (its telemetry and
    body-limit wrappers, Starlette's error middleware) before the shortcut: about 5%
    of the server's CPU per connection in a reconnect storm (py-spy). ``pushsvc
    serve`` adds no middleware of its own, so the endpoints are called first here;
    everything else (HTTP, lifespan) goes to ``app`` unchanged. Apps that embed
    pushsvc with :func:`setup_app` keep their middleware for those paths.
    """
    node: Node = app.state.pushsvc
    return Shortcut(app, node.settings.base_path, node)


_WS_REFUSALS: dict[int | str, dict[str, Any]] = {
    403: text_body("text/plain", "Origin not allowed, or a bad token in the handshake"),
    400: text_body("text/plain", "A malformed WebSocket handshake (e.g. no Sec-WebSocket-Key)"),
    414: text_body("text/plain", "Request line over 8 KiB (e.g. a huge ?token=)"),
    426: {
        "description": "Upgrade Required: a plain HTTP request, not a WebSocket (JSON), or "
        "an unsupported Sec-WebSocket-Version (text)",
        "content": {
            "application/json": {"schema": ref(ErrorBody)},
            "text/plain": {"schema": {"type": "string"}},
        },
        "headers": {
            "Upgrade": {"required": True, "schema": {"type": "string", "const": "websocket"}},
            "Sec-WebSocket-Version": {"required": True, "schema": {"type": "string"}},
        },
    },
    429: text_body("text/plain", "The user holds PUSHSVC_MAX_CONNECTIONS_PER_USER sockets"),
    431: text_body("text/plain", "A header line over 8 KiB, or more than 128 headers"),
    503: text_body(
        "text/plain",
        "Draining, or PUSHSVC_MAX_CONNECTIONS reached",
        headers={"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}},
    ),
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """A standalone pushsvc ASGI app.

    Args:
        settings: defaults to :meth:`Settings.load` (``PUSHSVC_*`` environment).

    Returns:
        A FastAPI app; ``app.state.pushsvc`` is its :class:`Node`.

    Raises:
        SettingsError: invalid configuration (when loading from the environment).
    """
    settings = settings or Settings.load()
    app = FastAPI(title="pushsvc", version=__version__, docs_url=None, redoc_url=None)
    setup_app(app, settings, prefix=settings.base_path)
    return app


def setup_app(app: FastAPI, settings: Settings, prefix: str = "") -> Node:
    """Mount pushsvc's routes into an existing FastAPI app under ``prefix``.

    The node starts and stops with the app's lifespan (wrapped around the app's
    own lifespan, so user startup code sees a connected node).

    Args:
        app: the host application.
        settings: pushsvc settings.
        prefix: base path, e.g. ``"/push"`` (``""`` for the root).

    Returns:
        The :class:`Node` (also at ``app.state.pushsvc``).
    """
    node = Node(settings)  # (generates the dev secret, if any, first)
    api_keys = [entry.rsplit(":", 1)[-1] for entry in settings.api_keys]
    install_redaction(
        [settings.jwt_secret, *api_keys, *NatsSecurity.from_settings(settings).secrets()]
    )
    app.include_router(node.router(), prefix=prefix)
    install(app)
    app.add_middleware(Shortcut, base=prefix, node=node)
    app.state.pushsvc = node
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        install_redaction()  # again: the server may have configured logging since
        try:
            async with node.lifespan():
                async with inner(a) as state:
                    yield state
        except (Unavailable, NatsRefused) as exc:
            log.error("pushsvc cannot start: %s", exc)
            raise

    app.router.lifespan_context = lifespan
    return node
