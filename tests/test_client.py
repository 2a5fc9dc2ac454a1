"""pushsvc.client, the async Python client: real uvicorn servers, real NATS, real sockets.

Every wait is bounded; servers restart on the same port (the client's URL does not
change) and, for the fresh-store case, on a new nats-server store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import nats
import pytest
from helpers import until

from pushsvc import Publisher
from pushsvc.client import (
    Client,
    ClientClosed,
    CommandError,
    Connected,
    Disconnected,
    Join,
    Leave,
    PushsvcError,
    Stopped,
    Subscribed,
    Unauthorized,
    Unsubscribed,
)
from pushsvc.client.closecodes import RATE_LIMITED_DELAY, reconnect_delay
from pushsvc.server.embedded import EmbeddedNats


async def take(sub: Any, n: int, timeout: float = 15) -> list[Any]:
    """The next ``n`` messages of a subscription (bounded)."""
    async with asyncio.timeout(timeout):
        return [await anext(sub) for _ in range(n)]


def recorder() -> tuple[list[Any], Callable[[Any], None]]:
    events: list[Any] = []
    return events, events.append


def kinds(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def test_subscribe_publish_and_iterate(start_server, channel):
    srv = await start_server()
    events, on_event = recorder()
    token = srv.token("ann", publish=[">"])
    async with Client(srv.base, token=token, on_event=on_event) as client:
        sub = await client.subscribe(channel)
        assert sub.state == "subscribed" and client.state == "connected"
        assert await client.subscribe(channel) is sub  # one subscription per channel
        seq = await client.publish(channel, {"n": 1})
        await client.publish(channel, "text")
        m1, m2 = await take(sub, 2)
        assert (m1.channel, m1.data, m1.seq, m1.pattern) == (channel, {"n": 1}, seq, None)
        assert m1.epoch == client.welcome.epoch and m2.data == "text" and m2.seq > seq
        assert m1.to_frame() == {
            "type": "message",
            "channel": channel,
            "data": {"n": 1},
            "seq": seq,
            "publisher": {"user": "ann", "client": client.welcome.client},  # server-stamped
        }
        await sub.unsubscribe()
        assert channel not in client.subscriptions
        with pytest.raises(StopAsyncIteration):
            await anext(sub)
    assert client.state == "disconnected" and client.error is None
    assert [type(e).__name__ for e in events[:2]] == ["Connecting", "Connected"]
    assert events[-1] == Disconnected(1000, "client close", False, None)


async def test_binary_payloads_and_refusals(start_server, nc, channel):
    srv = await start_server()
    async with Client(srv.base, token=srv.token("ann", channels=[channel])) as client:
        sub = await client.subscribe(channel)
        await nc.publish(f"push.{channel}", b"\x00\x01\xff")
        (m,) = await take(sub, 1)
        assert m.encoding == "base64" and m.payload == b"\x00\x01\xff"
        with pytest.raises(CommandError) as refused:
            await client.subscribe("other.channel")
        assert refused.value.code == "forbidden" and refused.value.channel == "other.channel"
        with pytest.raises(CommandError) as refused:
            await client.publish(channel, 1)  # no publish grant
        assert refused.value.code == "forbidden"
        with pytest.raises(CommandError) as refused:
            await client.subscribe("bad..name")
        assert refused.value.code == "invalid_channel"
        assert list(client.subscriptions) == [channel]  # the connection stayed up
        with pytest.raises(ValueError):
            await client.subscribe(channel + "x", since=-1)


async def test_resume_across_a_restart_on_the_same_store(start_server, nats_url, channel):
    srv = await start_server()
    port = srv.settings.port
    events, on_event = recorder()
    async with (
        Client(srv.base, token=srv.token("ann"), on_event=on_event) as client,
        Publisher(nats_url) as pub,
    ):
        sub = await client.subscribe(channel)
        seqs = [await pub.publish(channel, {"n": n}) for n in (1, 2)]
        got = await take(sub, 2)
        await srv.stop()  # graceful drain: closed with 1012
        await until(lambda: client.state == "connecting")
        seqs += [await pub.publish(channel, {"n": n}) for n in (3, 4)]  # while no server runs
        await start_server(port=port)
        seqs.append(await pub.publish(channel, {"n": 5}))
        got += await take(sub, 3, timeout=60)
        assert sub.recovered is True and sub.duplicates == 0
    assert [m.data["n"] for m in got] == [1, 2, 3, 4, 5] and [m.seq for m in got] == seqs
    (drained, *_) = kinds(events, Disconnected)
    assert (drained.code, drained.reconnect) == (1012, True) and drained.delay <= 2
    assert len(kinds(events, Connected)) == 2


async def test_resume_on_a_fresh_store_is_recovered_false_and_drops_nothing(
    own_nats, start_server, channel, tmp_path
):
    srv = await start_server(nats_url=own_nats.url)
    port = srv.settings.port
    events, on_event = recorder()
    client = Client(srv.base, token=srv.token("ann"), on_event=on_event)
    fresh = None
    try:
        await client.connect()
        sub = await client.subscribe(channel)
        async with Publisher(own_nats.url) as pub:
            old = [await pub.publish(channel, {"n": n}) for n in range(1, 6)]
        await take(sub, 5)
        old_epoch = sub.epoch
        await srv.stop()
        own_nats.stop()
        fresh = EmbeddedNats(port=own_nats.port, data_dir=tmp_path / "fresh").start()
        await start_server(nats_url=fresh.url)  # another node creates the new stream
        async with Publisher(fresh.url) as pub:
            new = [await pub.publish(channel, {"n": n}) for n in (6, 7, 8)]
            assert new[-1] <= old[-1]  # sequences restarted: the old position looks current
            await start_server(port=port, nats_url=fresh.url)  # the client's node is back
            got = await take(sub, 3, timeout=60)
            new.append(await pub.publish(channel, {"n": 9}))
            got += await take(sub, 1)
        assert [(m.data["n"], m.seq) for m in got] == list(zip([6, 7, 8, 9], new, strict=True))
        assert sub.recovered is False and sub.duplicates == 0
        assert sub.epoch != old_epoch and {m.epoch for m in got} == {sub.epoch}
        resumed = [e for e in kinds(events, Subscribed) if e.channel == channel][-1]
        assert (resumed.recovered, resumed.epoch) == (False, sub.epoch)
    finally:
        await client.close()
        await srv.stop()
        if fresh is not None:
            fresh.cleanup()


async def revoke(nats_url: str, jti: str) -> None:
    """The revocation message operators send: close that token's sessions with 4001."""
    nc = await nats.connect(nats_url)
    try:
        await nc.publish("push-control.disconnect", json.dumps({"jti": jti, "ttl": 60}).encode())
    finally:
        await nc.drain()


