"""Fan-out engine (issue #3): slow consumers, coalescing, send timeout, exact buffer accounting.

Behaviour, not timing: real uvicorn and real sockets, except the byte-accounting
tests, which drive a :class:`~pushsvc.core.client.Client` with an ASGI ``send`` gated
by an :class:`asyncio.Event` (the same way uvicorn's send waits for its
``writable`` event under backpressure).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import SECRET
from prometheus_client import REGISTRY
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from pushsvc.auth.tokens import Authenticator, AuthError, Principal, mint_token
from pushsvc.config.settings import Settings
from pushsvc.core import commands
from pushsvc.core.client import Client
from pushsvc.core.hub import Hub
from pushsvc.core.ratelimit import TokenBucket
from pushsvc.protocol import Unsubscribe
from pushsvc.ws import transport as ws_transport
from pushsvc.ws.transport import WebSocketTransport

BIG = "x" * 8000  # payload padding: fills kernel buffers in a few hundred messages


def slow_consumers() -> float:
    return REGISTRY.get_sample_value("pushsvc_slow_consumers_total") or 0.0


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` every 10 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class StalledClient:
    """A real WebSocket client that authenticates and subscribes, then stops reading.

    Its receive buffer is tiny (``SO_RCVBUF`` 4 KiB), so the server's socket buffers
    fill and uvicorn applies backpressure. :meth:`read_to_close` starts reading again.
    """

    def __init__(self, srv: Any) -> None:
        self.srv = srv
        self.proto = ClientProtocol(parse_uri(srv.ws_url), max_size=None)
        self.events: list[Frame] = []

    @classmethod
    async def open(cls, srv: Any, sub: str, channel: str) -> StalledClient:
        self = cls(srv)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.settings.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.sockname = sock.getsockname()
        request = self.proto.connect()
        request.headers["Authorization"] = f"Bearer {srv.token(sub)}"
        self.proto.send_request(request)
        self._write()
        subscribed = False
        while not subscribed:
            self.proto.receive_data(await asyncio.wait_for(self.reader.read(65536), 5))
            for event in self.proto.events_received():
                if not isinstance(event, Frame):  # the handshake response
                    self.proto.send_text(
                        json.dumps({"op": "subscribe", "channel": channel}).encode()
                    )
                    self._write()
                elif event.opcode is Opcode.TEXT and b'"subscribed"' in event.data:
                    subscribed = True
        self.writer.transport.pause_reading()
        self.session = next(s for s in srv.node.hub.clients if s.principal.sub == sub)
        return self

    def _write(self) -> None:
        self.writer.write(b"".join(self.proto.data_to_send()))

    def server_connection(self) -> Any:
        """uvicorn's protocol object for this client, or None once the server dropped it."""
        for conn in self.srv.server.server_state.connections:
            if conn.transport.get_extra_info("peername") == self.sockname:
                return conn
        return None

    async def read_to_close(self, timeout: float = 10.0) -> tuple[list[int], int | None]:
        """Read again until the server closes; returns (message ``i`` values, close code)."""
        self.writer.transport.resume_reading()
        received: list[int] = []
        async with asyncio.timeout(timeout):
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    return received, None
                self.proto.receive_data(data)
                for event in self.proto.events_received():
                    if event.opcode is Opcode.CLOSE:
                        return received, self.proto.close_rcvd.code
                    if event.opcode is Opcode.TEXT:
                        for line in event.data.split(b"\n"):
                            obj = json.loads(line)
                            if obj["type"] == "message":
                                received.append(obj["data"]["i"])

    def abort(self) -> None:
        self.writer.transport.abort()


async def collect(client: Any, into: list[int]) -> None:
    """Append every message's ``data.i`` to ``into`` until cancelled."""
    while True:
        into.append((await client.expect("message", timeout=30))["data"]["i"])


async def test_write_delay_coalesces_a_window_into_one_frame_in_order(start_server, nc, channel):
    srv = await start_server(write_delay=0.3)
    client = await srv.client(srv.token("alice"))
    await client.subscribe(channel)
    before = len(client.raw_frames)
    for i in range(10):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    got = [m["data"]["i"] for m in await client.messages(10)]
    assert got == list(range(10))
    frames = client.raw_frames[before:]
    # published within a few ms, so one window (two if a window ended mid-way)
    assert len(frames) <= 2, frames
    assert "\n".join(frames).count('"type":"message"') == 10


