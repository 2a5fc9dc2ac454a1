"""pushsvc.js across a stream reset, in Debian's chromium driven by Playwright.

The page stays open while pushsvc and NATS restart on an empty store (the stream
is created anew: a new epoch whose seqs restart at 1). The client must report
``recovered: false`` and then show every message published after the restart,
although their seqs are below the last one it saw. Skipped when no chromium
binary is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import json
import os
import shutil

import nats
import pytest

from pushsvc.server.embedded import EmbeddedNats

CHROMIUM = os.environ.get("PUSHSVC_TEST_CHROMIUM") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]


async def publish(url: str, channel: str, values: list[int]) -> list[int]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return [
            (await js.publish(f"push.{channel}", json.dumps({"i": v}).encode())).seq for v in values
        ]
    finally:
        await nc.drain()


async def test_page_survives_a_server_restart_on_a_fresh_store(
    own_nats, start_server, channel, tmp_path
):
    from playwright.async_api import async_playwright

    srv = await start_server(nats_url=own_nats.url)
    port = srv.settings.port
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{srv.base}/healthz")
            await page.add_script_tag(url=f"{srv.base}/static/pushsvc.js")
            await page.evaluate(
                """([token, channel]) => {
                    window.got = []; window.subs = []; window.epochs = [];
                    const c = new PushsvcClient({ token });
                    c.on("subscribed", (f) => window.subs.push(f));
                    c.on("connected", (w) => window.epochs.push(w.epoch));
                    c.subscribe(channel, (data, ctx) =>
                        window.got.push([data.i, ctx.seq, ctx.epoch]));
                    c.connect();
                }""",
                [srv.token("resumer"), channel],
            )
            await page.wait_for_function("() => window.subs.length === 1", timeout=10000)
            old = await publish(own_nats.url, channel, [0, 1, 2, 3, 4])
            await page.wait_for_function("() => window.got.length === 5", timeout=10000)

            await srv.stop()  # the page's socket closes with 1012; it keeps reconnecting
            own_nats.stop()
            fresh = EmbeddedNats(port=own_nats.port, data_dir=tmp_path / "fresh").start()
            try:
                srv = await start_server(nats_url=fresh.url, port=port)
                new = await publish(fresh.url, channel, [5, 6, 7])
                assert new[-1] <= old[-1]  # without epochs these would be "duplicates"
                await page.wait_for_function("() => window.got.length >= 8", timeout=30000)
                await page.wait_for_timeout(300)
                got = await page.evaluate("window.got")
                subs = await page.evaluate("window.subs")
                epochs = await page.evaluate("window.epochs")
                assert [i for i, _, _ in got] == list(range(8))
                assert [s for _, s, _ in got[5:]] == new
                assert epochs[0] != epochs[-1] and got[-1][2] == epochs[-1]
                assert subs[-1]["recovered"] is False and subs[-1]["epoch"] == epochs[-1]
                more = await publish(fresh.url, channel, [8])
                await page.wait_for_function("() => window.got.length === 9", timeout=10000)
                assert (await page.evaluate("window.got"))[-1][:2] == [8, more[0]]
            finally:
                await srv.stop()
                fresh.cleanup()
        finally:
            await browser.close()