async def test_4001_without_get_token_stops(start_server, nats_url, channel):
    srv = await start_server()
    jti = uuid.uuid4().hex
    events, on_event = recorder()
    client = Client(srv.base, token=srv.token("ann", jti=jti), on_event=on_event)
    async with client:
        sub = await client.subscribe(channel)
        await revoke(nats_url, jti)
        with pytest.raises(Unauthorized) as stopped:
            await take(sub, 1)
        assert stopped.value.close_code == 4001 and client.state == "disconnected"
        with pytest.raises(Unauthorized):
            await client.publish(channel, 1)
    assert client.error is stopped.value
    assert kinds(events, Disconnected)[-1].reconnect is False
    # a token refused at once stops too, with the server's reason
    bad = Client(srv.base, token="not-a-jwt")
    async with bad:
        with pytest.raises(Unauthorized) as refused:
            await bad.ready(timeout=10)
    assert refused.value.close_code == 4001 and srv.ws_url in str(refused.value)


async def test_4001_with_get_token_reconnects_and_resumes(start_server, nats_url, channel):
    srv = await start_server()
    jtis: list[str] = []

    async def get_token() -> str:  # an async token source (e.g. an HTTP call to the backend)
        jtis.append(uuid.uuid4().hex)
        return srv.token("ann", jti=jtis[-1])

    events, on_event = recorder()
    async with (
        Client(srv.base, get_token=get_token, on_event=on_event) as client,
        Publisher(nats_url) as pub,
    ):
        sub = await client.subscribe(channel)
        first = await pub.publish(channel, 1)
        await take(sub, 1)
        await revoke(nats_url, jtis[0])
        await until(lambda: bool(kinds(events, Disconnected)))
        second = await pub.publish(channel, 2)  # while it reconnects
        (m,) = await take(sub, 1, timeout=30)
        assert (m.data, m.seq) == (2, second) and second > first
        assert len(jtis) == 2 and kinds(events, Disconnected)[0].code == 4001
        assert client.state == "connected" and sub.duplicates == 0


