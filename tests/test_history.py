"""History and recovery on JetStream: ``seq``, ``since``, ``recovered``, idempotent emits.

Real nats-server, real uvicorn, real sockets. Tests that change a stream's
configuration use their own ``subject_prefix`` and stream name so the shared
``PUSHSVC`` stream keeps its defaults.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import uuid
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from helpers import bearer, refcounting_only

from pushsvc import Publisher, Settings
from pushsvc.bus import Bus, Unavailable
from pushsvc.bus.reads import scan


def unique(tag: str) -> tuple[str, str]:
    """A fresh ``(subject_prefix, stream)`` pair for a test that owns its stream."""
    suffix = uuid.uuid4().hex[:8]
    return f"{tag}{suffix}", f"{tag.upper()}_{suffix}"


async def emit(http: Any, srv: Any, channel: str, data: Any, key: str | None = None) -> Any:
    headers = bearer(srv.token("svc", publish=[">"]))
    if key is not None:
        headers["Idempotency-Key"] = key
    return await http.post(
        f"{srv.base}/emit", json={"channel": channel, "data": data}, headers=headers
    )


async def test_resume_with_since_gets_exactly_what_was_missed(start_server, nc, http, channel):
    srv = await start_server()
    c = await srv.client()
    await c.subscribe(channel)
    await nc.publish(f"push.{channel}", b'{"n": -1}')
    (first,) = await c.messages(1)
    last = first["seq"]
    await c.close()

    emitted: dict[int, int] = {}  # n -> seq answered by the emit
    for n in range(50):
        if n % 2:
            r = await emit(http, srv, channel, {"n": n})
            assert r.status_code == 202, r.text
            emitted[n] = r.json()["seq"]
        else:
            await nc.publish(f"push.{channel}", json.dumps({"n": n}).encode())
            await nc.flush()

    c = await srv.client()
    await c.subscribe(channel, since=last, recovered=True)
    got = await c.messages(50)
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50 and seqs[0] > last
    assert sorted(m["data"]["n"] for m in got) == list(range(50))
    assert all(emitted[m["data"]["n"]] == m["seq"] for m in got if m["data"]["n"] in emitted)
    # Then live, after the replay, without a duplicate.
    for n in range(50, 55):
        await nc.publish(f"push.{channel}", json.dumps({"n": n}).encode())
    live = await c.messages(5)
    assert [m["data"]["n"] for m in live] == list(range(50, 55))
    assert live[0]["seq"] > seqs[-1]
    await c.nothing()


async def test_no_gap_no_duplicate_at_the_seam_under_load(start_server, nats_url, channel):
    """A producer publishes continuously while one client resubscribes 20 times with since."""
    srv = await start_server()
    anchor = await srv.client(srv.token("anchor"))  # keeps the node's NATS subscription part time
    producer = await nats.connect(nats_url)
    stop = asyncio.Event()
    sent = 0

    async def produce() -> None:
        nonlocal sent
        while not stop.is_set() and sent < 3000:
            await producer.publish(f"push.{channel}", json.dumps({"n": sent}).encode())
            sent += 1
            if sent % 10 == 0:
                await asyncio.sleep(0.002)

    c = await srv.client()
    await c.subscribe(channel, since=0)
    task = asyncio.create_task(produce())
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    try:
        for i in range(20):
            assert time.monotonic() < deadline
            if i % 4 == 1:
                await anchor.subscribe(channel)
            elif i % 4 == 3:
                await anchor.send({"op": "unsubscribe", "channel": channel})
                while (await anchor.recv())["type"] != "unsubscribed":
                    pass
            # take a few live messages
            for _ in range(5):
                received.append(await c.expect("message"))
            last = received[-1]["seq"]
            if i % 2:  # drop the socket and come back
                await c.close()
                c = await srv.client()
            else:  # same socket: unsubscribe, resubscribe
                await c.send({"op": "unsubscribe", "channel": channel})
                while (frame := await c.recv()).get("type") == "message":
                    received.append(frame)
                assert frame["type"] == "unsubscribed", frame
                last = received[-1]["seq"]
            await c.subscribe(channel, since=last, recovered=True)
    finally:
        stop.set()
        await task
        await producer.flush()
    while len(received) < sent:
        received.append(await c.expect("message"))
    await c.nothing(0.2)
    ns = [m["data"]["n"] for m in received]
    assert ns == list(range(sent)), "gap or duplicate at a replay/live seam"
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(set(seqs))
    await producer.drain()


async def test_since_older_than_retained_history(start_server, channel):
    prefix, stream = unique("hcap")
    srv = await start_server(subject_prefix=prefix, stream=stream, history_size=5)
    pub = await Publisher(srv.settings.nats_url, prefix=prefix).connect()
    try:
        seqs = [await pub.publish(channel, {"n": n}) for n in range(10)]
    finally:
        await pub.close()
    c = await srv.client()
    # since before everything: the first five were dropped by the per-channel cap.
    await c.subscribe(channel, since=0, recovered=False)
    assert [m["data"]["n"] for m in await c.messages(5)] == [5, 6, 7, 8, 9]
    await c.nothing(0.2)
    # since = the newest dropped message: message 4 is gone too.
    c2 = await srv.client()
    await c2.subscribe(channel, since=seqs[3], recovered=False)
    assert [m["seq"] for m in await c2.messages(5)] == seqs[5:]
    # since = the oldest retained: nothing after it is missing.
    c3 = await srv.client()
    await c3.subscribe(channel, since=seqs[5], recovered=True)
    assert [m["seq"] for m in await c3.messages(4)] == seqs[6:]
    await c3.nothing(0.2)


async def test_since_older_than_ttl(start_server, channel):
    prefix, stream = unique("httl")
    srv = await start_server(subject_prefix=prefix, stream=stream, history_ttl=1)
    pub = await Publisher(srv.settings.nats_url, prefix=prefix).connect()
    try:
        old = [await pub.publish(channel, {"n": n}) for n in range(3)]
        await asyncio.sleep(1.6)  # max age 1 s: the three expire
        new = await pub.publish(channel, {"n": 3})
    finally:
        await pub.close()
    c = await srv.client()
    await c.subscribe(channel, since=old[0], recovered=False)
    (m,) = await c.messages(1)
    assert m["seq"] == new
    await c.nothing(0.2)


async def test_another_channel_at_its_cap_loses_nothing_of_this_one(start_server, http, channel):
    """A busy channel at its per-channel cap moves the stream's first sequence: in a
    stream younger than its max age nothing can have expired, so a quiet channel's
    reads stay recovered."""
    prefix, stream = unique("hcap")
    srv = await start_server(subject_prefix=prefix, stream=stream, history_size=5)
    async with Publisher(srv.settings.nats_url, prefix=prefix) as pub:
        for n in range(12):
            await pub.publish(f"{channel}.busy", {"n": n})  # its first 7 are removed
        quiet = [await pub.publish(channel, {"q": n}) for n in range(2)]
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token()))
    assert r.status_code == 200, r.text
    page = r.json()
    assert [m["seq"] for m in page["messages"]] == quiet and page["recovered"] is True
    c = await srv.client()
    await c.subscribe(channel, since=0, recovered=True)
    assert [m["seq"] for m in await c.messages(2)] == quiet
    # the busy channel itself did lose messages after since=0: said so
    await c.subscribe(f"{channel}.busy", since=0, recovered=False)
    assert len(await c.messages(5)) == 5


async def test_since_past_the_stream_is_another_epoch(start_server, nc, channel):
    """Without an epoch, a since beyond the stream's last seq cannot be of this epoch."""
    srv = await start_server()
    await nc.publish(f"push.{channel}", b'"old"')
    await nc.flush()
    c = await srv.client()
    sub = await c.subscribe(channel, since=10**12, recovered=False)
    assert sub["epoch"] == c.welcome["epoch"]
    (replayed,) = await c.messages(1)
    assert replayed["data"] == "old"
    await nc.publish(f"push.{channel}", b'"new"')
    (m,) = await c.messages(1)
    assert m["data"] == "new" and m["seq"] > replayed["seq"]


