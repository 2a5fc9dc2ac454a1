"""A plain EventSource in Chromium (no client library) against GET /sse.

The browser's own reconnect sends ``Last-Event-ID``: across a server restart (a
new server on the same address and the same NATS store) the page gets every
message of three channels published interleaved under one pattern, once.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from browser import CHROMIUM, launch

from pushsvc.server.embedded import free_port

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


async def test_eventsource_resumes_across_a_server_restart(start_server, nc, channel):
    port = free_port()
    srv = await start_server(dev=True, port=port, sse_retry=0.3)
    token = srv.token("ann")
    pattern = f"{channel}.*"
    async with launch() as browser:
        page = await browser.new_page()
        await page.goto(f"{srv.base}/")
        await page.evaluate(
            """([pattern, token]) => {
                window.got = []; window.opens = 0;
                const es = new EventSource(
                    "/sse?channel=" + encodeURIComponent(pattern) + "&token=" + token);
                es.onopen = () => { window.opens += 1; };
                es.onmessage = (e) => window.got.push(JSON.parse(e.data).data.i);
                window.es = es;
            }""",
            [pattern, token],
        )
        await page.wait_for_function("() => window.opens === 1", timeout=10000)
        await asyncio.sleep(0.3)  # subscribed
        seen = []

        async def publish(start: int, stop: int) -> None:
            for i in range(start, stop):
                await nc.publish(f"push.{channel}.{i % 3}", json.dumps({"i": i}).encode())
            await nc.flush()

        await publish(0, 9)
        await page.wait_for_function("() => window.got.length === 9", timeout=10000)
        await srv.stop()  # every stream ends with a close event (1012)
        await publish(9, 18)  # while no server runs
        again = await start_server(dev=True, port=port, sse_retry=0.3)
        assert again.base == srv.base
        await page.wait_for_function("() => window.opens >= 2", timeout=15000)
        await publish(18, 24)
        await page.wait_for_function("() => window.got.length >= 24", timeout=15000)
        await page.wait_for_timeout(300)
        seen = await page.evaluate("window.got")
        assert seen == list(range(24))  # nothing lost, nothing twice, in order
        await page.evaluate("window.es.close()")
