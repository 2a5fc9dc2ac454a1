"""Chromium inflates pushsvc's shared compressed frames (PUSHSVC_COMPRESSION=deflate).

Chromium offers ``permessage-deflate; client_max_window_bits`` on every
WebSocket by itself; the server answers with ``server_no_context_takeover`` and
``client_no_context_takeover`` (RFC 7692 7.1.1) and sends batches of 512 bytes
or more compressed (RSV1), smaller ones plain. A raw ``WebSocket`` in the page
must get every message exactly as published: the ~2 KiB order-book sample,
small messages, a 40 KiB one, multi-byte UTF-8, and a burst that coalesces.

Skipped when no chromium binary is installed (``.ci/run`` installs Debian's
``chromium`` package, so CI runs these).
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
from browser import CHROMIUM, launch

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

SAMPLE = resources.files("pushsvc.bench").joinpath("samples/orderbook.json").read_bytes().strip()

PAGE = """([url, token, channel]) => new Promise((resolve, reject) => {
    window.got = [];
    const ws = new WebSocket(url);
    window.ws = ws;
    ws.onerror = () => reject(new Error("websocket error"));
    ws.onopen = () => ws.send(JSON.stringify({ op: "auth", token }));
    ws.onmessage = (event) => {
        for (const line of event.data.split("\\n")) {
            const frame = JSON.parse(line);
            if (frame.type === "welcome") ws.send(JSON.stringify({ op: "subscribe", channel }));
            else if (frame.type === "subscribed") resolve(ws.extensions);
            else if (frame.type === "message") window.got.push(frame.data);
            else if (frame.type === "ping") ws.send('{"op":"pong"}');
        }
    };
})"""


async def test_chromium_decodes_every_compressed_frame(start_server, nc, channel):
    srv = await start_server(compression="deflate")
    sent: list[object] = [
        json.loads(SAMPLE),
        {"i": 1},
        {"text": "ünïcödé ✓ 🚀 " * 200},
        {"blob": "".join(f"{i:x}" for i in range(8000))},  # ~40 KiB
    ]
    sent += [{"i": i, "pad": "p" * (i * 7 % 900)} for i in range(200)]  # a burst
    async with launch() as browser:
        page = await browser.new_page()
        await page.goto(f"{srv.base}/healthz")
        extensions = await page.evaluate(PAGE, [srv.ws_url, srv.token(), channel])
        assert extensions.startswith("permessage-deflate")
        assert "server_no_context_takeover" in extensions
        assert "client_no_context_takeover" in extensions
        for data in sent:
            await nc.publish(f"push.{channel}", json.dumps(data).encode())
        await nc.flush()
        await page.wait_for_function(f"() => window.got.length >= {len(sent)}", timeout=15000)
        assert await page.evaluate("window.got") == sent
        assert await page.evaluate("window.ws.readyState") == 1  # no protocol error
