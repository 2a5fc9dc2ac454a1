"""Stream epochs: a resume never trusts a position from a stream that was created anew.

Real nats-server processes (``own_nats`` and fresh stores), pushsvc under uvicorn,
real WebSocket clients. Every wait is bounded.
"""

from __future__ import annotations

from typing import Any

import nats
from helpers import bearer, until

from pushsvc.server.embedded import EmbeddedNats


async def publish(url: str, channel: str, values: list[Any]) -> list[int]:
    """Publish each value (as JSON) through JetStream; returns their stream seqs."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        seqs = []
        for v in values:
            ack = await js.publish(f"push.{channel}", str(v).encode())
            seqs.append(ack.seq)
        return seqs
    finally:
        await nc.drain()


async def test_store_lost_between_two_runs(own_nats, start_server, channel, tmp_path):
    """Stop pushsvc and NATS, start both on an empty store: old positions are not trusted."""
    srv = await start_server(nats_url=own_nats.url)
    c = await srv.client()
    old_epoch = c.welcome["epoch"]
    await c.close()
    old = await publish(own_nats.url, channel, [1, 2, 3, 4, 5])
    old_last = old[-1]
    await srv.stop()
    own_nats.stop()

    fresh = EmbeddedNats(port=own_nats.port, data_dir=tmp_path / "fresh").start()
    try:
        srv = await start_server(nats_url=fresh.url)
        new = await publish(fresh.url, channel, [6, 7, 8])
        assert new[-1] <= old_last  # sequences restarted: only the epoch tells them apart

        c = await srv.client()
        epoch = c.welcome["epoch"]
        assert epoch and epoch != old_epoch
        # old (epoch, since): recovered false, exactly the new messages in order, then live
        sub = await c.subscribe(channel, since=old_last, epoch=old_epoch, recovered=False)
        assert sub["epoch"] == epoch
        got = await c.messages(3)
        assert [(m["data"], m["seq"]) for m in got] == list(zip([6, 7, 8], new, strict=True))
        await c.nothing(0.2)
        (live,) = await publish(fresh.url, channel, [9])
        (m,) = await c.messages(1)
        assert (m["data"], m["seq"]) == (9, live)
        await c.close()

        # an old client that sends no epoch: its since is past the new last seq
        c = await srv.client()
        await c.subscribe(channel, since=old_last, recovered=False)
        assert [m["data"] for m in await c.messages(4)] == [6, 7, 8, 9]
        await c.nothing(0.2)
        await c.close()

        # the current epoch behaves as before
        c = await srv.client()
        await c.subscribe(channel, since=new[0], epoch=epoch, recovered=True)
        assert [m["data"] for m in await c.messages(3)] == [7, 8, 9]
        await c.close()

        # an old since below the new last seq: only the epoch can catch it
        c = await srv.client()
        await c.subscribe(channel, since=new[1], epoch=old_epoch, recovered=False)
        assert [m["data"] for m in await c.messages(4)] == [6, 7, 8, 9]
        await c.close()
    finally:
        await srv.stop()
        fresh.cleanup()


async def test_stream_deleted_while_the_node_runs(own_nats, start_server, http, channel):
    """The node re-creates a deleted stream, tells its clients, and resumes stay honest."""
    srv = await start_server(nats_url=own_nats.url, publish_timeout=1.0)
    emitter = bearer(srv.token("svc", publish=[">"]))
    c = await srv.client()
    old_epoch = c.welcome["epoch"]
    await c.subscribe(channel)
    old = await publish(own_nats.url, channel, [1, 2, 3])
    assert [m["seq"] for m in await c.messages(3)] == old

    nc = await nats.connect(own_nats.url)
    try:
        await nc.jetstream().delete_stream(srv.settings.stream)
        # The node notices by itself (no reconnect, no other node): the stream is back
        # and connected clients are told to resume (their positions are void).
        assert await c.closed(timeout=10) == 1012
        await until(lambda: srv.node.bus.epoch != old_epoch, 5)
        info = await nc.jetstream().stream_info(srv.settings.stream)
        assert info.config.republish.dest == "push-live.>"
    finally:
        await nc.drain()
    r = await http.post(f"{srv.base}/emit", json={"channel": channel, "data": 4}, headers=emitter)
    assert r.status_code == 202, r.text
    new_seq = r.json()["seq"]
    assert new_seq <= old[-1]

    c = await srv.client()
    assert c.welcome["epoch"] == srv.node.bus.epoch != old_epoch
    await c.subscribe(channel, since=old[-1], epoch=old_epoch, recovered=False)
    (m,) = await c.messages(1)
    assert (m["data"], m["seq"]) == (4, new_seq)
    await c.nothing(0.2)


async def test_emit_recreates_a_deleted_stream(own_nats, start_server, http, channel):
    """An emit right after the stream was deleted is stored, not answered 503."""
    srv = await start_server(nats_url=own_nats.url, publish_timeout=1.0)
    emitter = bearer(srv.token("svc", publish=[">"]))
    c = await srv.client()
    await c.subscribe(channel)
    nc = await nats.connect(own_nats.url)
    try:
        await nc.jetstream().delete_stream(srv.settings.stream)
    finally:
        await nc.drain()
    r = await http.post(f"{srv.base}/emit", json={"channel": channel, "data": 1}, headers=emitter)
    assert r.status_code == 202, r.text
    assert r.json()["seq"] == 1
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token()))
    assert [m["data"] for m in r.json()["messages"]] == [1]
    assert r.json()["epoch"] == srv.node.bus.epoch
