"""Library use: mounting into an existing FastAPI app, the Publisher, testcontainers."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
from conftest import docker_available
from fastapi import FastAPI
from wsclient import WSClient

from pushsvc import Publisher, Settings, setup_app
from pushsvc.channels import InvalidChannel


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