async def test_since_with_the_current_epoch_resumes(start_server, nc, channel):
    srv = await start_server()
    c = await srv.client()
    epoch = c.welcome["epoch"]
    assert isinstance(epoch, str) and epoch
    await c.subscribe(channel, epoch=epoch)
    for i in range(3):
        await nc.publish(f"push.{channel}", str(i).encode())
    first, *_ = await c.messages(3)
    await c.close()
    c = await srv.client()
    await c.subscribe(channel, since=first["seq"], epoch=epoch, recovered=True)
    assert [m["data"] for m in await c.messages(2)] == [1, 2]
    await c.close()
    # the same position with another epoch: everything the stream holds, recovered false
    c = await srv.client()
    sub = await c.subscribe(channel, since=first["seq"], epoch="0ld", recovered=False)
    assert sub["epoch"] == epoch
    assert [m["data"] for m in await c.messages(3)] == [0, 1, 2]
    await c.nothing(0.2)


async def test_since_with_nothing_new_and_a_quiet_channel(start_server, nc, channel):
    srv = await start_server()
    c = await srv.client()
    await c.subscribe(channel)
    await nc.publish(f"push.{channel}", b"1")
    (m,) = await c.messages(1)
    await c.close()
    c = await srv.client()
    await c.subscribe(channel, since=m["seq"], recovered=True)
    await c.nothing(0.2)
    # A channel without any message after since: nothing was lost.
    await c.subscribe(channel + ".empty", since=m["seq"] - 1, recovered=True)
    await nc.publish(f"push.{channel}", b"2")
    (m2,) = await c.messages(1)
    assert m2["data"] == 2 and m2["seq"] > m["seq"]


