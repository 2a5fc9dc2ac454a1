"""A plain EventSource in Chromium (no client library) against GET /sse.

The browser's own reconnect sends ``Last-Event-ID``: across a server restart (a
new server on the same address and the same NATS store) the page gets every
message of three channels published interleaved under one pattern, once; and
across a node SIGKILLed behind a TCP proxy that then leads to a second node, on
three plain channels (the node's watermark), once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import httpx
import pytest
from browser import CHROMIUM, launch
from conftest import SECRET
from helpers import http_ready, node_env, until

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


class Proxy:
    """A TCP proxy on a free loopback port to ``target`` (a port), switchable.

    Records the request heads it forwards (what the browser sent), by target.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.heads: dict[int, list[bytes]] = {}
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        heads = self.heads.setdefault(target, [])

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bool) -> None:
            try:
                while data := await src.read(65536):
                    if log:
                        heads.append(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_eventsource_on_three_channels_survives_a_sigkilled_node(
    start_server, nc, nats_url, channel
):
    """Node A serves the page's EventSource (three plain channels) through a TCP
    proxy; A is SIGKILLed (no close event) and the proxy now leads to node B: the
    browser's own reconnect carries ``Last-Event-ID`` to B, which resumes every
    channel from it: each message once."""
    b = await start_server(sse_retry=0.3)
    port = free_port()
    env = node_env()
    env.update(
        PUSHSVC_NATS_URL=nats_url,
        PUSHSVC_JWT_SECRET=SECRET,
        PUSHSVC_PORT=str(port),
        PUSHSVC_SSE_RETRY="0.3",
        PUSHSVC_LOG_LEVEL="warning",
    )
    node_a = subprocess.Popen(  # noqa: ASYNC220 - the node to kill
        [sys.executable, "-m", "pushsvc", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = Proxy(port)
    await proxy.start()
    base = f"http://127.0.0.1:{proxy.port}"
    names = [f"{channel}.{k}" for k in range(3)]
    try:
        async with httpx.AsyncClient() as http:
            await until(lambda: http_ready(http, port), within=30)
        async with launch() as browser:
            page = await browser.new_page()
            await page.goto(f"{base}/readyz")
            query = "&".join(f"channel={n}" for n in names) + "&token=" + b.token("kim")
            await page.evaluate(
                """(query) => {
                    window.got = []; window.opens = 0;
                    const es = new EventSource("/sse?" + query);
                    es.onopen = () => { window.opens += 1; };
                    es.onmessage = (e) => window.got.push(JSON.parse(e.data).data.i);
                    window.es = es;
                }""",
                query,
            )
            await page.wait_for_function("() => window.opens === 1", timeout=10000)
            await asyncio.sleep(0.3)  # subscribed

            async def publish(start: int, stop: int) -> None:
                for i in range(start, stop):
                    await nc.publish(f"push.{names[i % 3]}", json.dumps({"i": i}).encode())
                await nc.flush()

            await publish(0, 30)
            await page.wait_for_function("() => window.got.length === 30", timeout=10000)
            await asyncio.sleep(0.3)  # the id block after them
            proxy.target = b.settings.port
            node_a.send_signal(signal.SIGKILL)
            node_a.wait(timeout=10)
            await publish(30, 60)  # while the page reconnects
            await page.wait_for_function("() => window.opens >= 2", timeout=15000)
            await publish(60, 90)
            await page.wait_for_function("() => window.got.length >= 90", timeout=15000)
            await page.wait_for_timeout(300)
            seen = await page.evaluate("window.got")
            await page.evaluate("window.es.close()")
        assert sorted(seen) == list(range(90)) and len(seen) == 90  # none lost, none twice
        sent = b"".join(proxy.heads.get(b.settings.port, [])).lower()
        assert b"last-event-id: " in sent  # the browser's own resume reached node B
    finally:
        if node_a.poll() is None:
            node_a.kill()
            node_a.wait(timeout=10)
        await proxy.stop()