async def test_get_token_refreshes_before_exp_and_unauthorized_stops(start_server, channel):
    srv = await start_server()
    calls = 0

    def get_token() -> str:  # a plain function works too
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Unauthorized("the user logged out")
        return srv.token("ann", ttl=4)  # refreshed halfway: after about 2 s

    events, on_event = recorder()
    async with Client(srv.base, get_token=get_token, on_event=on_event) as client:
        sub = await client.subscribe(channel)
        first_exp = client.welcome.exp
        await until(lambda: calls == 2, within=10)
        await until(lambda: client.state == "disconnected", within=10)  # the third call
        assert kinds(events, Connected)[0].exp == first_exp
        assert [e.code for e in kinds(events, Disconnected)] == [1000]  # refreshed in place
        with pytest.raises(Unauthorized, match="logged out"):
            await anext(sub)


async def test_wildcard_subscriptions(start_server, nc, channel):
    srv = await start_server()
    base = channel.split(".")[0]
    async with Client(srv.base, token=srv.token("ann")) as client:
        star = await client.subscribe(f"{base}.*")
        plain = await client.subscribe(f"{base}.eu")
        for sub_channel in ("eu", "us", "eu"):
            await nc.publish(f"push.{base}.{sub_channel}", json.dumps(sub_channel).encode())
        got = await take(star, 3)
        assert [(m.channel, m.pattern) for m in got] == [
            (f"{base}.eu", f"{base}.*"),
            (f"{base}.us", f"{base}.*"),
            (f"{base}.eu", f"{base}.*"),
        ]
        mine = await take(plain, 2)  # its own copy of each eu message (NATS semantics)
        assert [(m.seq, m.pattern) for m in mine] == [(got[0].seq, None), (got[2].seq, None)]
        assert star.duplicates == plain.duplicates == 0


async def test_server_side_subscriptions_resume_through_the_auth_frame(
    start_server, nats_url, channel
):
    srv = await start_server()
    port = srv.settings.port
    pattern = f"{channel}.*"
    token = srv.token("ann", channels=[], extra={"subs": [channel, pattern]})
    events, on_event = recorder()
    async with (
        Client(srv.base, token=token, on_event=on_event) as client,
        Publisher(nats_url) as pub,
    ):
        welcome = await client.ready(timeout=10)
        assert welcome.subs == [channel, pattern]
        subs = client.subscriptions
        assert [s.server for s in subs.values()] == [True, True]
        direct = await client.subscribe(channel)  # no command: the server's subscription
        assert direct is subs[channel]
        await until(lambda: all(s.state == "subscribed" for s in subs.values()))  # live
        await pub.publish(channel, 1)
        await pub.publish(f"{channel}.x", 2)
        assert [m.data for m in await take(direct, 1)] == [1]
        assert [(m.data, m.pattern) for m in await take(subs[pattern], 1)] == [(2, pattern)]
        await srv.stop()
        await until(lambda: client.state == "connecting")
        await pub.publish(channel, 3)  # missed while away, replayed from the auth frame's subs
        await pub.publish(f"{channel}.y", 4)
        await start_server(port=port)
        assert [m.data for m in await take(direct, 1, timeout=60)] == [3]
        assert [m.data for m in await take(subs[pattern], 1)] == [4]
        resumed = [e for e in kinds(events, Subscribed) if e.server][-2:]
        assert [(e.channel, e.recovered) for e in resumed] == [(channel, True), (pattern, True)]
        await subs[pattern].unsubscribe()  # an ordinary subscription: the app may leave it
        await pub.publish(f"{channel}.z", 5)
        await pub.publish(channel, 6)
        assert [m.data for m in await take(direct, 1)] == [6]
        assert list(client.subscriptions) == [channel]
    assert not kinds(events, Unsubscribed)


async def test_presence_and_join_leave(start_server, channel):
    room = f"room.{channel.split('.')[0]}"
    srv = await start_server(presence_channels=["room.>"], join_leave_channels=["room.>"])
    events, on_event = recorder()
    ann_token = srv.token("ann", extra={"presence": ["room.>"], "info": {"name": "Ann"}})
    async with Client(srv.base, token=ann_token, on_event=on_event) as ann:
        await ann.subscribe(room)
        async with Client(srv.base, token=srv.token("bob")) as bob:
            await bob.subscribe(room)
            await until(lambda: len(kinds(events, Join)) == 2)
            who = await ann.presence(room)
            assert (who.users, who.clients_total, who.truncated) == (2, 2, False)
            assert sorted(c.user for c in who.clients) == ["ann", "bob"]
            assert {c.user: c.info for c in who.clients}["ann"] == {"name": "Ann"}
            stats = await ann.presence_stats(room)
            assert (stats.channel, stats.clients, stats.users) == (room, 2, 2)
            with pytest.raises(CommandError) as refused:
                await bob.presence(room)  # no presence grant
            assert refused.value.code == "forbidden"
        await until(lambda: bool(kinds(events, Leave)))
    assert [(e.user, e.channel) for e in kinds(events, Join)] == [("ann", room), ("bob", room)]
    assert [(e.user, e.info) for e in kinds(events, Leave)] == [("bob", None)]


