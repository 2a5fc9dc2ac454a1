"""WebSocket permessage-deflate with shared frames (RFC 7692; docs/protocol.md, "Compression").

A server with ``PUSHSVC_COMPRESSION=deflate``: a client that offers the extension
gets it with ``server_no_context_takeover`` and ``client_no_context_takeover``
(7.1.1), batches of at least ``PUSHSVC_COMPRESSION_MIN_BYTES`` as RSV1 frames
(7.2.3.1) that the ``websockets`` client inflates to the exact messages, and
smaller ones uncompressed; a client that offers nothing gets plain frames on
the same channel. Real uvicorn, real NATS, real sockets.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

import pytest
import websockets
from conftest import Running, launch
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from wsclient import WSClient

SAMPLE = resources.files("pushsvc.bench").joinpath("samples/orderbook.json").read_bytes().strip()


@pytest.fixture(scope="module")
async def srv(nats_url: str):
    running = await launch(nats_url, compression="deflate")
    yield running
    await running.stop()


class Recorder:
    """Wraps the client's negotiated extension: records each text frame as it arrived
    (RSV1 bit, payload bytes on the wire) before the library inflates it."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext
        self.name = ext.name
        self.frames: list[tuple[bool, bytes]] = []

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.opcode is Opcode.TEXT:
            self.frames.append((frame.rsv1, bytes(frame.data)))
        return self.ext.decode(frame, max_size=max_size)

    def encode(self, frame: Frame) -> Frame:
        return self.ext.encode(frame)


async def deflate_client(srv: Running, **offer: Any) -> tuple[WSClient, Recorder]:
    """A client offering permessage-deflate (``offer``: the factory's parameters)."""
    ws = await websockets.connect(
        srv.ws_url,
        extensions=[ClientPerMessageDeflateFactory(**offer)],
        compression=None,
        max_size=None,
    )
    assert len(ws.protocol.extensions) == 1, "permessage-deflate was not negotiated"
    recorder = Recorder(ws.protocol.extensions[0])
    ws.protocol.extensions = [recorder]
    client = WSClient(ws)
    await client.send({"op": "auth", "token": srv.token()})  # compressed by the client
    await client.expect("welcome")
    return client, recorder


def last_frame(recorder: Recorder, client: WSClient) -> tuple[bool, bytes, str]:
    rsv1, wire = recorder.frames[-1]
    return rsv1, wire, client.raw_frames[-1]


async def test_deflate_and_plain_clients_on_one_channel(srv, nc, channel):
    deflated, recorder = await deflate_client(srv)
    other, other_recorder = await deflate_client(srv)
    plain = await WSClient.connect(srv.ws_url, srv.token())
    header = deflated.ws.response.headers["Sec-WebSocket-Extensions"]
    assert header.startswith("permessage-deflate")
    assert "server_no_context_takeover" in header and "client_no_context_takeover" in header
    assert plain.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    for c in (deflated, other, plain):
        await c.subscribe(channel)

    await nc.publish(f"push.{channel}", SAMPLE)  # ~2 KiB: compressed
    book = json.loads(SAMPLE)
    for c in (deflated, other, plain):
        assert (await c.messages(1))[0]["data"] == book
    rsv1, wire, text = last_frame(recorder, deflated)
    assert rsv1 and len(wire) < 0.4 * len(text.encode())
    assert text == plain.raw_frames[-1]  # inflated: the plain client's frame exactly
    assert other_recorder.frames[-1] == (rsv1, wire)  # the same compressed bytes

    await nc.publish(f"push.{channel}", b'{"i":1}')  # under 512 bytes: not compressed
    for c in (deflated, plain):
        assert (await c.messages(1))[0]["data"] == {"i": 1}
    rsv1, wire, text = last_frame(recorder, deflated)
    assert not rsv1 and wire == text.encode() == plain.raw_frames[-1].encode()
    for c in (deflated, other, plain):
        await c.close()


async def test_a_burst_coalesces_into_compressed_frames(srv, nc, channel):
    deflated, recorder = await deflate_client(srv)
    plain = await WSClient.connect(srv.ws_url, srv.token())
    for c in (deflated, plain):
        await c.subscribe(channel)
    sent = [{"i": i, "text": f"item {i} " * (i % 50)} for i in range(300)]
    for item in sent:
        await nc.publish(f"push.{channel}", json.dumps(item).encode())
    for c in (deflated, plain):
        assert [m["data"] for m in await c.messages(len(sent))] == sent
    assert any(rsv1 for rsv1, _ in recorder.frames)
    assert "".join(deflated.raw_frames[-len(recorder.frames) :])  # every frame inflated
    for c in (deflated, plain):
        await c.close()


async def test_large_compressed_frames_carry_64_bit_lengths(srv, nc, channel):
    """A message whose compressed payload is over 65535 bytes: a 64-bit length
    (RFC 6455 5.2), inflated to the exact message."""
    deflated, recorder = await deflate_client(srv)
    await deflated.subscribe(channel)
    data = {"blob": os.urandom(200_000).hex()}  # hex: compresses to about half, > 64 KiB
    await nc.publish(f"push.{channel}", json.dumps(data).encode())
    assert (await deflated.messages(1))[0]["data"] == data
    rsv1, wire = recorder.frames[-1]
    assert rsv1 and 65535 < len(wire) < len(deflated.raw_frames[-1])
    await deflated.close()


async def test_a_smaller_server_window_is_honoured(srv, nc, channel):
    """A client asking ``server_max_window_bits=9`` (RFC 7692 7.1.2.1) gets frames
    compressed with a 512-byte window, which its inflater of that size decodes."""
    deflated, recorder = await deflate_client(srv, server_max_window_bits=9)
    header = deflated.ws.response.headers["Sec-WebSocket-Extensions"]
    assert "server_max_window_bits=9" in header
    await deflated.subscribe(channel)
    await nc.publish(f"push.{channel}", SAMPLE)
    assert (await deflated.messages(1))[0]["data"] == json.loads(SAMPLE)
    assert recorder.frames[-1][0]
    await deflated.close()


async def test_a_compressed_bomb_is_closed_1009(srv, nc, channel):
    """A client message that inflates past PUSHSVC_MAX_FRAME_BYTES closes 1009; the
    inflater stops at the limit (RFC 6455 7.4.1 "message too big")."""
    deflated, _ = await deflate_client(srv)
    bystander, _ = await deflate_client(srv)
    await bystander.subscribe(channel)
    await deflated.ws.send(" " * (srv.settings.max_frame_bytes * 4))  # a few hundred bytes
    assert await deflated.closed() == 1009
    await nc.publish(f"push.{channel}", SAMPLE)
    assert (await bystander.messages(1))[0]["data"] == json.loads(SAMPLE)
    await bystander.close()