async def test_idempotent_emit_is_delivered_once(start_server, http, nc, channel):
    srv = await start_server()
    c = await srv.client()
    await c.subscribe(channel)
    key = uuid.uuid4().hex
    r1 = await emit(http, srv, channel, {"once": True}, key=key)
    r2 = await emit(http, srv, channel, {"once": True}, key=key)
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["seq"] == r2.json()["seq"] > 0
    # raw emit with the same key, and a batch with per-item keys
    token = srv.token("svc", publish=[">"])
    h = {**bearer(token), "Idempotency-Key": key + "-raw"}
    r3 = await http.post(f"{srv.base}/emit/{channel}", content=b"raw", headers=h)
    r4 = await http.post(f"{srv.base}/emit/{channel}", content=b"raw", headers=h)
    assert r3.json()["seq"] == r4.json()["seq"]
    body = {"messages": [{"channel": channel, "data": i} for i in range(2)]}
    hb = {**bearer(token), "Idempotency-Key": key + "-batch"}
    b1 = await http.post(f"{srv.base}/emit", json=body, headers=hb)
    b2 = await http.post(f"{srv.base}/emit", json=body, headers=hb)
    assert b1.json() == b2.json() and b1.status_code == 202
    # Publisher(msg_id=) and a plain NATS producer with Nats-Msg-Id
    async with Publisher(srv.settings.nats_url) as pub:
        p1 = await pub.publish(channel, "pub", msg_id=key + "-pub")
        p2 = await pub.publish(channel, "pub", msg_id=key + "-pub")
    assert p1 == p2
    for _ in range(2):
        await nc.publish(f"push.{channel}", b'"core"', headers={"Nats-Msg-Id": key + "-core"})
    await nc.flush()
    got = await c.messages(6)
    assert [m["data"] for m in got] == [{"once": True}, "raw", 0, 1, "pub", "core"]
    assert got[0]["seq"] == r1.json()["seq"]
    await c.nothing(0.3)
    # A different key is a different message.
    r5 = await emit(http, srv, channel, {"once": True}, key=key + "-other")
    assert r5.json()["seq"] > r1.json()["seq"]


