"""The demo page of ``pushsvc serve --dev`` (pushsvc/static/index.html) in Debian's chromium.

A chat: pages pick random names, join rooms (channels ``chat.<room>``), see who said
what, when and at which seq, and a late joiner sees the history. The connection badge
says in words why the socket closed (a server restart) and that it reconnected. A
pasted bad token is refused (4001) and not replaced. The console tab shows raw frames.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from browser import CHROMIUM, launch

browser_only = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

CONNECTED = "document.querySelector('#status').dataset.state === 'connected'"

# Words of the chat column (names, texts, notices) that the layout broke across lines.
SPLIT_WORDS = """() => {
    const split = [];
    for (const el of document.querySelectorAll('#messages li *, #rooms button, #status')) {
        for (const node of el.childNodes) {
            if (node.nodeType !== Node.TEXT_NODE) continue;
            for (const m of node.data.matchAll(/\\S+/g)) {
                const range = document.createRange();
                range.setStart(node, m.index);
                range.setEnd(node, m.index + m[0].length);
                const tops = new Set(Array.from(range.getClientRects(), r => Math.round(r.top)));
                if (tops.size > 1) split.push(m[0]);
            }
        }
    }
    return split;
}"""


@pytest.fixture
async def browser():
    async with launch() as b:
        yield b


class Problems:
    """Every HTTP answer >= 400, uncaught page error and console error of the watched pages."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page: Any) -> Any:
        page.on("response", lambda r: r.status >= 400 and self.seen.append(f"{r.status} {r.url}"))
        page.on("pageerror", lambda e: self.seen.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: m.type == "error" and self.seen.append(f"console: {m.text}"),
        )
        return page


async def open_chat(browser: Any, srv: Any, problems: Problems, width: int = 1280) -> Any:
    """A new page on the demo, connected with its dev token; returns the page."""
    page = problems.watch(await browser.new_page(viewport={"width": width, "height": 800}))
    await page.goto(f"{srv.base}/")
    await page.wait_for_function(CONNECTED, timeout=10000)
    return page


async def join(page: Any, room: str) -> None:
    await page.fill("#room", room)
    await page.click("#join")
    joined = page.locator("#messages li.notice", has_text=f"joined chat.{room}")
    await joined.wait_for(timeout=10000)