async def test_heartbeat_pongs_keep_the_connection(start_server, channel):
    srv = await start_server(ping_interval=0.2, pong_timeout=0.3)
    events, on_event = recorder()
    async with Client(srv.base, token=srv.token("ann"), on_event=on_event) as client:
        await client.subscribe(channel)
        await asyncio.sleep(1.5)  # 7 pings: each unanswered one would close with 4010
        assert client.state == "connected"
    assert [e.code for e in kinds(events, Disconnected)] == [1000]


async def test_connect_failures_retry_and_refusals_stop(start_server, channel):
    from pushsvc.server.embedded import free_port

    port = free_port()
    events, on_event = recorder()
    client = Client(f"http://127.0.0.1:{port}", token="t", on_event=on_event)
    async with client:
        await until(lambda: len(kinds(events, Disconnected)) >= 2, within=10)
        failed = kinds(events, Disconnected)[0]
        assert failed.reconnect and failed.reason == "connection refused" and failed.error
        assert client.state == "connecting"
    srv = await start_server()
    wrong = Client(f"{srv.base}/nowhere/ws", token=srv.token())
    async with wrong:
        with pytest.raises(Stopped) as stopped:
            await wrong.subscribe(channel)
    # Starlette answers a WebSocket handshake on an unknown path 403: not worth retrying
    assert stopped.value.status == 403 and "refused the handshake: 403" in str(stopped.value)


@pytest.mark.parametrize(
    ("code", "renewable", "reconnects"),
    [
        (1000, False, True),
        (1001, False, True),
        (1006, False, True),
        (1009, True, False),
        (1011, False, True),
        (1012, False, True),
        (4001, False, False),
        (4001, True, True),
        (4003, True, False),
        (4009, False, True),
        (4010, False, True),
        (4011, True, False),
        (4012, False, True),
        (4100, False, True),
        (4499, False, True),
        (4500, True, False),
        (4999, False, False),
    ],
)
def test_close_code_table(code, renewable, reconnects):
    """docs/protocol.md "Close codes" and the server API's 4011/4012/4100-4999 rule."""
    delay = reconnect_delay(code, 3, renewable=renewable, rand=lambda: 0.999)
    assert (delay is not None) == reconnects
    if reconnects:
        assert 0 <= delay <= 0.5 * 2**3  # full jitter within the attempt's window


def test_close_code_delays():
    assert reconnect_delay(4008, 0, renewable=False, rand=lambda: 0.0) == RATE_LIMITED_DELAY
    assert reconnect_delay(1012, 0, renewable=False, rand=lambda: 0.5) == 1.0  # 0..2 s first
    assert reconnect_delay(1006, 10, renewable=False, rand=lambda: 0.999) <= 20  # capped


async def test_a_full_buffer_pauses_reading_and_loses_nothing(start_server, nc, channel):
    srv = await start_server()
    async with Client(srv.base, token=srv.token("ann"), buffer_size=2) as client:
        stream = client.events()
        sub = await client.subscribe(channel)
        for n in range(50):
            await nc.publish(f"push.{channel}", str(n).encode())
        await nc.flush()
        await asyncio.sleep(0.3)
        assert sub.buffered == 2  # the reader waits for the application
        got = await take(sub, 50)
        assert [m.data for m in got] == list(range(50)) and sub.duplicates == 0
    seen = [type(e).__name__ async for e in stream]  # ends with the client
    assert seen == ["Connected", "Subscribed", "Disconnected"]


class ScriptedServer:
    """A real uvicorn serving a tiny ASGI app that welcomes each connection and then
    closes it with the next code of a script: the server API's close codes (issue 21)
    seen from the wire before the server sends them."""

    def __init__(self, codes: list[int | None], frames: list[dict[str, Any]] | None = None) -> None:
        self.codes = codes  # None: say nothing at all (no welcome)
        self.frames = frames or []  # sent after welcome, in one batched text frame
        self.connections = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()  # the auth frame
        self.connections += 1
        if self.codes and self.codes[0] is None:
            self.codes.pop(0)
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        welcome = {"type": "welcome", "client": "c", "user": "u", "ping_interval": 25, "exp": 2e9}
        batch = "\n".join(json.dumps(f) for f in [welcome, *self.frames])
        await send({"type": "websocket.send", "text": batch})
        if self.codes:
            code = self.codes.pop(0)
            await send({"type": "websocket.close", "code": code, "reason": f"scripted {code}"})
        else:
            while (await receive())["type"] != "websocket.disconnect":
                pass