async def test_subscribing_inside_a_write_delay_window_gets_only_later_messages(
    start_server, nc, channel
):
    srv = await start_server(write_delay=1.0)
    alice = await srv.client(srv.token("alice"))
    await alice.subscribe(channel)
    for i in range(5):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    state = srv.node.hub._channels[channel]
    await until(lambda: len(state.batch) == 5, 5, "the five messages to reach the hub")
    bob = await srv.client(srv.token("bob"))
    await bob.subscribe(channel)  # answered at once: control frames are not delayed
    assert len(state.batch) == 5, "the window closed before bob joined"
    for i in range(5, 10):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    assert [m["data"]["i"] for m in await alice.messages(10)] == list(range(10))
    assert [m["data"]["i"] for m in await bob.messages(5)] == list(range(5, 10))
    await bob.nothing(0.3)


async def test_write_delay_holds_a_message_at_most_one_window(start_server, nc, channel):
    """A steady stream must not keep postponing the write (a debounce would hold the
    first message until the stream stops, 1.5 s here)."""
    delay = 0.2
    srv = await start_server(write_delay=delay)
    client = await srv.client(srv.token("alice"))
    await client.subscribe(channel)

    async def publish() -> None:
        for i in range(30):
            body = {"i": i, "t": time.monotonic()}
            await nc.publish(f"push.{channel}", json.dumps(body).encode())
            await nc.flush()
            await asyncio.sleep(0.05)

    publisher = asyncio.create_task(publish())
    held = []
    for _ in range(30):
        message = await client.expect("message", timeout=10)
        held.append(time.monotonic() - message["data"]["t"])  # same host, same clock
    await publisher
    assert [m["data"]["i"] for m in client.frames if m["type"] == "message"] == list(range(30))
    # the delay plus one loop iteration, with a generous margin for a busy machine
    assert max(held) < delay + 0.6, held


async def until_flight(hub: Hub, channel: str) -> Any:
    """Yield one loop iteration at a time until ``channel``'s batch is being written in slices."""
    for _ in range(20_000):
        state = hub._channels.get(channel)
        if state is not None and state.flight is not None:
            return state.flight
        await asyncio.sleep(0)
    raise AssertionError("no sliced flush happened")


@pytest.mark.parametrize("coalesce_bytes", [65536, 200])
async def test_write_delay_writes_a_large_live_set_in_slices_in_order(
    start_server, nc, channel, coalesce_bytes
):
    """(With a 200-byte cap a batch fills during the previous one's slices: that one is
    finished at once, then the full batch goes out, still in order.)"""
    srv = await start_server(write_delay=0.002, coalesce_bytes=coalesce_bytes)
    hub = srv.node.hub
    hub.fan_out_slice = 2  # 7 clients: every flush is written in 4 loop iterations
    clients = [await srv.client(srv.token(f"user{k}")) for k in range(7)]
    for c in clients:
        await c.subscribe(channel)
    got: list[list[int]] = [[] for _ in clients]
    readers = [asyncio.create_task(collect(c, into)) for c, into in zip(clients, got, strict=True)]
    flights = 0
    for i in range(60):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
        if i % 6 == 0:
            await nc.flush()
            await until_flight(hub, channel)
            flights += 1
    await until(lambda: all(len(g) >= 60 for g in got), 20, "every client to get everything")
    await stop(*readers)
    assert got == [list(range(60))] * len(clients)
    assert flights == 10
    # a window's messages went out together: fewer frames than messages
    assert all(len(c.raw_frames) < 60 for c in clients)


async def sliced_flight(start_server: Any, nc: Any, channel: str) -> tuple[Any, ...]:
    """Six subscribers, a write delay and a slice of one socket; message 0 published and
    its flush caught after its first slice: ``(hub, clients, outboxes by client id, flight)``."""
    srv = await start_server(write_delay=0.002)
    hub = srv.node.hub
    hub.fan_out_slice = 1
    clients = [await srv.client(srv.token(f"user{k}")) for k in range(6)]
    for c in clients:
        await c.subscribe(channel)
    by_id = {s.id: s.outbox for s in hub.clients}
    await nc.publish(f"push.{channel}", json.dumps({"i": 0}).encode())
    await nc.flush()
    return hub, clients, by_id, await until_flight(hub, channel)