async def test_history_off(start_server, nc, http, channel):
    prefix, _ = unique("hoff")
    srv = await start_server(history_ttl=0, subject_prefix=prefix)
    assert srv.node.bus.history_enabled is False
    c = await srv.client()
    assert "epoch" not in c.welcome  # no stream, no epoch
    sub = await c.subscribe(channel, since=3, epoch="e1", recovered=False)
    assert "epoch" not in sub
    r = await emit(http, srv, channel, {"x": 1})
    assert r.status_code == 202 and r.json() == {"channel": channel, "seq": None}
    await nc.publish(f"{prefix}.{channel}", b'"core"')
    a, b = await c.messages(2)
    assert "seq" not in a and "seq" not in b
    assert (a["data"], b["data"]) == ({"x": 1}, "core")
    h = bearer(srv.token())
    r = await http.get(f"{srv.base}/history/{channel}", headers=h)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert r.json()["error"] == "unavailable"
    ready = (await http.get(f"{srv.base}/readyz")).json()
    assert ready["ready"] is True and ready["history"] is False


async def test_history_endpoint(start_server, http, nc, channel):
    srv = await start_server(api_keys=["ops:key-0123456789"])
    seqs = []
    async with Publisher(srv.settings.nats_url) as pub:
        for n in range(7):
            seqs.append(await pub.publish(channel, {"n": n}))
        seqs.append(await pub.publish(channel, b"\xff\xfe"))
    url = f"{srv.base}/history/{channel}"
    h = bearer(srv.token("reader", channels=[channel.split(".")[0] + ".*"]))
    r = await http.get(url, headers=h)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["channel"] == channel and page["recovered"] is True and page["more"] is False
    assert [m["seq"] for m in page["messages"]] == seqs
    assert page["messages"][0]["data"] == {"n": 0}
    assert page["messages"][-1] == {"seq": seqs[-1], "data": "//4=", "encoding": "base64"}
    assert page["last_seq"] >= seqs[-1]
    # paging with since and limit
    r = await http.get(url, params={"since": seqs[1], "limit": 3}, headers=h)
    page = r.json()
    assert [m["seq"] for m in page["messages"]] == seqs[2:5] and page["more"] is True
    r = await http.get(url, params={"since": seqs[4], "limit": 3}, headers=h)
    assert [m["seq"] for m in r.json()["messages"]] == seqs[5:8] and r.json()["more"] is False
    r = await http.get(url, params={"since": seqs[-1]}, headers=h)
    assert r.json()["messages"] == [] and r.json()["recovered"] is True
    # epochs: the current one pages as before; another one restarts from the stream's start
    epoch = r.json()["epoch"]
    assert epoch == srv.node.bus.epoch
    r = await http.get(url, params={"since": seqs[4], "epoch": epoch}, headers=h)
    assert [m["seq"] for m in r.json()["messages"]] == seqs[5:] and r.json()["recovered"]
    r = await http.get(url, params={"since": seqs[4], "epoch": "stale"}, headers=h)
    page = r.json()
    assert [m["seq"] for m in page["messages"]] == seqs and page["recovered"] is False
    assert page["epoch"] == epoch
    r = await http.get(url, params={"since": 10**12}, headers=h)
    assert len(r.json()["messages"]) == 8 and r.json()["recovered"] is False
    r = await http.get(url, params={"epoch": "e" * 65}, headers=h)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    # an API key reads any channel
    r = await http.get(url, headers=bearer("key-0123456789"))
    assert r.status_code == 200 and len(r.json()["messages"]) == 8
    # 401: no credential, bad credential, expired token
    for headers in ({}, bearer("nope"), bearer(srv.token(ttl=-120))):
        r = await http.get(url, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    # 403: no subscribe grant (a publish grant is not enough)
    r = await http.get(url, headers=bearer(srv.token("w", channels=["other"], publish=[">"])))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # the user's personal channel is always readable
    r = await http.get(
        f"{srv.base}/history/user.zed", headers=bearer(srv.token("zed", channels=[]))
    )
    assert r.status_code == 200
    # 422: invalid channel name; 400: bad query values
    for bad in ("a..b", "x.*", "x.>", "%24SYS.x"):
        r = await http.get(f"{srv.base}/history/{bad}", headers=h)
        assert r.status_code == 422 and r.json()["error"] == "invalid_channel", bad
    for params in ({"since": -1}, {"limit": 0}, {"since": "x"}, {"limit": "1.5"}):
        r = await http.get(url, params=params, headers=h)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", params


async def test_scan_pages_through_batches_and_refuses_a_stream_without_direct_gets(nc):
    """``scan`` (batch direct gets, ADR-31) reads one subject of a stream past a
    sequence, page by page; a stream without ``allow_direct`` answers "no responders"."""
    prefix, stream = unique("scan")
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], storage="memory", allow_direct=True)
    await js.add_stream(name=stream + "_ND", subjects=[f"{prefix}nd.>"], storage="memory")
    try:
        acks = [await js.publish(f"{prefix}.{'ab'[n % 2]}", b"%d" % n) for n in range(15)]
        a_seqs = [ack.seq for n, ack in enumerate(acks) if n % 2 == 0]
        read = [(raw.seq, raw.data) async for raw in scan(nc, stream, f"{prefix}.a", batch=3)]
        assert read == [(seq, b"%d" % (2 * i)) for i, seq in enumerate(a_seqs)]
        after = a_seqs[4]
        read = [raw.seq async for raw in scan(nc, stream, f"{prefix}.*", after=after, batch=2)]
        assert read == [ack.seq for ack in acks if ack.seq > after]
        assert [raw async for raw in scan(nc, stream, f"{prefix}.none")] == []
        with pytest.raises(nats.errors.NoRespondersError):
            [raw async for raw in scan(nc, stream + "_ND", f"{prefix}nd.a")]
    finally:
        await js.delete_stream(stream)
        await js.delete_stream(stream + "_ND")


