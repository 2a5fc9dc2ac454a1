"""pushsvc.client, the async Python client, against real uvicorn servers and a real NATS."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from pushsvc import Publisher
from pushsvc.client import (
    Client,
    CommandError,
    Connected,
    Disconnected,
    Stopped,
    Subscribed,
    Unauthorized,
)


async def take(sub, n: int, timeout: float = 10) -> list:
    """The next ``n`` messages of a subscription."""
    async with asyncio.timeout(timeout):
        return [await anext(sub) for _ in range(n)]


async def test_subscribe_publish_and_iterate(start_server, channel):
    srv = await start_server()
    async with Client(srv.base, token=srv.token("ann", publish=[">"])) as client:
        sub = await client.subscribe(channel)
        assert sub.state == "subscribed" and client.state == "connected"
        seq = await client.publish(channel, {"n": 1})
        await client.publish(channel, "text")
        m1, m2 = await take(sub, 2)
    assert (m1.channel, m1.data, m1.seq, m1.pattern) == (channel, {"n": 1}, seq, None)
    assert m1.epoch == client.welcome.epoch and m2.data == "text" and m2.seq > seq