async def test_sessions_leaving_during_a_sliced_flush_get_what_they_are_owed(
    start_server, nc, channel
):
    """A session that unsubscribes before its slice is written gets the batch first
    (it was subscribed when the message arrived) and nothing after; a session closed
    before its slice gets nothing after its close frame; the others get everything."""
    hub, clients, by_id, flight = await sliced_flight(start_server, nc, channel)
    owner = {s.outbox: s for s in hub.clients}
    head = flight.segments[0]
    unwritten = head.sessions[head.pos :]
    assert len(unwritten) >= 2
    leaver, closer = unwritten[-1], unwritten[-2]
    commands.unsubscribe(owner[leaver], Unsubscribe(channel=channel, id=7))  # the command
    owner[closer].close(4000, "closed by the test")
    for i in (1, 2):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()

    for c in clients:
        session = by_id[c.welcome["client"]]
        if session is leaver:
            assert [m["data"]["i"] for m in await c.messages(1)] == [0]
            await c.expect("unsubscribed", id=7)
            await c.nothing(0.3)
        elif session is closer:
            assert await c.closed() == 4000
            assert not [f for f in c.frames if f["type"] == "message"]
        else:
            assert [m["data"]["i"] for m in await c.messages(3)] == [0, 1, 2]


async def test_a_batch_ready_during_a_sliced_flush_joins_it(start_server, nc, channel):
    """Sockets not yet written get the earlier and the new batch in one frame; those
    already written get the new one next: in order, no socket waits for a second sweep."""
    hub, clients, by_id, flight = await sliced_flight(start_server, nc, channel)
    # the next batch is ready while the flight is on (the hub's own path: the bus's
    # message callback, then the window's flush)
    hub.dispatch(channel, json.dumps({"i": 1}).encode(), None)
    hub._flush_channel(hub._channels[channel])
    assert hub._channels[channel].flight is flight and len(flight.segments[0].parts) == 2
    together = {id(s) for s in flight.segments[0].sessions[flight.segments[0].pos :]}
    assert together and len(together) < len(clients)
    for c in clients:
        assert [m["data"]["i"] for m in await c.messages(2)] == [0, 1]
        frames = [f for f in c.raw_frames if '"type":"message"' in f]
        if id(by_id[c.welcome["client"]]) in together:
            assert len(frames) == 1 and frames[0].count('"type":"message"') == 2, frames
        else:
            assert len(frames) == 2, frames