async def test_history_reads_leave_no_garbage_cycles(start_server, http, channel):
    """A history read's NATS subscription is freed at once, not by the cyclic GC.

    ``pushsvc serve`` makes full collections rare (``cli.tune_gc``); a batch direct
    get through ``jetstreamext`` left its nats-py subscription in a cycle with its
    message iterator, ~3.7 KiB per read (docs/capacity.md, "Soak").
    """
    from nats.aio.subscription import Subscription

    srv = await start_server()
    async with Publisher(srv.settings.nats_url) as pub:
        seqs = [await pub.publish(channel, {"n": n}) for n in range(3)]
    url, h = f"{srv.base}/history/{channel}", bearer(srv.token())
    with refcounting_only():
        before = sum(isinstance(o, Subscription) for o in gc.get_objects())
        for _ in range(10):
            r = await http.get(url, headers=h)
            assert [m["seq"] for m in r.json()["messages"]] == seqs
        await asyncio.sleep(0.1)  # the subscriptions' tasks end
        assert sum(isinstance(o, Subscription) for o in gc.get_objects()) == before


async def test_history_endpoint_accepts_connection_and_emit_tokens(start_server, http, channel):
    """Authorised like a subscribe: a WebSocket token works, and so does an emit token."""
    srv = await start_server(jwt_audience="web", emit_audience="backend")
    async with Publisher(srv.settings.nats_url) as pub:
        await pub.publish(channel, 1)
    for audience in ("web", "backend"):
        r = await http.get(
            f"{srv.base}/history/{channel}", headers=bearer(srv.token(audience=audience))
        )
        assert r.status_code == 200 and len(r.json()["messages"]) == 1
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(srv.token(audience="x")))
    assert r.status_code == 401
    # a JWT whose sub merely looks like an API key gets no extra rights
    forged = srv.token("apikey:x", channels=[], publish=[">"], audience="web")
    r = await http.get(f"{srv.base}/history/{channel}", headers=bearer(forged))
    assert r.status_code == 403


