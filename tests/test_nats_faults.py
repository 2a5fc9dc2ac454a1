"""NATS faults: SIGKILL and restart on the same port, with the same store or a lost one.

Each test runs its own nats-server (``own_nats``) so it can kill it; pushsvc runs
under uvicorn against it. Bounded: every wait has a deadline of a few seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from helpers import bearer, until

from pushsvc.server.embedded import EmbeddedNats, free_port


async def stored_seqs(http: Any, srv: Any, channel: str) -> list[int]:
    """Every seq the stream holds for ``channel`` (through the history endpoint)."""
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token()))
    assert r.status_code == 200, r.text
    assert r.json()["more"] is False
    return [m["seq"] for m in r.json()["messages"]]


async def test_sigkill_and_restart_with_the_same_store(own_nats, start_server, http, channel):
    srv = await start_server(nats_url=own_nats.url, publish_timeout=1.0)
    emitter = bearer(srv.token("svc", publish=[">"]))

    async def emit(data: Any) -> Any:
        body = {"channel": channel, "data": data}
        return await http.post(f"{srv.base}/emit", json=body, headers=emitter)

    staying = await srv.client(srv.token("stay", publish=[">"]))  # connected throughout
    leaving = await srv.client(srv.token("leave"))  # drops and resumes with since
    await staying.subscribe(channel)
    await leaving.subscribe(channel)
    for n in range(3):
        assert (await emit({"n": n})).status_code == 202
    before = await staying.messages(3)
    last_seen = (await leaving.messages(3))[-1]["seq"]
    await leaving.close()

    own_nats.kill()
    await until(lambda: not srv.node.bus.is_connected, 3)
    # Outage: emits are refused with 503 + Retry-After, never 2xx; the socket stays up.
    for n in range(3):
        r = await emit({"lost": n})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "unavailable" and int(r.headers["retry-after"]) >= 1
    r = await http.get(f"{srv.base}/readyz")
    assert r.status_code == 503 and r.json()["nats"] is False
    await staying.send({"op": "subscribe", "channel": channel + ".other", "id": 1})
    await staying.expect("error", code="unavailable", id=1)
    await staying.send({"op": "publish", "channel": channel, "data": "x", "id": 2})
    await staying.expect("error", code="unavailable", id=2)
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token()))
    assert r.status_code == 503 and "retry-after" in r.headers

    # Producers keep going while pushsvc is still cut off: a NATS on another port
    # opens the same store, takes JetStream and core publishes, then stops.
    side = EmbeddedNats(port=free_port(), data_dir=own_nats.data_dir).start()
    try:
        producer = await nats.connect(side.url)
        js = producer.jetstream()
        missed = [(await js.publish(f"push.{channel}", b'{"side": %d}' % n)).seq for n in range(5)]
        for n in range(5):
            await producer.publish(f"push.{channel}", b'{"core": %d}' % n)
        await producer.flush()
        await producer.drain()
    finally:
        side.stop()

    back = EmbeddedNats(port=own_nats.port, data_dir=own_nats.data_dir).start()
    try:
        took = await until(lambda: srv.node.bus.is_connected, 5)
        assert took < 3, f"pushsvc took {took:.1f} s to reconnect"
        # Emits succeed again once JetStream has recovered the stream (retry on 503).
        after: list[int] = []
        for n in range(3):
            r = await emit({"after": n})
            for _ in range(100):
                if r.status_code != 503:
                    break
                await asyncio.sleep(0.05)
                r = await emit({"after": n})
            assert r.status_code == 202, r.text
            after.append(r.json()["seq"])
        stored = await stored_seqs(http, srv, channel)
        assert set(missed) <= set(stored) and set(after) <= set(stored)
        assert [m["seq"] for m in before] == stored[:3]
        # The session that stayed gets what was stored while the node was cut off
        # (caught up from the stream), then live: everything, in order, once.
        got = await staying.messages(len(stored) - 3)
        assert [m["seq"] for m in got] == stored[3:]
        assert [m["data"] for m in got[:10]] == [{"side": n} for n in range(5)] + [
            {"core": n} for n in range(5)
        ]
        await staying.nothing(0.2)
        # The one that dropped resumes with since and gets the same.
        resumed = await srv.client(srv.token("leave"))
        await resumed.subscribe(channel, since=last_seen, recovered=True)
        assert [m["seq"] for m in await resumed.messages(len(stored) - 3)] == stored[3:]
        # RePublish still works: a new subscription is live, with seq.
        fresh = await srv.client(srv.token("fresh"))
        await fresh.subscribe(channel + ".new")
        await staying.subscribe(channel + ".other")
        r = await http.post(
            f"{srv.base}/emit", json={"channel": channel + ".new", "data": 1}, headers=emitter
        )
        (m,) = await fresh.messages(1)
        assert m["seq"] == r.json()["seq"] > stored[-1]
        r = await http.get(f"{srv.base}/readyz")
        assert r.status_code == 200
    finally:
        await srv.stop()  # before NATS, so the node does not reconnect in teardown
        back.stop()


async def test_nats_loses_its_store(own_nats, start_server, http, channel, tmp_path):
    """A restart with an empty store: the stream is re-created and clients are told."""
    srv = await start_server(nats_url=own_nats.url, publish_timeout=1.0)
    emitter = bearer(srv.token("svc", publish=[">"]))
    c = await srv.client()
    await c.subscribe(channel)
    for n in range(3):
        r = await http.post(
            f"{srv.base}/emit", json={"channel": channel, "data": n}, headers=emitter
        )
        assert r.status_code == 202
    last_seen = (await c.messages(3))[-1]["seq"]

    own_nats.kill()
    await until(lambda: not srv.node.bus.is_connected, 3)
    back = EmbeddedNats(port=own_nats.port, data_dir=tmp_path / "empty-store").start()
    try:
        await until(lambda: srv.node.bus.is_connected, 5)
        # Sequences restarted: the node closes its sessions with 1012 so clients resume.
        assert await c.closed() == 1012
        await until(lambda: srv.node.bus.stream_reset, 5)
        # The stream exists again, with its RePublish.
        nc = await nats.connect(back.url)
        try:
            info = await nc.jetstream().stream_info(srv.settings.stream)
            assert info.config.republish.dest == "push-live.>"
            seq = (await nc.jetstream().publish(f"push.{channel}", b'"new"')).seq
        finally:
            await nc.drain()
        assert seq < last_seen
        # A resume with a since from the lost stream: recovered false, then the new messages.
        c2 = await srv.client()
        await c2.subscribe(channel, since=last_seen, recovered=False)
        (m,) = await c2.messages(1)
        assert m == {"type": "message", "channel": channel, "data": "new", "seq": seq}
        r = await http.post(
            f"{srv.base}/emit", json={"channel": channel, "data": 9}, headers=emitter
        )
        assert r.status_code == 202
        (m,) = await c2.messages(1)
        assert m["data"] == 9 and m["seq"] == r.json()["seq"]
    finally:
        await srv.stop()  # before NATS, so the node does not reconnect in teardown
        back.stop()


async def test_outage_longer_than_history_closes_sessions_for_resume(
    own_nats, start_server, http, channel
):
    """When the gap cannot be filled (per-channel cap overflowed), sessions are told to resume."""
    srv = await start_server(nats_url=own_nats.url, history_size=3)
    c = await srv.client()
    await c.subscribe(channel)
    emitter = bearer(srv.token("svc", publish=[">"]))
    await http.post(f"{srv.base}/emit", json={"channel": channel, "data": 0}, headers=emitter)
    (m,) = await c.messages(1)

    own_nats.kill()
    await until(lambda: not srv.node.bus.is_connected, 3)
    side = EmbeddedNats(port=free_port(), data_dir=own_nats.data_dir).start()
    try:
        producer = await nats.connect(side.url)
        for n in range(5):  # more than the cap of 3: two are dropped unseen
            await producer.jetstream().publish(f"push.{channel}", b"%d" % n)
        await producer.drain()
    finally:
        side.stop()
    back = EmbeddedNats(port=own_nats.port, data_dir=own_nats.data_dir).start()
    try:
        assert await c.closed(8) == 1012
        c2 = await srv.client()
        await c2.subscribe(channel, since=m["seq"], recovered=False)
        assert [x["data"] for x in await c2.messages(3)] == [2, 3, 4]
    finally:
        await srv.stop()  # before NATS, so the node does not reconnect in teardown
        back.stop()


async def test_quiet_channel_survives_a_blip_after_its_history_expired(own_nats, start_server):
    """A channel whose last message aged out is not mistaken for one that lost messages."""
    srv = await start_server(nats_url=own_nats.url, history_ttl=1)
    c = await srv.client()
    await c.subscribe("quiet.room")
    await c.subscribe("busy.room")
    producer = await nats.connect(own_nats.url)
    js = producer.jetstream()
    await js.publish("push.quiet.room", b"1")
    (m,) = await c.messages(1)
    for _ in range(3):  # traffic this node does not hold
        await js.publish("push.noise.room", b"0")
    await asyncio.sleep(1.3)  # max age 1 s: all of it expires
    await js.publish("push.busy.room", b"2")
    (m,) = await c.messages(1)
    await producer.close()

    own_nats.kill()
    await until(lambda: not srv.node.bus.is_connected, 3)
    back = EmbeddedNats(port=own_nats.port, data_dir=own_nats.data_dir).start()
    try:
        await until(lambda: srv.node.bus.is_connected, 5)
        producer = await nats.connect(back.url)
        for _ in range(100):  # until JetStream has recovered the stream
            try:
                await producer.jetstream().publish("push.quiet.room", b"3", timeout=0.5)
                break
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.05)
        await producer.close()
        (m,) = await c.messages(1)
        assert m["channel"] == "quiet.room" and m["data"] == 3
        assert c.ws.close_code is None
    finally:
        await srv.stop()  # before NATS, so the node does not reconnect in teardown
        back.stop()


async def test_pattern_and_presence_survive_a_nats_restart(own_nats, start_server):
    """A wildcard subscription is caught up from the stream like a channel; presence
    entries come back (bucket re-created in the new server's memory) within the TTL."""
    srv = await start_server(nats_url=own_nats.url, presence_channels=["p.>"], presence_ttl=3)
    c = await srv.client(srv.token("pat", extra={"presence": ["p.>"]}))
    await c.subscribe("p.*")
    await c.subscribe("p.room")  # present in p.room (patterns are never present)

    async def present() -> int:
        await c.send({"op": "presence", "channel": "p.room", "id": 1})
        while True:
            answer = await c.recv()
            if answer.get("id") == 1:
                return answer.get("clients_total", -1)

    assert await present() == 1
    producer = await nats.connect(own_nats.url)
    await producer.jetstream().publish("push.p.a", b"0")
    (m,) = await c.messages(1)
    assert m["pattern"] == "p.*" and m["channel"] == "p.a"
    await producer.close()

    own_nats.kill()
    await until(lambda: not srv.node.bus.is_connected, 3)
    side = EmbeddedNats(port=free_port(), data_dir=own_nats.data_dir).start()
    try:
        producer = await nats.connect(side.url)
        js = producer.jetstream()
        missed = [(await js.publish(f"push.p.{x}", b'"%s"' % x.encode())).seq for x in "bcb"]
        await producer.drain()
    finally:
        side.stop()
    back = EmbeddedNats(port=own_nats.port, data_dir=own_nats.data_dir).start()
    try:
        await until(lambda: srv.node.bus.is_connected, 5)
        got = await c.messages(3, timeout=10)
        assert [(g["seq"], g["channel"], g["pattern"]) for g in got] == [
            (seq, f"p.{x}", "p.*") for seq, x in zip(missed, "bcb", strict=True)
        ]

        async def back_in_presence() -> bool:
            return await present() == 1

        await until(back_in_presence, 10)  # TTL 3 s: refreshed every second
    finally:
        await srv.stop()  # before NATS, so the node does not reconnect in teardown
        back.stop()