async def test_a_session_leaving_and_joining_again_during_a_sliced_flush(start_server, nc, channel):
    """Owed the batch it was subscribed for, then only what came after it joined again:
    each once, in order."""
    hub, clients, by_id, flight = await sliced_flight(start_server, nc, channel)
    head = flight.segments[0]
    again = head.sessions[-1]  # not written yet
    client = next(s for s in hub.clients if s.outbox is again)
    commands.unsubscribe(client, Unsubscribe(channel=channel, id=1))
    await hub.subscribe(client, channel, None, 2)  # the channel is held: no wait
    hub.dispatch(channel, json.dumps({"i": 1}).encode(), None)
    hub._flush_channel(hub._channels[channel])
    for c in clients:
        if by_id[c.welcome["client"]] is again:
            assert (await c.expect("message"))["data"]["i"] == 0
            await c.expect("unsubscribed", id=1)
            await c.expect("subscribed", id=2)
            assert (await c.expect("message"))["data"]["i"] == 1
            await c.nothing(0.3)
        else:
            assert [m["data"]["i"] for m in await c.messages(2)] == [0, 1]


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they are done."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("write_delay", [0.0, 0.005])
async def test_stalled_client_closed_4009_while_others_get_everything(
    start_server, nc, channel, write_delay
):
    srv = await start_server(send_queue_bytes=256 * 1024, write_delay=write_delay)
    hub, bus = srv.node.hub, srv.node.bus
    good = [await srv.client(srv.token("alice")), await srv.client(srv.token("bob"))]
    got: list[list[int]] = [[], []]
    for c in good:
        await c.subscribe(channel)
    resumer = await StalledClient.open(srv, "stall-1", channel)  # reads again once closed
    sleeper = await StalledClient.open(srv, "stall-2", channel)  # never reads again
    assert bus.live._subs[channel].refs == 4
    before = slow_consumers()
    readers = [asyncio.create_task(collect(c, into)) for c, into in zip(good, got, strict=True)]

    async def resume_when_closed() -> tuple[list[int], int | None]:
        await until(lambda: resumer.session.closed, 60, "the first stalled session to close")
        return await resumer.read_to_close()

    resumed = asyncio.create_task(resume_when_closed())
    stalled = (resumer.session, sleeper.session)
    published = 0
    # A few MB fill the kernel buffers; publish until both stalled sessions overflow.
    while not all(s.closed for s in stalled) and published < 4000:
        for _ in range(10):
            await nc.publish(f"push.{channel}", json.dumps({"i": published, "p": BIG}).encode())
            published += 1
        await nc.flush()
        await asyncio.sleep(0.005)
    for s in stalled:
        assert s.closed and s.close_code == 4009, (published, s.close_code)
        assert s not in hub.clients and not s.channels
        assert s.buffered_bytes == 0 and not s.outbox._out and s.outbox._writer is None
    assert slow_consumers() - before == 2
    assert hub.subscribers(channel) == 2
    await hub.wait_idle()
    assert bus.live._subs[channel].refs == 2  # NATS interest of the closed sessions released

    # The healthy clients got everything, in order, and the server keeps going.
    await nc.publish(f"push.{channel}", json.dumps({"i": published}).encode())
    published += 1
    await until(lambda: all(len(g) >= published for g in got), 30, "healthy clients")
    await stop(*readers)
    assert got == [list(range(published))] * 2

    # The stalled client that reads again sees a gap-free prefix, then 4009.
    prefix, code = await resumed
    assert code == 4009
    assert prefix == list(range(len(prefix)))

    # The one that never reads is dropped by the server after CLOSE_TIMEOUT, buffers
    # and all (a graceful close would wait for it forever).
    await until(
        lambda: sleeper.server_connection() is None,
        ws_transport.CLOSE_TIMEOUT + 5,
        "the server to drop the stalled connection",
    )
    sleeper.abort()
    resumer.abort()


async def test_coalesced_frames_reassemble_in_order(start_server, nc, channel):
    srv = await start_server(coalesce_bytes=4096)
    c = await srv.client()
    await c.subscribe(channel)
    start = len(c.raw_frames)
    got: list[int] = []
    reader = asyncio.create_task(collect(c, got))
    for i in range(2000):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    await until(lambda: len(got) >= 2000, 20, "the burst")
    await stop(reader)
    assert got == list(range(2000))
    frames = c.raw_frames[start:]
    assert any("\n" in f for f in frames), "a burst must be coalesced"
    assert len(frames) < 2000
    assert all(len(f.encode()) <= 4096 for f in frames)
    # the frames are exactly the objects, newline-joined, in published order
    objects = [json.loads(line) for f in frames for line in f.split("\n")]
    assert [o["data"]["i"] for o in objects if o["type"] == "message"] == list(range(2000))

    # Light load: one message at a time, one frame each.
    start = len(c.raw_frames)
    for i in range(5):
        await nc.publish(f"push.{channel}", json.dumps({"light": i}).encode())
        (m,) = await c.messages(1)
        assert m["data"] == {"light": i}
    light = c.raw_frames[start:]
    assert len(light) == 5 and not any("\n" in f for f in light)


async def test_socket_stuck_in_send_is_closed_after_send_timeout(start_server, nc, channel):
    # A large send queue so overflow does not fire first: only the timeout can close it.
    srv = await start_server(send_timeout=1.0, send_queue_bytes=64 << 20)
    stuck = await StalledClient.open(srv, "stuck", channel)
    s = stuck.session
    before = slow_consumers()
    published = 0
    while s.outbox._writer is None and published < 4000:  # fill the kernel buffers
        for _ in range(10):
            await nc.publish(f"push.{channel}", json.dumps({"i": published, "p": BIG}).encode())
            published += 1
        await nc.flush()
        await asyncio.sleep(0.005)
    writer = s.outbox._writer
    assert writer is not None and not writer.done(), "the send never blocked"
    assert s.buffered_bytes > 0 and not s.closed
    await until(lambda: s.closed, 5, "the send timeout")
    assert s.close_code == 4009
    assert slow_consumers() - before == 1
    # memory released: no buffer, no writer task
    assert s.buffered_bytes == 0 and not s.outbox._out and s.outbox._writer is None
    await until(writer.done, 2, "the writer task to end")
    assert s not in srv.node.hub.clients and srv.node.hub.subscribers(channel) == 0
    stuck.abort()


