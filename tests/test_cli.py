"""The CLI as a user runs it: `pushsvc serve --dev`, `token`, `publish`, config errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import node_env
from wsclient import WSClient

from pushsvc.server.embedded import free_port

PUSHSVC = [sys.executable, "-m", "pushsvc"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    env.update(extra)
    return env


def run(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        PUSHSVC + args, env=clean_env(**extra), capture_output=True, text=True, timeout=60
    )


async def test_serve_dev_as_in_readme(tmp_path):
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test, read from a thread
        [*PUSHSVC, "serve", "--dev", "--port", str(port), "--data-dir", str(tmp_path)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        token = None
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline and token is None:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("ey"):
                token = line.strip()
        assert token, "".join(lines)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                try:
                    r = await http.get(f"{base}/healthz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert (await http.get(f"{base}/healthz")).json()["status"] == "ok"
            assert (await http.get(f"{base}/readyz")).status_code == 200
            dev = (await http.get(f"{base}/dev/token", params={"user": "zoe"})).json()
            page = await http.get(f"{base}/")
            assert page.status_code == 200 and "pushsvc" in page.text.lower()
            js = await http.get(f"{base}/static/pushsvc.js")
            assert js.status_code == 200 and "PushsvcClient" in js.text
        c = await WSClient.connect(f"ws://127.0.0.1:{port}/ws", token)
        assert c.welcome["user"] == "dev"
        await c.subscribe("demo")
        # A query-string token must never reach the access log.
        z = await WSClient.connect(f"ws://127.0.0.1:{port}/ws?token={dev['token']}", None)
        await z.expect("welcome")
        await z.send({"op": "publish", "channel": "demo", "data": {"hello": 1}, "id": 1})
        await z.expect("published", id=1)
        (m,) = await c.messages(1)
        assert m["data"] == {"hello": 1}
        # Graceful stop: sessions are closed with 1012 (service restart).
        proc.send_signal(signal.SIGTERM)
        assert await c.closed(10) == 1012
        assert await asyncio.to_thread(proc.wait, 20) == 0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "/ws?token=[redacted]" in rest
    assert dev["token"] not in rest and token not in rest


async def test_dev_routes_are_off_without_dev(start_server, http):
    srv = await start_server()
    assert (await http.get(f"{srv.base}/dev/token", params={"user": "x"})).status_code == 404
    assert (await http.get(f"{srv.base}/")).status_code == 404
    assert (await http.get(f"{srv.base}/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({}, "PUSHSVC_JWT_SECRET"),
        ({"PUSHSVC_JWT_SECRET": "s", "PUSHSVC_NATS_URL": "http://x"}, "PUSHSVC_NATS_URL"),
        ({"PUSHSVC_JWT_PUBLIC_KEY": "/nonexistent.pem"}, "PUSHSVC_JWT_PUBLIC_KEY"),
        ({"PUSHSVC_JWT_SECRET": "s", "PUSHSVC_PORT": "eighty"}, "PUSHSVC_PORT"),
        ({"PUSHSVC_JWT_SECRET": "s", "PUSHSVC_JWT_ALGORITHMS": "none"}, "PUSHSVC_JWT_ALGORITHMS"),
    ],
)
def test_config_errors_are_one_line(env, setting):
    r = run(["serve"], **env)
    assert r.returncode == 2
    assert setting in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreachable_nats_fails_fast_with_one_line():
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    r = run(
        ["serve", "--port", str(free_port())],
        PUSHSVC_JWT_SECRET="s",
        PUSHSVC_NATS_URL=url,
        PUSHSVC_CONNECT_TIMEOUT="2",
    )
    assert r.returncode == 1
    assert time.monotonic() - started < 20
    # one line naming the setting, the URL and the cause; no per-attempt warnings
    assert r.stderr.count("\n") == 1, r.stderr
    assert "PUSHSVC_NATS_URL" in r.stderr and url in r.stderr
    assert f"cannot reach NATS at {url} within 2 s: connection refused" in r.stderr
    assert r.stdout == ""  # no banner, no token


def test_busy_port_fails_before_banner_and_nats(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(["serve", "--dev", "--port", str(port), "--data-dir", str(tmp_path / "nats")])
    assert r.returncode == 1
    assert r.stdout == ""  # no banner, no dev token
    assert r.stderr == f"pushsvc: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not (tmp_path / "nats").exists()  # the bundled nats-server was never started


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        (["serve", "--port", "99999"], {}, "PUSHSVC_PORT"),
        (["serve", "--port", "-1"], {}, "PUSHSVC_PORT"),
        (["serve"], {"PUSHSVC_PORT": "65536"}, "PUSHSVC_PORT"),
        (["serve"], {"PUSHSVC_NATS_URL": "nats://127.0.0.1:99999"}, "PUSHSVC_NATS_URL"),
        (["serve"], {"PUSHSVC_NATS_URL": "nats://127.0.0.1:0"}, "PUSHSVC_NATS_URL"),
        (["serve"], {"PUSHSVC_NATS_URL": "nats://127.0.0.1:"}, "PUSHSVC_NATS_URL"),
        (["publish", "a", "1", "--nats-url", "nats://127.0.0.1:70000"], {}, "--nats-url"),
        (["publish", "a", "1"], {"PUSHSVC_NATS_URL": "nats://a:1,nats://b:0"}, "PUSHSVC_NATS_URL"),
        (["subscribe", "a", "--token", "t", "--url", "http://127.0.0.1:99999"], {}, "--url"),
        (["subscribe", "a", "--token", "t"], {"PUSHSVC_URL": "http://127.0.0.1:0"}, "--url"),
    ],
)
def test_ports_are_1_to_65535(args, env, setting):
    r = run(args, PUSHSVC_JWT_SECRET="s", **env)
    assert r.returncode == 2, r.stderr
    assert setting in r.stderr and "port" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


async def test_port_0_is_any_free_port_and_the_banner_says_which(nats_url):
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test, read from a thread
        [*PUSHSVC, "serve", "--port", "0"],
        env=node_env(PUSHSVC_JWT_SECRET="s", PUSHSVC_NATS_URL=nats_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = await asyncio.to_thread(proc.stdout.readline)
        base = banner.split()[-1]
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0"), banner
        async with httpx.AsyncClient() as http:
            # the socket listens before the banner: the request waits in the backlog
            r = await http.get(f"{base}/healthz", timeout=30)
        assert r.json()["status"] == "ok"
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)


async def test_token_and_publish_commands(start_server, nats_url, channel):
    from conftest import SECRET

    srv = await start_server()
    r = run(
        ["token", "--sub", "alice", "--channel", "chat.*", "--publish", "chat.*", "--ttl", "60"],
        PUSHSVC_JWT_SECRET=SECRET,
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    c = await WSClient.connect(srv.ws_url, token)
    await c.subscribe("chat.room")
    await c.send({"op": "subscribe", "channel": "news", "id": 1})
    await c.expect("error", code="forbidden")
    p = await asyncio.to_thread(
        run, ["publish", "chat.room", '{"from": "cli"}'], PUSHSVC_NATS_URL=nats_url
    )
    assert p.returncode == 0, p.stderr
    # the output names the server it published to
    out = json.loads(p.stdout)
    assert out["channel"] == "chat.room" and out["seq"] > 0 and out["nats"] == nats_url
    (m,) = await c.messages(1)
    assert m["data"] == {"from": "cli"}
    bad = run(["publish", "chat.*", "1"], PUSHSVC_NATS_URL=nats_url)
    assert bad.returncode == 1 and "channel" in bad.stderr


def test_publish_failures_name_the_url(own_nats):
    url = f"nats://127.0.0.1:{free_port()}"
    r = run(["publish", "news", "1"], PUSHSVC_NATS_URL=url)
    assert r.returncode == 1
    assert r.stderr == f"pushsvc: publish failed: cannot reach NATS at {url}: connection refused\n"
    # a NATS that is not pushsvc's (no stream stores push.>): refused, not "published"
    r = run(["publish", "news", "1", "--nats-url", own_nats.url])
    assert r.returncode == 1 and r.stdout == ""
    assert own_nats.url in r.stderr and "no JetStream stream stores push.news" in r.stderr
