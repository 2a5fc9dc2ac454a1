"""SSE (``GET /sse``), HTTP-streaming (``POST /stream``) and ``POST /sse/commands``.

Real uvicorn, real NATS, real sockets: the streams are read with httpx as any
non-browser client would (the browser's EventSource is in the JS package's tests).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from helpers import until


class Events:
    """An open event stream: parsed SSE events (``event``, ``id``, ``data``) or NDJSON lines."""

    def __init__(self, response: httpx.Response, kind: str) -> None:
        self.response = response
        self.kind = kind
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.raw = ""
        self.backlog: list[dict[str, Any]] = []  # read, not yet asked for
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        buffer = ""
        async for text in self.response.aiter_text():
            self.raw += text
            buffer += text
            if self.kind == "sse":
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    event: dict[str, Any] = {}
                    for line in block.split("\n"):
                        if line.startswith(":") or not line:
                            event.setdefault("comment", True)
                            continue
                        name, _, value = line.partition(": ")
                        event[name] = value
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    await self.queue.put(event)
            else:
                while "\n" in buffer:
                    line, buffer = buffer.split("\n", 1)
                    await self.queue.put({"data": json.loads(line)})
        await self.queue.put({"end": True})

    async def next(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        """The first unclaimed event whose frame type is ``kind`` (others stay for later)."""
        for event in self.backlog:
            if event["data"].get("type") == kind:
                self.backlog.remove(event)
                return event
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                if event.get("end"):
                    raise AssertionError(f"stream ended waiting for {kind}")
                data = event.get("data")
                if isinstance(data, dict):
                    if data.get("type") == kind:
                        return event
                    self.backlog.append(event)


@asynccontextmanager
async def sse(
    base: str, *channels: str, headers: dict[str, str] | None = None, **params: str
) -> AsyncIterator[Events]:
    query = [("channel", c) for c in channels] + list(params.items())
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
        client.stream("GET", base + "/sse", params=query, headers=headers or {}) as response,
    ):
        assert response.status_code == 200, await response.aread()
        events = Events(response, "sse")
        try:
            yield events
        finally:
            events.task.cancel()


async def test_sse_stream_delivers_messages_with_ids_and_resumes_from_last_event_id(
    start_server, nc, channel
):
    srv = await start_server()
    token = srv.token("ann", channels=[channel])
    async with sse(srv.base, channel, headers={"Authorization": f"Bearer {token}"}) as events:
        r = events.response
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache, no-store"
        assert r.headers["x-accel-buffering"] == "no"
        welcome = await events.next("welcome")
        assert welcome["event"] == "welcome" and welcome["data"]["session"]
        assert welcome["data"]["session"] != welcome["data"]["client"]
        await events.next("subscribed")
        for i in range(3):
            await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
        got = [await events.next("message") for _ in range(3)]
        assert [e["data"]["data"]["i"] for e in got] == [0, 1, 2]
        assert "event" not in got[0]  # onmessage gets it
        epoch = welcome["data"]["epoch"]
        assert [e["id"] for e in got] == [f"{epoch}:{e['data']['seq']}" for e in got]
        assert events.raw.startswith("retry: 2000\n")
        last_id = got[1]["id"]
    # while away: two more
    for i in (3, 4):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": last_id}
    async with sse(srv.base, channel, headers=headers) as events:
        sub = await events.next("subscribed")
        assert sub["data"]["recovered"] is True
        got = [await events.next("message") for _ in range(3)]
        assert [e["data"]["data"]["i"] for e in got] == [2, 3, 4]  # nothing lost, no duplicate


async def test_refusals_are_plain_http_before_the_stream(start_server, http, channel):
    srv = await start_server(max_connections_per_user=1)
    url = srv.base + "/sse"
    assert (await http.get(url, params={"channel": channel})).status_code == 401
    bad = await http.get(url, params={"channel": channel, "token": "nope"})
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
    narrow = srv.token("bob", channels=["other.*"])
    forbidden = await http.get(url, params={"channel": channel, "token": narrow})
    assert forbidden.status_code == 403
    assert "token" not in forbidden.text.lower() or narrow not in forbidden.text
    none = await http.get(url, params={"token": srv.token("bob")})
    assert none.status_code == 400
    bad_id = await http.get(
        url, params={"channel": channel, "token": srv.token("bob"), "last_event_id": "x"}
    )
    assert bad_id.status_code == 400
    # the per-user cap counts every transport: a WebSocket holds bob's one slot
    ws = await srv.client(srv.token("bob"))
    capped = await http.get(url, params={"channel": channel, "token": srv.token("bob")})
    assert capped.status_code == 429
    await ws.close()


async def test_commands_over_post_answer_on_the_stream_and_tickets_are_single_use(
    start_server, http, nc, channel
):
    srv = await start_server()
    token = srv.token("cat", channels=[f"{channel}.>", channel], publish=[f"{channel}.>"])
    minted = await http.post(srv.base + "/sse/ticket", headers={"Authorization": f"Bearer {token}"})
    assert minted.status_code == 200, minted.text
    ticket = minted.json()["ticket"]
    async with sse(srv.base, channel, ticket=ticket) as events:
        session = (await events.next("welcome"))["data"]["session"]
        await events.next("subscribed")
        body = {
            "session": session,
            "commands": [
                {"op": "subscribe", "channel": f"{channel}.b", "id": 1},
                {"op": "publish", "channel": f"{channel}.b", "data": {"x": 1}, "id": 2},
                {"op": "subscribe", "channel": "elsewhere", "id": 3},
            ],
        }
        posted = await http.post(srv.base + "/sse/commands", json=body)
        assert posted.status_code == 202, posted.text
        assert (await events.next("subscribed"))["data"]["id"] == 1
        assert (await events.next("published"))["data"]["id"] == 2
        assert (await events.next("message"))["data"]["data"] == {"x": 1}
        error = await events.next("error")
        assert error["event"] == "error" and error["data"]["code"] == "forbidden"
        unknown = await http.post(
            srv.base + "/sse/commands", json={"session": session + "x", "commands": []}
        )
        assert unknown.status_code == 404
    reused = await http.get(srv.base + "/sse", params={"channel": channel, "ticket": ticket})
    assert reused.status_code == 401


async def test_commands_reach_a_session_on_another_node(start_server, http, channel):
    a = await start_server()
    b = await start_server()
    token = a.token("dan", channels=[">"], publish=[">"])
    async with sse(a.base, channel, token=token) as events:
        session = (await events.next("welcome"))["data"]["session"]
        await events.next("subscribed")
        body = {
            "session": session,
            "commands": [{"op": "publish", "channel": channel, "data": {"via": "b"}, "id": 9}],
        }
        posted = await http.post(b.base + "/sse/commands", json=body)
        assert posted.status_code == 202, posted.text
        assert (await events.next("published"))["data"]["id"] == 9
        assert (await events.next("message"))["data"]["data"] == {"via": "b"}
        gone = await http.post(
            b.base + "/sse/commands", json={"session": "ffffffff.nobody", "commands": []}
        )
        assert gone.status_code == 404


async def test_http_stream_ndjson_and_mixed_transports_on_one_channel(start_server, nc, channel):
    srv = await start_server()
    token = srv.token("eve")
    ws = await srv.client(token)
    await ws.subscribe(channel)
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
        client.stream(
            "POST",
            srv.base + "/stream",
            json={"channels": [channel]},
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        events = Events(response, "stream")
        try:
            await events.next("subscribed")
            for i in range(3):
                await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
            got = [(await events.next("message"))["data"] for _ in range(3)]
            assert [m["data"]["i"] for m in got] == [0, 1, 2]
            assert all(m["id"].endswith(f":{m['seq']}") for m in got)
            assert [m["data"]["i"] for m in await ws.messages(3)] == [0, 1, 2]
            # a second channel: messages lose their ids, position lines carry them
            r = await client.post(
                srv.base + "/sse/commands",
                json={
                    "session": (await events.next("welcome"))["data"]["session"],
                    "commands": [{"op": "subscribe", "channel": f"{channel}.b", "id": 1}],
                },
            )
            assert r.status_code == 202, r.text
            await events.next("subscribed")
            for i in range(3, 7):
                name = channel if i % 2 else f"{channel}.b"
                await nc.publish(f"push.{name}", json.dumps({"i": i}).encode())
            got = [(await events.next("message"))["data"] for _ in range(4)]
            assert sorted(m["data"]["i"] for m in got) == [3, 4, 5, 6]
            assert not any("id" in m for m in got)
            last = max(m["seq"] for m in got)
            while not (position := (await events.next("position"))["data"]["id"]).endswith(
                f":{last}"
            ):
                assert int(position.rsplit(":", 1)[1]) < last
            # drain: the stream ends with a close frame, code 1012, reconnect
            srv.node.hub.close_all(1012, "service restart")
            close = await events.next("close")
            assert close["data"]["code"] == 1012 and close["data"]["reconnect"] is True
        finally:
            events.task.cancel()


@pytest.mark.parametrize("path", ["/sse"])
async def test_sse_close_event_on_drain(start_server, channel, path):
    srv = await start_server()
    async with sse(srv.base, channel, token=srv.token("fay")) as events:
        await events.next("subscribed")
        srv.node.hub.close_all(1012, "service restart")
        close = await events.next("close")
        assert close["event"] == "close" and close["data"]["code"] == 1012
        async with asyncio.timeout(5):
            await events.task  # the body ended


async def test_a_pattern_stream_resumes_three_interleaved_channels_from_one_id(
    start_server, nc, channel
):
    """Three channels published interleaved under one wildcard subscription (one NATS
    subscription, so stream order): the event ids only grow, and resuming from one
    of them gives exactly the messages after it, on every channel."""
    srv = await start_server()
    token = srv.token("gus")
    pattern = f"{channel}.*"
    names = [f"{channel}.{k}" for k in range(3)]
    async with sse(srv.base, pattern, token=token) as events:
        await events.next("subscribed")
        for i in range(60):
            await nc.publish(f"push.{names[i % 3]}", json.dumps({"i": i}).encode())
        got = [await events.next("message") for _ in range(60)]
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 60
    assert [e["data"]["data"]["i"] for e in got] == list(range(60))
    assert {e["data"]["pattern"] for e in got} == {pattern}
    headers = {"Last-Event-ID": got[23]["id"]}
    async with sse(srv.base, pattern, token=token, headers=headers) as events:
        assert (await events.next("subscribed"))["data"]["recovered"] is True
        again = [await events.next("message") for _ in range(36)]
        with pytest.raises(TimeoutError):
            await events.next("message", timeout=0.3)  # and nothing twice
    assert [e["data"]["data"]["i"] for e in again] == list(range(24, 60))


async def test_slow_sse_consumer_is_closed_4009_and_released_while_others_receive(
    start_server, nc, channel
):
    """A stream whose reader stopped reading fills the kernel's and the server's
    buffers: it is closed 4009 (slow consumer) and its buffer released, while a
    reading stream on the same channel gets everything."""
    srv = await start_server(send_queue_bytes=64 * 1024, send_timeout=1.0)
    token = srv.token("hal")
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.settings.port)
    writer.write(f"GET /sse?channel={channel}&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"event: subscribed")  # then never read again
    stuck = next(c for c in srv.node.hub.clients if c.transport.name == "sse")
    payload = json.dumps({"pad": "x" * 4000}).encode()
    async with sse(srv.base, channel, token=srv.token("ivy")) as events:
        await events.next("subscribed")
        sent = 0
        while not stuck.closed and sent < 3000:
            await nc.publish(f"push.{channel}", payload)
            sent += 1
            if sent % 50 == 0:
                await nc.flush()
                await asyncio.sleep(0.01)
        await nc.flush()
        for _ in range(100):
            if stuck.closed:
                break
            await asyncio.sleep(0.05)
        assert stuck.closed and stuck.close_code == 4009
        assert stuck.buffered_bytes == 0 and stuck not in srv.node.hub.clients
        got = [await events.next("message", timeout=30) for _ in range(sent)]
        assert len(got) == sent
    writer.close()


async def test_a_stream_on_three_channels_resumes_exactly_from_any_id_it_was_given(
    start_server, nc, channel
):
    """Three plain channels are three NATS subscriptions, which nats-py hands over
    each in turn, so messages reach the stream out of stream order. The messages
    carry no id; id-only blocks (the node's watermark) do. Wherever the stream is
    cut, resuming from the last id the browser kept gives every message it had not
    got; cut after an id block (where a write ends), none it had."""
    srv = await start_server()
    token = srv.token("hal")
    names = [f"{channel}.{k}" for k in range(3)]
    total = 300
    async with sse(srv.base, *names, token=token) as events:
        for _ in names:
            await events.next("subscribed")
        for i in range(total):
            await nc.publish(f"push.{names[i % 3]}", json.dumps({"i": i}).encode())
        await nc.flush()
        await until(
            lambda: events.raw.count('"type":"message"') == total and events.raw.endswith("\n\n"),
            within=10,
        )
        await asyncio.sleep(0.2)  # the last id block
        blocks = [b for b in events.raw.split("\n\n") if b and not b.startswith((":", "retry"))]
    seqs: dict[int, int] = {}  # i -> seq
    order: list[int] = []  # seqs in the order the stream carried them
    cuts: list[tuple[int, int, bool]] = []  # (messages received, last id's seq, at an id)
    last_id = 0
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        if "data" in fields and "event" not in fields:
            assert "id" not in fields  # a message of a stream on several channels
            frame = json.loads(fields["data"])
            seqs[frame["data"]["i"]] = frame["seq"]
            order.append(frame["seq"])
        elif set(fields) == {"id"}:
            seq = int(fields["id"].rsplit(":", 1)[1])
            assert seq >= last_id
            last_id = seq
        cuts.append((len(order), last_id, set(fields) == {"id"}))
    assert len(order) == total and cuts[-1][1] == max(order)
    assert order != sorted(order), "the stream carried them in stream order: nothing was tested"
    everything = set(order)
    for received, kept, at_id in cuts:
        got = set(order[:received])
        replayed = {s for s in everything if s > kept}
        assert got | replayed == everything, f"cut after {received}: some lost"
        if at_id:
            assert not got & replayed, f"cut after {received}: {sorted(got & replayed)[:5]} twice"
    # and the server replays exactly that from a kept id
    received, kept, _ = next(c for c in cuts if 100 < c[0] and c[2])
    epoch = (
        blocks
        and json.loads(
            next(b for b in blocks if b.startswith("event: welcome")).split("data: ", 1)[1]
        )["epoch"]
    )
    headers = {"Last-Event-ID": f"{epoch}:{kept}"}
    want = sorted(s for s in everything if s > kept)
    async with sse(srv.base, *names, token=token, headers=headers) as events:
        for _ in names:
            assert (await events.next("subscribed"))["data"]["recovered"] is True
        again = [await events.next("message") for _ in want]
        with pytest.raises(TimeoutError):
            await events.next("message", timeout=0.3)
    assert sorted(e["data"]["seq"] for e in again) == want
