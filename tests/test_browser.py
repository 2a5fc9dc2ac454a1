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


async def test_client_api_presence_join_leave_wildcards_server_subs(
    start_server, browser, nc, channel
):
    """pushsvc.js public API only: presence(), presenceStats(), join/leave events,
    wildcard ctx, server-side subscriptions delivered through on("message") and resumed."""
    srv = await start_server(dev=True, presence_channels=["*.room"], join_leave_channels=["*.room"])
    page = await browser.new_page()
    await page.goto(f"{srv.base}/")
    tag = channel.split(".")[0]
    alice = srv.token("alice", extra={"presence": ["*.room"], "info": {"name": "Alice"}})
    bob = srv.token("bob", extra={"subs": [f"{tag}.news"]})
    await page.evaluate(
        """async ([alice, bob, channel, tag]) => {
            window.events = []; window.bobGot = []; window.wild = [];
            const a = new PushsvcClient({ token: alice });
            a.on("join", (e) => window.events.push(["join", e.user, e.info || null]));
            a.on("leave", (e) => window.events.push(["leave", e.user]));
            const joined = a.subscribe(channel, () => {});
            a.subscribe(tag + ".*", (data, ctx) =>
                window.wild.push([ctx.channel, ctx.pattern, data]));
            a.connect();
            // alice must be subscribed before bob joins, or bob's join reaches nobody but bob
            // (join/leave events are not replayed to later subscribers)
            await joined.ready;
            const b = new PushsvcClient({ token: bob });
            b.on("connected", (w) => { window.bobSubs = w.subs; });
            b.on("message", (m) => window.bobGot.push([m.channel, m.data, m.seq]));
            b.subscribe(channel, () => {});
            b.connect();
            window.a = a; window.b = b;
        }""",
        [alice, bob, channel, tag],
    )
    await page.wait_for_function(
        "() => window.events.filter(e => e[0] === 'join').length === 2", timeout=10000
    )
    events = await page.evaluate("window.events")
    assert sorted(e[1] for e in events) == ["alice", "bob"]
    assert ["join", "alice", {"name": "Alice"}] in events

    who = await page.evaluate(f"window.a.presence({json.dumps(channel)})")
    assert who["clients_total"] == 2 and who["users"] == 2
    assert {c["user"] for c in who["clients"]} == {"alice", "bob"}
    stats = await page.evaluate(f"window.a.presenceStats({json.dumps(channel)})")
    assert (stats["clients"], stats["users"]) == (2, 2)
    refused = await page.evaluate(
        f"window.b.presence({json.dumps(channel)}).then(() => null, (e) => e.code)"
    )
    assert refused == "forbidden"

    # wildcard: the concrete channel and the pattern reach the handler
    await nc.publish(f"push.{tag}.eu", b'{"n":1}')
    await page.wait_for_function("() => window.wild.length === 1", timeout=10000)
    assert await page.evaluate("window.wild") == [[f"{tag}.eu", f"{tag}.*", {"n": 1}]]

    # server-side subscription: listed on connected, delivered through on("message")
    assert await page.evaluate("window.bobSubs") == [f"{tag}.news"]
    await nc.publish(f"push.{tag}.news", b'{"n":2}')
    await page.wait_for_function("() => window.bobGot.length === 1", timeout=10000)
    # ... and resumed with since after a restart close: nothing lost, nothing twice
    for sess in list(srv.node.hub.clients):
        if sess.principal.sub == "bob":
            sess.close(1012, "service restart")
    for n in (3, 4):
        await nc.publish(f"push.{tag}.news", json.dumps({"n": n}).encode())
    await nc.flush()
    await page.wait_for_function("() => window.bobGot.length >= 3", timeout=15000)
    await page.wait_for_timeout(300)
    got = await page.evaluate("window.bobGot")
    assert [d["n"] for _, d, _ in got] == [2, 3, 4]

    await page.evaluate("window.b.close()")
    await page.wait_for_function(
        "() => window.events.some(e => e[0] === 'leave' && e[1] === 'bob')", timeout=10000
    )