async def say(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


async def messages(page: Any) -> list[dict[str, Any]]:
    """The shown chat messages: [{who, text, seq, time}] in display order."""
    return await page.evaluate(
        """() => Array.from(document.querySelectorAll('#messages li.msg')).map(li => ({
            who: li.querySelector('.who').textContent,
            text: li.querySelector('.text').textContent,
            seq: li.dataset.seq ? Number(li.dataset.seq) : null,
            time: li.querySelector('time').textContent,
        }))"""
    )


async def wait_for_text(page: Any, text: str) -> None:
    await page.locator("#messages li.msg .text", has_text=text).first.wait_for(timeout=10000)


@browser_only
async def test_two_pages_chat_and_a_late_joiner_sees_the_history(start_server, browser):
    srv = await start_server(dev=True)
    problems = Problems()
    room = f"r{uuid.uuid4().hex[:8]}"
    wide = await open_chat(browser, srv, problems)
    phone = await open_chat(browser, srv, problems, width=390)
    alice = await wide.input_value("#user")
    bob = await phone.input_value("#user")
    assert alice and bob and alice != bob  # random names, not "alice" in every tab
    assert alice in await wide.text_content("#status")
    assert "expires at" in await wide.text_content("#identity-note")

    await join(wide, room)
    await join(phone, room)
    await say(wide, "hello from the wide page")
    await wait_for_text(phone, "hello from the wide page")
    await say(phone, "and hello back from a phone-sized page with a longer line of text")
    await wait_for_text(wide, "hello back")

    seen = await messages(wide)
    assert [(m["who"], m["text"]) for m in seen] == [
        (alice, "hello from the wide page"),
        (bob, "and hello back from a phone-sized page with a longer line of text"),
    ]
    assert seen[0]["seq"] < seen[1]["seq"]  # stream sequences, shown with each message
    assert all(m["time"] for m in seen)
    assert await messages(phone) == seen
    # 390 px wide: nothing sticks out sideways, and no word is split across two lines
    assert await phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert await phone.evaluate(SPLIT_WORDS) == []

    late = await open_chat(browser, srv, problems)
    await join(late, room)
    await wait_for_text(late, "hello back")
    assert await messages(late) == seen  # the history, in order, with names and seqs
    assert not problems.seen  # no 404 (favicon), no script error


@browser_only
async def test_badge_shows_the_server_restart_and_the_reconnect(start_server, browser):
    srv = await start_server(dev=True)
    problems = Problems()
    page = await open_chat(browser, srv, problems)
    room = f"r{uuid.uuid4().hex[:8]}"
    await join(page, room)
    await page.evaluate(
        """() => {
            const badge = document.querySelector('#status');
            window.badges = [];
            new MutationObserver(() => window.badges.push(badge.textContent))
                .observe(badge, {childList: true, characterData: true, subtree: true});
        }"""
    )
    port = srv.settings.port
    await srv.stop()  # graceful drain: sessions closed with 1012
    await start_server(dev=True, port=port)  # the same address, as a restart would
    await page.wait_for_function(
        "document.querySelector('#status').textContent.includes('reconnected as')", timeout=20000
    )
    badges = await page.evaluate("window.badges")
    # "reconnecting in 1.2 s" counting down ("reconnecting now" when the jitter drew ~0 s)
    assert any("server restarting (1012), reconnecting" in b for b in badges), badges
    # and the chat works again over the new connection
    await say(page, "after the restart")
    await wait_for_text(page, "after the restart")
    # (failed attempts while the server was down are logged by chromium; scripts did not fail)
    assert not [p for p in problems.seen if p.startswith("page error")]


@browser_only
async def test_a_pasted_bad_token_shows_4001_and_stops(start_server, browser):
    srv = await start_server(dev=True)
    problems = Problems()
    page = await open_chat(browser, srv, problems)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.click("#token-box summary")
    await page.fill("#token", "not-a-valid-token")
    await page.click("#connect")
    await page.wait_for_function(
        "document.querySelector('#status').dataset.state === 'stopped'", timeout=10000
    )
    status = await page.text_content("#status")
    assert "4001" in status and "not reconnecting" in status
    assert "refused the token" in await page.text_content("#identity-note")
    await page.wait_for_timeout(1500)  # a client that retried would have opened another socket
    assert len(sockets) == 1
    assert await page.input_value("#token") == "not-a-valid-token"  # not replaced by a dev token
    assert await page.get_attribute("#status", "data-state") == "stopped"

    await page.fill("#token", srv.token("pasted-user"))  # a good pasted token works
    await page.click("#connect")
    await page.wait_for_function(CONNECTED, timeout=10000)
    assert "pasted-user" in await page.text_content("#status")
    assert "expires at" in await page.text_content("#identity-note")


@browser_only
async def test_console_tab_shows_raw_frames_of_any_channel(start_server, browser, nc, channel):
    srv = await start_server(dev=True)
    problems = Problems()
    page = await open_chat(browser, srv, problems)
    await page.click("#tab-console")
    await page.fill("#channel", channel)
    await page.click("#subscribe")
    subscribed = page.locator("#log li.in", has_text=channel).filter(has_text='"subscribed"')
    await subscribed.first.wait_for(timeout=10000)
    await nc.publish(f"push.{channel}", json.dumps({"hello": "browser"}).encode())
    frame = page.locator("#log li.in", has_text=channel).filter(has_text='"type": "message"')
    await frame.first.wait_for(timeout=10000)
    assert '"hello": "browser"' in await frame.first.text_content()
    log = await page.text_content("#log")
    assert '"op": "auth"' in log and "redacted" in log  # the token itself is not shown
    assert "eyJ" not in log
    assert not problems.seen


async def test_demo_assets_are_served_in_dev_mode_only(start_server, http):
    dev = await start_server(dev=True)
    for path, media_type in [
        ("/", "text/html"),
        ("/favicon.ico", "image/svg+xml"),
        ("/static/favicon.svg", "image/svg+xml"),
        ("/static/demo.js", "text/javascript"),
        ("/static/demo.css", "text/css"),
        ("/static/pushsvc.js", "text/javascript"),
    ]:
        r = await http.get(dev.base + path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media_type), path
    assert (await http.get(dev.base + "/static/index.html")).status_code == 404
    assert (await http.get(dev.base + "/static/..%2Fapp.py")).status_code == 404

    prod = await start_server()
    for path in ["/", "/favicon.ico", "/static/demo.js"]:
        assert (await http.get(prod.base + path)).status_code == 404, path
    assert (await http.get(prod.base + "/static/pushsvc.js")).status_code == 200


@browser_only
async def test_demo_works_under_a_base_path(start_server, browser):
    srv = await start_server(dev=True, base_path="/push")
    problems = Problems()
    page = await open_chat(browser, srv, problems)  # page, script, token and socket under /push
    await join(page, f"r{uuid.uuid4().hex[:8]}")
    await say(page, "under a base path")
    await wait_for_text(page, "under a base path")
    assert not problems.seen


MEMBERS = "() => Array.from(document.querySelectorAll('#members li'), li => li.dataset.user)"


async def members_are(page: Any, users: list[str]) -> None:
    """Wait until the shown room's "who is here" list is exactly ``users`` (sorted)."""
    await page.wait_for_function(
        f"want => JSON.stringify(({MEMBERS})()) === JSON.stringify(want)",
        arg=sorted(users),
        timeout=10000,
    )


@browser_only
async def test_who_is_here_follows_presence_and_join_leave(start_server, browser):
    """The room lists who is present (presence on joining), then follows join/leave events
    from the other page, on the same node, through the public client API only."""
    srv = await start_server(dev=True)  # --dev: presence and join/leave on chat.>
    problems = Problems()
    room = f"r{uuid.uuid4().hex[:8]}"
    wide = await open_chat(browser, srv, problems)
    alice = await wide.input_value("#user")
    await join(wide, room)
    await members_are(wide, [alice])
    assert await wide.locator("#members li.me").text_content() == alice

    phone = await open_chat(browser, srv, problems, width=390)
    bob = await phone.input_value("#user")
    await join(phone, room)
    await members_are(phone, [alice, bob])  # from presence
    await members_are(wide, [alice, bob])  # from bob's join event
    assert await wide.text_content("#member-count") == "(2)"

    await phone.click("#leave")  # unsubscribes: a leave event for the others
    await members_are(wide, [alice])
    await phone.close()

    late = await open_chat(browser, srv, problems)
    carol = await late.input_value("#user")
    await join(late, room)
    await members_are(wide, [alice, carol])
    await late.close()  # the socket goes away: leave
    await members_are(wide, [alice])
    assert not problems.seen


@browser_only
async def test_chat_over_sse_and_websocket_together(start_server, browser):
    """The demo's transport choice: a page over SSE and one over WebSocket chat in one
    room; the sender shown is the one the server stamped."""
    srv = await start_server(dev=True)
    problems = Problems()
    room = f"r{uuid.uuid4().hex[:8]}"
    ws_page = await open_chat(browser, srv, problems)
    sse_page = await open_chat(browser, srv, problems)
    await sse_page.select_option("#transport", "sse")
    await sse_page.click("#connect")
    await sse_page.wait_for_function(CONNECTED, timeout=10000)
    assert await sse_page.evaluate("window.pushsvcDemoClient.transport") == "sse"
    sse_user = await sse_page.input_value("#user")
    await join(ws_page, room)
    await join(sse_page, room)
    await say(sse_page, "sent over SSE")
    await wait_for_text(ws_page, "sent over SSE")
    await say(ws_page, "sent over WebSocket")
    await wait_for_text(sse_page, "sent over WebSocket")
    seen = await messages(sse_page)
    assert [m["text"] for m in seen] == ["sent over SSE", "sent over WebSocket"]
    assert seen[0]["who"] == sse_user
    assert await messages(ws_page) == seen
    assert not problems.seen
