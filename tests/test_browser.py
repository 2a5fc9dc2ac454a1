"""pushsvc.js in a real browser: Debian's chromium driven by Playwright.

The demo page has its own tests in test_demo.py.

Skipped when no chromium binary is installed (``.ci/run`` installs Debian's
``chromium`` package, so CI runs these).
"""

from __future__ import annotations

import json

import pytest
from browser import CHROMIUM, launch

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture
async def browser():
    async with launch() as b:
        yield b


async def test_client_resumes_after_a_server_restart_close(start_server, browser, nc, channel):
    """The server closes every socket with 1012; messages published while the
    client is away are replayed from history on reconnect: none lost, none twice."""
    srv = await start_server(dev=True)
    page = await browser.new_page()
    await page.goto(f"{srv.base}/")
    await page.evaluate(
        """([token, channel]) => {
            window.got = [];
            window.closes = [];
            const c = new PushsvcClient({ token });
            c.on("disconnected", (e) => window.closes.push(e.code));
            c.subscribe(channel, (data, ctx) => window.got.push([data.i, ctx.seq]));
            c.connect();
            window.client = c;
        }""",
        [srv.token("resumer"), channel],
    )
    for _ in range(400):
        if srv.node.hub.subscribers(channel):
            break
        await page.wait_for_timeout(25)
    for i in range(3):
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await page.wait_for_function("() => window.got.length === 3", timeout=10000)
    srv.node.hub.close_all(1012, "service restart")
    for i in range(3, 8):  # published while the browser is reconnecting
        await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
    await nc.flush()
    await page.wait_for_function("() => window.got.length >= 8", timeout=15000)
    await page.wait_for_timeout(300)
    got = await page.evaluate("window.got")
    assert [i for i, _ in got] == list(range(8))
    seqs = [s for _, s in got]
    assert seqs == sorted(set(seqs))
    assert 1012 in await page.evaluate("window.closes")