# --- Session's own accounting, with a controlled ASGI send ------------------------------


class _StubHub:
    node_id = "5706b0"  # the prefix of the client ids (Hub.node_id)

    def __init__(self) -> None:
        self.removed: list[Client] = []

    def remove_client(self, session: Client) -> None:
        self.removed.append(session)


class GatedSend:
    """An ASGI ``send`` that waits on an Event, like uvicorn's ``writable`` backpressure."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.texts: list[str] = []
        self.closes: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        await self.gate.wait()
        if message["type"] == "websocket.send":
            self.texts.append(message["text"])
        else:
            self.closes.append(message)


def make_session(send: GatedSend, **overrides: Any) -> tuple[Client, _StubHub]:
    settings = Settings.load(env={}, jwt_secret=SECRET, **overrides)
    hub = _StubHub()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    session = Client(
        WebSocketTransport(send, receive),
        Principal(sub="u", exp=time.time() + 3600),
        hub,  # type: ignore[arg-type]
        Authenticator(settings),
        TokenBucket(10, 10),
        settings,
    )
    return session, hub


def frame(i: int) -> tuple[str, int]:
    """A message-like frame with non-ASCII text (UTF-8 bytes != characters)."""
    text = json.dumps({"type": "message", "data": f"é-{i}-😀"}, ensure_ascii=False)
    return text, len(text.encode())


async def test_buffered_bytes_is_exact_through_backpressure():
    send = GatedSend()
    s, _ = make_session(send, coalesce_bytes=100)
    f = [frame(i) for i in range(12)]
    sizes = [n for _, n in f]

    s.send(*f[0])
    s.send(*f[1])
    assert s.buffered_bytes == sizes[0] + sizes[1]  # pending until the loop turns
    await asyncio.sleep(0)
    assert s.buffered_bytes == 0 and s.outbox._writer is None  # written eagerly, no task
    assert send.texts == [f"{f[0][0]}\n{f[1][0]}"]

    send.gate.clear()  # the socket stops draining
    s.send(*f[2])
    await asyncio.sleep(0)
    assert s.outbox._writer is not None  # that send blocked: a writer task finishes it
    assert s.buffered_bytes == sizes[2]  # in flight
    expected = sizes[2]
    for i in range(3, 12):
        s.send(*f[i])
        expected += sizes[i]
        assert s.buffered_bytes == expected  # in flight + pending
    await asyncio.sleep(0.05)
    assert s.buffered_bytes == expected  # nothing moves while blocked

    send.gate.set()
    await until(lambda: s.outbox._writer is None, 2, "the writer to drain")
    assert s.buffered_bytes == 0 and not s.outbox._out
    # every frame went out once, in order, in frames of at most coalesce_bytes
    assert [line for t in send.texts for line in t.split("\n")] == [t for t, _ in f]
    assert all(len(t.encode()) <= 100 for t in send.texts[2:])
    assert len(send.texts) < 12  # the backlog was coalesced
    assert not s.closed


async def test_overflow_closes_4009_and_releases_the_buffer():
    send = GatedSend()
    s, hub = make_session(send, send_queue_bytes=300)
    before = slow_consumers()
    send.gate.clear()
    total = 0
    i = 0
    while not s.closed:
        text, n = frame(i)
        i += 1
        s.send(text, n)
        total += n
        await asyncio.sleep(0)
        if not s.closed:
            assert s.buffered_bytes == total <= 300
    assert total > 300 and s.close_code == 4009
    assert slow_consumers() - before == 1
    assert s.buffered_bytes == 0 and not s.outbox._out and s.outbox._writer is None
    assert hub.removed == [s]
    s.send(*frame(99))  # a closed session ignores frames
    assert s.buffered_bytes == 0
    send.gate.set()
    await until(lambda: send.closes, 2, "the close frame")
    assert send.closes[0]["code"] == 4009
    assert send.texts == []  # the blocked send was abandoned, not completed late


async def test_send_timeout_closes_and_releases():
    send = GatedSend()
    s, hub = make_session(send, send_timeout=0.2)
    send.gate.clear()
    s.send(*frame(0))
    await asyncio.sleep(0)
    writer = s.outbox._writer
    assert writer is not None
    s.send(*frame(1))
    await until(lambda: s.closed, 3, "the send timeout")
    assert s.close_code == 4009 and hub.removed == [s]
    assert s.buffered_bytes == 0 and s.outbox._writer is None
    await until(writer.done, 1, "the writer to end")
    assert not writer.cancelled()  # it ended by itself, after closing the session
    send.gate.set()
    await until(lambda: send.closes, 2, "the close frame")


# --- the hub: a session closed during fan-out -----------------------------------------


class _StubBus:
    history_enabled = False

    def __init__(self) -> None:
        self.refs: dict[str, int] = {}

    async def acquire(self, channel: str) -> None:
        self.refs[channel] = self.refs.get(channel, 0) + 1

    async def release(self, channel: str) -> None:
        self.refs[channel] -= 1

    def drained(self) -> bool:
        return True


class _FakeSession:
    def __init__(self, hub: Hub, name: str, close_on_send: bool = False) -> None:
        self.hub = hub
        self.id = name  # Member.id (the public client id)
        self.principal = Principal(sub=name, exp=time.time() + 60)
        self.channels: set[str] = set()
        self.closed = False
        self.close_on_send = close_on_send
        self.got: list[str] = []
        self.outbox = self  # its own outbox, with no direct path: fan_out queues through send()
        self.transport = SimpleNamespace(name="fake", watermarks=False)
        self._wire = None

    def send(self, frame: str, nbytes: int) -> None:
        if self.closed:
            return
        self.got.append(frame)
        if self.close_on_send:  # what an overflowing Session does: leave at once
            self.closed = True
            self.hub.remove_client(self)  # type: ignore[arg-type]

    def send_frame(self, frame: Any) -> None:
        pass


async def test_dispatch_survives_a_session_closing_during_fan_out():
    bus = _StubBus()
    hub = Hub(bus)  # type: ignore[arg-type]
    sessions = [_FakeSession(hub, f"u{i}", close_on_send=i % 3 == 1) for i in range(9)]
    for s in sessions:
        hub.add_client(s)  # type: ignore[arg-type]
        await hub.subscribe(s, "room", None, None)  # type: ignore[arg-type]
    hub.dispatch("room", b'{"n": 1}', None)
    await asyncio.sleep(0)  # the channel's batch is handed out at the next loop iteration
    hub.dispatch("room", b'{"n": 2}', None)
    await asyncio.sleep(0)
    await hub.wait_idle()
    for i, s in enumerate(sessions):
        assert len(s.got) == (1 if i % 3 == 1 else 2), i
    assert hub.subscribers("room") == 6 and bus.refs["room"] == 6


# --- the verified-token cache -----------------------------------------------------------


async def test_cached_token_stops_being_accepted_at_exp():
    auth = Authenticator(Settings.load(env={}, jwt_secret=SECRET, jwt_leeway=0))
    token = mint_token(SECRET, "carol", channels=["a"], ttl=2)
    first = auth.verify(token)
    assert auth.cache_hits == 0
    assert auth.verify(token) == first and auth.cache_hits == 1  # served from the cache
    await asyncio.sleep(max(0.0, first.exp - time.time()) + 0.05)
    with pytest.raises(AuthError, match="expired"):
        auth.verify(token)
    assert auth.cache_hits == 1
    with pytest.raises(AuthError, match="expired"):  # and not re-admitted by a re-decode
        auth.verify(token)


def test_token_cache_is_bounded():
    auth = Authenticator(Settings.load(env={}, jwt_secret=SECRET, token_cache_size=3))
    tokens = [mint_token(SECRET, f"u{i}", ttl=60) for i in range(6)]
    for t in tokens:
        auth.verify(t)
    assert len(auth._cache) == 3
    auth.verify(tokens[-1])
    assert auth.cache_hits == 1
    auth.verify(tokens[0])  # evicted: decoded again, not a hit
    assert auth.cache_hits == 1