async def _stream_config(nats_url: str, stream: str) -> Any:
    nc = await nats.connect(nats_url)
    try:
        return (await nc.jetstream().stream_info(stream)).config
    finally:
        await nc.close()


async def test_restart_against_existing_stream(start_server, nats_url, channel):
    prefix, stream = unique("hrst")
    settings = {"subject_prefix": prefix, "stream": stream}
    first = await start_server(**settings)
    async with Publisher(nats_url, prefix=prefix) as pub:
        seq = await pub.publish(channel, "kept")
    await first.stop()
    # same settings: the stream is reused as is
    again = await start_server(**settings)
    # changed settings: the stream is updated, history kept
    changed = await start_server(**settings, history_ttl=60, history_size=20, dedupe_window=30)
    config = await _stream_config(nats_url, stream)
    assert config.max_age == 60 and config.max_msgs_per_subject == 20
    assert config.duplicate_window == 30
    assert config.republish.dest == f"{prefix}-live.>"
    for srv in (again, changed):
        c = await srv.client()
        await c.subscribe(channel, since=0, recovered=True)
        (m,) = await c.messages(1)
        assert m["seq"] == seq and m["data"] == "kept"
    # a dedupe window longer than the TTL is capped to the TTL
    await start_server(**settings, history_ttl=10, dedupe_window=120)
    assert (await _stream_config(nats_url, stream)).duplicate_window == 10


async def test_start_fails_clearly_on_an_incompatible_stream(nats_url):
    """A stream that cannot be updated in place (storage type) stops the start with a reason."""
    prefix, stream = unique("hbad")
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[f"{prefix}.>"], storage="memory")
        settings = Settings.load(
            env={}, jwt_secret="x" * 32, nats_url=nats_url, subject_prefix=prefix, stream=stream
        )
        bus = Bus(settings, on_message=lambda *a: None)
        with pytest.raises(Unavailable) as info:
            await bus.start()
        await bus.close()
        assert stream in str(info.value) and "storage" in str(info.value).lower()
    finally:
        try:
            await nc.jetstream().delete_stream(stream)
        except nats.js.errors.Error:
            pass
        await nc.close()


async def test_a_subscription_is_live_when_acquire_returns(nats_url, nc):
    """Bus.acquire returns only once NATS routes the channel to the node.

    nats-py's flush() can overtake a SUB still in its pending buffer (the PING is
    written straight to the socket); a single flush lost about 1 % of messages
    published from another connection right after subscribing.
    """
    got: dict[str, asyncio.Future[int | None]] = {}

    def on_message(
        channel: str, payload: bytes, seq: int | None, stamp: float | None, publisher: Any
    ) -> None:
        fut = got.get(channel)
        if fut is not None and not fut.done():
            fut.set_result(seq)

    settings = Settings.load(env={}, jwt_secret="x" * 32, nats_url=nats_url)
    bus = Bus(settings, on_message=on_message)
    await bus.start()
    loop = asyncio.get_running_loop()
    try:
        for i in range(1000):
            channel = f"acq{uuid.uuid4().hex[:8]}.c{i}"
            got[channel] = loop.create_future()
            await bus.acquire(channel)
            await nc.publish(f"push.{channel}", b"1")  # another connection, no wait
            assert await asyncio.wait_for(got[channel], 2) is not None, channel
            await bus.release(channel)
    finally:
        await bus.close()