@pytest.fixture
async def scripted() -> Any:
    import contextlib

    import uvicorn

    from pushsvc.server.embedded import free_port

    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(
        codes: list[int | None], frames: list[dict[str, Any]] | None = None
    ) -> tuple[ScriptedServer, str]:
        app = ScriptedServer(codes, frames)
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        await until(lambda: server.started)
        return app, f"http://127.0.0.1:{port}"

    yield start
    for server, task in servers:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("code", "reconnects"), [(4012, True), (4100, True), (4011, False), (4500, False)]
)
async def test_server_api_close_codes_from_the_wire(scripted, code, reconnects):
    app, url = await scripted([code])
    events, on_event = recorder()
    async with Client(url, token="t", on_event=on_event) as client:
        await until(lambda: bool(kinds(events, Disconnected)))
        (closed,) = kinds(events, Disconnected)
        assert (closed.code, closed.reason, closed.reconnect) == (
            code,
            f"scripted {code}",
            reconnects,
        )
        if reconnects:
            await until(lambda: app.connections == 2 and client.state == "connected", within=10)
        else:
            assert client.state == "disconnected" and client.error.close_code == code
            with pytest.raises(Stopped):
                await client.subscribe("news")


async def test_no_welcome_within_connect_timeout_closes_4010_and_retries(scripted):
    app, url = await scripted([None])
    events, on_event = recorder()
    async with Client(url, token="t", on_event=on_event, connect_timeout=0.5) as client:
        await client.ready(timeout=10)  # the second connection is welcomed
    (timed_out, _) = kinds(events, Disconnected)
    assert (timed_out.code, timed_out.reason, timed_out.reconnect) == (
        4010,
        "connect timeout",
        True,
    )
    assert app.connections == 2


async def test_calls_need_a_started_client():
    client = Client("http://127.0.0.1:9", token="t")
    with pytest.raises(PushsvcError) as not_started:
        await client.subscribe("news")
    assert not_started.value.code == "not_connected"
    await client.close()
    with pytest.raises(ClientClosed):
        await client.connect()


async def test_subscribed_and_unsubscribed_sent_by_the_server(scripted):
    """The server API's subscribe/unsubscribe (issue 21) reach a live connection as
    `subscribed`/`unsubscribed` frames nobody asked for: handled like server-side subs."""
    frames = [
        {"type": "subscribed", "channel": "alerts.*", "epoch": "e1"},
        {"type": "message", "channel": "alerts.eu", "pattern": "alerts.*", "data": 1, "seq": 7},
        {"type": "subscribed", "channel": "news"},
        {"type": "unsubscribed", "channel": "news", "reason": "by the server"},
        {"type": "a_frame_type_from_the_future", "x": 1},
    ]
    _, url = await scripted([], frames)
    events, on_event = recorder()
    async with Client(url, token="t", on_event=on_event) as client:
        await until(lambda: bool(kinds(events, Unsubscribed)))
        alerts = client.subscriptions["alerts.*"]
        assert alerts.server and alerts.epoch == "e1" and list(client.subscriptions) == ["alerts.*"]
        (m,) = await take(alerts, 1)
        assert (m.channel, m.pattern, m.data, m.seq, m.epoch) == (
            "alerts.eu",
            "alerts.*",
            1,
            7,
            "e1",
        )
    assert [(e.channel, e.server) for e in kinds(events, Subscribed)] == [
        ("alerts.*", True),
        ("news", True),
    ]
    assert kinds(events, Unsubscribed) == [Unsubscribed("news", "by the server")]


async def test_refresh_without_a_grant_ends_that_subscription(start_server, channel):
    srv = await start_server()
    other = f"{channel}.other"
    events, on_event = recorder()
    token = srv.token("ann", channels=[channel, other])
    async with Client(srv.base, token=token, on_event=on_event) as client:
        lost = await client.subscribe(channel)
        kept = await client.subscribe(other)
        exp = await client.refresh(srv.token("ann", channels=[other], ttl=600))
        assert exp < client.welcome.exp  # the new token's (600 s, not 3600 s)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(lost), 10)
        assert (lost.state, lost.reason) == ("unsubscribed", "forbidden")
        assert kept.state == "subscribed" and list(client.subscriptions) == [other]
    assert kinds(events, Unsubscribed) == [Unsubscribed(channel, "forbidden")]
