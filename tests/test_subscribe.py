"""`pushsvc subscribe` as a user runs it: real server, real NATS, the CLI in a subprocess."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pushsvc import Publisher
from pushsvc.bench import add_arguments
from pushsvc.bench.options import build_config
from pushsvc.subscriber import Subscriber

PUSHSVC = [sys.executable, "-m", "pushsvc"]


class Cli:
    """A running ``pushsvc subscribe`` process, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []

    async def line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, f"subscriber ended: {await self.errors()}"
        return line.decode().rstrip("\n")

    async def status(self, text: str, timeout: float = 30) -> str:
        """Wait for a stderr status line containing ``text``."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, f"subscriber ended: {self.stderr}"
                self.stderr.append(line)
                if text in line:
                    return line

    async def errors(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


@pytest.fixture
async def subscribe() -> AsyncIterator[Any]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str, **env: str) -> Cli:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
        proc = await asyncio.create_subprocess_exec(
            *PUSHSVC,
            "subscribe",
            *args,
            env={**clean, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        return Cli(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_prints_one_json_message_per_line_and_raw_data(
    start_server, subscribe, nats_url, channel
):
    from conftest import SECRET

    srv = await start_server()
    full = await subscribe(channel, "--url", srv.base, "--token", srv.token("ann"))
    # --secret/--sub mints its own token; PUSHSVC_URL is the default --url
    raw = await subscribe(
        channel, "--raw", "--sub", "bob", PUSHSVC_URL=srv.base, **{"PUSHSVC_JWT_SECRET": SECRET}
    )
    await full.status("subscribed to")
    await raw.status("subscribed to")
    async with Publisher(nats_url) as pub:
        s1 = await pub.publish(channel, {"text": "hello"})
        s2 = await pub.publish(channel, b"plain words")
    m1, m2 = json.loads(await full.line()), json.loads(await full.line())
    assert m1 == {"type": "message", "channel": channel, "data": {"text": "hello"}, "seq": s1}
    assert (m2["data"], m2["seq"]) == ("plain words", s2)
    assert await raw.line() == '{"text":"hello"}'
    assert await raw.line() == "plain words"


async def test_resumes_after_a_server_restart_without_loss(
    start_server, subscribe, nats_url, channel
):
    srv = await start_server()
    port = srv.settings.port
    cli = await subscribe(channel, "--url", srv.base, "--token", srv.token("ann"))
    await cli.status("subscribed to")
    async with Publisher(nats_url) as pub:
        seqs = [await pub.publish(channel, {"n": n}) for n in (1, 2)]
        got = [json.loads(await cli.line()) for _ in range(2)]
        await srv.stop()  # graceful drain: the subscriber is closed with 1012
        assert "1012" in await cli.status("disconnected")
        # published while no server runs: JetStream keeps them for the resume
        seqs += [await pub.publish(channel, {"n": n}) for n in (3, 4)]
        await start_server(port=port)
        seqs.append(await pub.publish(channel, {"n": 5}))
        got += [json.loads(await cli.line(60)) for _ in range(3)]
    assert [m["data"]["n"] for m in got] == [1, 2, 3, 4, 5]  # in order, none twice
    assert [m["seq"] for m in got] == seqs


async def test_refusals_stop_with_one_line(start_server, subscribe, channel):
    srv = await start_server()
    bad = await subscribe(channel, "--url", srv.base, "--token", "not-a-jwt")
    assert await asyncio.wait_for(bad.proc.wait(), 30) == 1
    err = await bad.errors()
    assert err.count("\n") == 1 and "4001" in err and srv.ws_url in err
    token = srv.token("ann", channels=["other.*"])
    forbidden = await subscribe(channel, "--url", srv.base, "--token", token)
    assert await asyncio.wait_for(forbidden.proc.wait(), 30) == 1
    err = await forbidden.errors()
    assert err.count("\n") == 1 and f"cannot subscribe to {channel!r}: forbidden" in err


async def test_resume_position_carries_the_epoch(start_server, nats_url, channel):
    """`--since` with `--epoch`: another epoch's position is not trusted by the server."""
    import io

    srv = await start_server()
    epoch = (await srv.client()).welcome["epoch"]
    assert epoch
    async with Publisher(nats_url) as pub:
        a = await pub.publish(channel, {"n": 1})
        b = await pub.publish(channel, {"n": 2})

    async def follow(since: int, epoch: str, count: int) -> tuple[Subscriber, list, str]:
        out, err = io.StringIO(), io.StringIO()
        sub = Subscriber(
            srv.base, channel, lambda: srv.token("ann"), since=since, epoch=epoch, out=out, err=err
        )
        await asyncio.wait_for(sub.run(max_messages=count), 30)
        return sub, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()

    sub, got, _ = await follow(a, epoch, 1)  # same epoch: resumes right after a
    assert [m["seq"] for m in got] == [b] and sub.epoch == epoch and sub.last_seq == b
    _, got, err = await follow(b, "an-older-epoch", 2)  # sequences restarted since
    assert [m["seq"] for m in got] == [a, b]  # everything of the current epoch again
    assert "some messages are missing" in err


async def test_says_why_while_the_server_is_not_there(subscribe, channel):
    from pushsvc.server.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}"
    cli = await subscribe(channel, "--url", url, "--token", "t")
    line = await cli.status("cannot connect")
    assert "connection refused; retrying" in line.lower()
    assert cli.proc.returncode is None  # it keeps trying (with backoff)


URL_FORMS = [
    ("127.0.0.1:8000", "ws://127.0.0.1:8000/ws"),
    ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/ws"),
    ("https://push.example/base", "wss://push.example:443/base/ws"),
    ("ws://[::1]:9/base/ws", "ws://[::1]:9/base/ws"),
]


@pytest.mark.parametrize(("url", "endpoint"), URL_FORMS)
def test_subscribe_and_bench_read_url_alike(url, endpoint):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--secret", "s", "--url", url]))
    assert Subscriber(url, "news", lambda: "t").url == cfg["ws_url"] == endpoint


async def test_a_pattern_prints_each_channel_with_its_pattern(start_server, subscribe, nats_url):
    from conftest import SECRET

    srv = await start_server()
    base = f"orders{os.getpid()}x{id(srv) % 10000}"
    cli = await subscribe(
        f"{base}.*", "--url", srv.base, "--sub", "ann", **{"PUSHSVC_JWT_SECRET": SECRET}
    )
    await cli.status(f"subscribed to {base}.*")
    async with Publisher(nats_url) as pub:
        eu = await pub.publish(f"{base}.eu", {"n": 1})
        us = await pub.publish(f"{base}.us", {"n": 2})
    lines = [json.loads(await cli.line()) for _ in range(2)]
    assert [(m["channel"], m["pattern"], m["seq"]) for m in lines] == [
        (f"{base}.eu", f"{base}.*", eu),
        (f"{base}.us", f"{base}.*", us),
    ]


async def test_a_minted_token_refused_twice_stops(start_server, subscribe, channel):
    srv = await start_server()
    cli = await subscribe(
        channel,
        "--url",
        srv.base,
        "--sub",
        "ann",
        PUSHSVC_JWT_SECRET="not-the-server-secret-0123456789abcdef",
    )
    assert await asyncio.wait_for(cli.proc.wait(), 30) == 1
    err = (await cli.errors()).splitlines()
    assert "disconnected (4001" in err[0] and "reconnecting" in err[0]  # minted once more
    assert len(err) == 2 and f"{srv.ws_url} closed the connection: 4001" in err[1]
