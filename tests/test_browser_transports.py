"""The browser build (pushsvc/static/pushsvc.js) falling back from WebSocket, in Debian's chromium.

Playwright's ``page.route`` does not intercept WebSocket handshakes in this chromium, so the page
gets an init script that points every WebSocket at ``/ws-refused`` (a path the server answers
404): the handshake fails as it does behind a proxy that strips ``Upgrade``. The client then falls
back to SSE (``GET /sse``, commands through ``POST /sse/commands``): subscribe, publish and
presence work, and it resumes after a server restart with nothing lost and nothing twice.

Skipped when no chromium binary is installed, and while the server has no SSE transport.
"""

from __future__ import annotations

import json

import httpx
import pytest
from browser import CHROMIUM, launch

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

REFUSE_WEBSOCKET = """(() => {
    const Native = window.WebSocket;
    window.WebSocket = function (url, protocols) {
        return new Native(String(url).replace(/\\/ws$/, "/ws-refused"), protocols);
    };
    window.WebSocket.prototype = Native.prototype;
    window.WebSocket.OPEN = Native.OPEN;
})();"""


async def test_falls_back_to_sse_and_resumes_after_a_restart(start_server, nc, channel):
    srv = await start_server(dev=True, presence_channels=["*.room"])
    async with httpx.AsyncClient() as http:
        if (await http.get(f"{srv.base}/sse")).status_code == 404:
            pytest.skip("this pushsvc has no GET /sse yet (issue 23)")
    token = srv.token("sia", publish=[channel], extra={"presence": ["*.room"]})
    async with launch() as browser:
        page = await browser.new_page()
        await page.add_init_script(REFUSE_WEBSOCKET)
        await page.goto(f"{srv.base}/healthz")
        await page.add_script_tag(url=f"{srv.base}/static/pushsvc.js")  # default URL: its base
        await page.evaluate(
            """async ([token, channel]) => {
                window.got = []; window.tried = []; window.closes = [];
                const c = new PushsvcClient({ token, transports: ["websocket", "sse"] });
                c.on("transport", (e) => window.tried.push(e.transport));
                c.on("disconnected", (d) => window.closes.push(d.code));
                const sub = c.subscribe(channel, (data, ctx) => window.got.push([data.i, ctx.seq]));
                c.connect();
                window.client = c;
                await sub.ready;
            }""",
            [token, channel],
        )
        assert await page.evaluate("window.tried") == ["websocket", "sse"]
        assert await page.evaluate("window.client.transport") == "sse"
        published = await page.evaluate(
            f"window.client.publish({json.dumps(channel)}, {{i: 0}}).then((f) => f.seq)"
        )
        assert isinstance(published, int)
        who = await page.evaluate(f"window.client.presence({json.dumps(channel)})")
        assert [c["user"] for c in who["clients"]] == ["sia"]
        for i in (1, 2):
            await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
        await page.wait_for_function("() => window.got.length === 3", timeout=10000)

        port = srv.settings.port
        # the drain's step (close every connection with 1012: `event: close`), then the stop
        srv.node.hub.close_all(1012, "service restart")
        await srv.stop()
        for i in range(3, 8):  # published while the page is away
            await nc.publish(f"push.{channel}", json.dumps({"i": i}).encode())
        await nc.flush()
        srv = await start_server(dev=True, presence_channels=["*.room"], port=port)
        await page.wait_for_function("() => window.got.length >= 8", timeout=30000)
        await page.wait_for_timeout(300)
        got = await page.evaluate("window.got")
        assert [i for i, _ in got] == list(range(8))
        seqs = [s for _, s in got]
        assert seqs == sorted(set(seqs))
        assert 1012 in await page.evaluate("window.closes")
        assert await page.evaluate("window.client.transport") == "sse"  # kept for reconnects


async def test_default_url_is_the_base_path_the_script_was_served_under(start_server, channel):
    """Loaded from ``<base>/static/pushsvc.js``, the client talks to ``<base>/ws`` by default,
    whatever page it runs in; a bundled copy uses the page's folder instead."""
    srv = await start_server(dev=True, base_path="/push")
    async with launch() as browser:
        page = await browser.new_page()
        await page.goto(f"{srv.base}/healthz")
        await page.add_script_tag(url=f"{srv.base}/static/pushsvc.js")
        url = await page.evaluate(
            """async ([token, channel]) => {
                const c = new PushsvcClient({ token });
                const sub = c.subscribe(channel, () => {});
                c.connect();
                await sub.ready;
                c.close();
                return [c.url, c.baseUrl];
            }""",
            [srv.token("tom"), channel],
        )
        assert url == [srv.ws_url, srv.base]
