"""Library use: mounting into an existing FastAPI app, the Publisher, testcontainers."""

from __future__ import annotations

import contextlib
import logging
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from conftest import docker_available
from fastapi import FastAPI
from wsclient import WSClient

from pushsvc import Publisher, Settings, setup_app, uvicorn_config
from pushsvc.channels import InvalidChannel
from pushsvc.server.embedded import DEFAULT_PORT


async def test_setup_app_mounts_under_a_base_path(start_server, http, channel):
    events: list[str] = []

    def factory(settings: Settings) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            events.append("host-start")
            yield
            events.append("host-stop")

        app = FastAPI(lifespan=lifespan)

        @app.get("/own")
        async def own() -> dict[str, bool]:
            return {"own": True}

        setup_app(app, settings, prefix="/push")
        return app

    srv = await start_server(app_factory=factory)
    assert events == ["host-start"]
    base = f"http://127.0.0.1:{srv.settings.port}"
    assert (await http.get(f"{base}/own")).json() == {"own": True}
    assert (await http.get(f"{base}/push/readyz")).status_code == 200
    c = await WSClient.connect(f"ws://127.0.0.1:{srv.settings.port}/push/ws", srv.token())
    await c.subscribe(channel)
    r = await http.post(
        f"{base}/push/emit/{channel}",
        content=b'{"via": "mounted"}',
        headers={"Authorization": f"Bearer {srv.token(publish=['>'])}"},
    )
    assert r.status_code == 202
    (m,) = await c.messages(1)
    assert m["data"] == {"via": "mounted"}
    await srv.stop()
    assert events == ["host-start", "host-stop"]


async def test_publisher(start_server, nats_url, channel):
    srv = await start_server()
    c = await srv.client()
    await c.subscribe(channel)
    async with Publisher(nats_url) as pub:
        seq1 = await pub.publish(channel, {"a": 1}, msg_id=f"{channel}-1")
        again = await pub.publish(channel, {"a": 1}, msg_id=f"{channel}-1")
        seq2 = await pub.publish(channel, b"raw")
        with pytest.raises(InvalidChannel):
            await pub.publish("bad.*", 1)
    assert again == seq1 and seq2 > seq1
    m1, m2 = await c.messages(2)
    assert (m1["data"], m1["seq"]) == ({"a": 1}, seq1)
    assert (m2["data"], m2["seq"]) == ("raw", seq2)
    await c.nothing()


async def test_library_mode_bundled_nats_is_logged_and_exposed(start_server, caplog, channel):
    """Without PUSHSVC_NATS_URL the app starts the bundled server and says where it is."""
    with socket.socket() as hold:
        # keep the test off the conventional 4222 (used when free): any free port then
        with contextlib.suppress(OSError):
            hold.bind(("127.0.0.1", DEFAULT_PORT))
        with caplog.at_level(logging.WARNING, logger="pushsvc"):
            srv = await start_server(nats_url=None)
    url = srv.node.nats_url
    assert url is not None and url.startswith("nats://127.0.0.1:")
    assert not url.endswith(f":{DEFAULT_PORT}")
    assert srv.node.embedded is not None and url == srv.node.embedded.url
    assert any(url in r.getMessage() for r in caplog.records if r.name == "pushsvc")
    c = await srv.client()
    await c.subscribe(channel)
    async with Publisher(url) as pub:  # what the log and the docs tell producers to do
        seq = await pub.publish(channel, {"via": "bundled"})
    (m,) = await c.messages(1)
    assert (m["data"], m["seq"]) == ({"via": "bundled"}, seq)
    await srv.stop()
    assert srv.node.embedded is None  # stopped with the app


def test_uvicorn_config_is_what_serve_uses():
    """One source for the uvicorn settings of docs/operations.md and the embedding page."""
    settings = Settings.load(env={}, jwt_secret="x", max_frame_bytes=1234)
    cfg = uvicorn_config(settings)
    assert cfg["ws"] == "pushsvc.ws.protocol:WebSocketProtocol"
    assert cfg["http"] == "pushsvc.server.httpprotocol:HttpToolsProtocol"
    assert cfg["ws_max_size"] == 1234 and cfg["ws_per_message_deflate"] is False
    # one heartbeat per connection: pushsvc's ping/pong, no RFC 6455 protocol pings
    assert cfg["ws_ping_interval"] is None and cfg["ws_ping_timeout"] is None
    uvicorn.Config(FastAPI(), **cfg)  # valid uvicorn arguments
    # PUSHSVC_COMPRESSION=deflate: negotiated (pushsvc.ws.protocol imposes no context takeover)
    assert uvicorn_config(Settings.load(env={}, jwt_secret="x", compression="deflate"))[
        "ws_per_message_deflate"
    ]
    docs = Path(__file__).resolve().parent.parent / "docs"
    embedding = docs / "backend" / "embedding.md"
    ops = docs / "operations" / "deploying.md"
    flags = (
        "--ws pushsvc.ws.protocol:WebSocketProtocol",
        "--http pushsvc.server.httpprotocol:HttpToolsProtocol",
        "--ws-max-size 65536",
        "--ws-per-message-deflate false",
        "--ws-ping-interval 0",
    )
    for doc in (embedding, ops):
        text = doc.read_text()
        assert "uvicorn_config" in text, doc
        for flag in flags:
            assert flag in text, (doc, flag)


def test_testcontainers_nats_module():
    """The testcontainers path: runs only where a Docker engine is reachable."""
    if not docker_available():
        pytest.skip("no Docker engine reachable: the bundled nats-server path is used instead")
    import asyncio

    import nats
    from testcontainers.nats import NatsContainer

    async def roundtrip(url: str) -> bytes:
        nc = await nats.connect(url)
        sub = await nc.subscribe("probe")
        await nc.publish("probe", b"ok")
        msg = await sub.next_msg(timeout=5)
        await nc.close()
        return msg.data

    with NatsContainer().with_command("-js") as container:
        assert asyncio.run(roundtrip(container.nats_uri())) == b"ok"
