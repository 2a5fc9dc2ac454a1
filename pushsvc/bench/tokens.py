"""Tokens for the bench's clients and emitters: minted with a secret, or from ``/dev/token``.

Client ``n`` is user ``bench-<n>`` and emitter ``k`` user ``bench-emit-<k>`` (one
user each, so per-user connection and emit limits are not what is measured);
every token grants ``bench.>`` to subscribe and publish. With ``--secret``
tokens are HS256 JWTs minted here (RFC 7519; claims as in docs/protocol.md).
Without one, a server started with ``pushsvc serve --dev`` hands them out on
``GET <url>/dev/token?user=...&channels=...&publish=...&ttl=...`` (its
generated secret never leaves it), fetched once before the run.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import h11

from ..auth.tokens import mint_token
from .httpclient import HttpConnection
from .options import BenchError
from .system import run_loop, ssl_context

TOKEN_TTL = 3600  # seconds a bench token is valid
DEV_TOKEN_CONNECTIONS = 8  # parallel GET /dev/token requests
DEV_TOKEN_TIMEOUT = 120.0  # seconds for fetching every token
GRANTS = "bench.>"


def mint(cfg: dict[str, Any], sub: str, audience: str | None, typ: str | None = None) -> str:
    """An HS256 token for ``sub`` signed with ``cfg["secret"]``, valid TOKEN_TTL seconds
    (:func:`pushsvc.auth.tokens.mint_token`; ``typ`` is the JOSE header the server may require)."""
    return mint_token(
        cfg["secret"],
        sub,
        channels=[GRANTS],
        publish=[GRANTS],
        ttl=TOKEN_TTL,
        audience=audience,
        issuer=cfg["issuer"],
        headers={"typ": typ} if typ else None,
    )


def client_token(cfg: dict[str, Any], gid: int) -> str:
    """The token of bench client ``gid`` (user ``bench-<gid>``)."""
    if cfg["tokens"] is not None:
        return cfg["tokens"]["clients"][gid]
    return mint(cfg, f"bench-{gid}", cfg["audience"], cfg.get("typ"))


def emit_token(cfg: dict[str, Any], k: int) -> str:
    """The token of emitter ``k`` (user ``bench-emit-<k>``), for ``POST /emit``."""
    if cfg["tokens"] is not None:
        return cfg["tokens"]["emit"][k]
    return mint(cfg, f"bench-emit-{k}", cfg["emit_audience"], cfg.get("emit_typ"))


def emitters(cfg: dict[str, Any]) -> int:
    """How many emit connections (and emit users) a ``--via emit`` run uses."""
    return max(1, min(cfg["emit_concurrency"], cfg["messages"]))


def mint_all(cfg: dict[str, Any]) -> dict[str, list[str]]:
    """Every token the run needs, minted once with ``cfg["secret"]`` (same shape as below).

    Runs that reuse these tokens meet the server's verified-token cache alike.
    """
    n_emit = emitters(cfg) if cfg["via"] == "emit" else 0
    return {
        "clients": [
            mint(cfg, f"bench-{n}", cfg["audience"], cfg.get("typ"))
            for n in range(cfg["clients"] + cfg["stall"])
        ],
        "emit": [
            mint(cfg, f"bench-emit-{k}", cfg["emit_audience"], cfg.get("emit_typ"))
            for k in range(n_emit)
        ],
    }


def fetch_dev_tokens(cfg: dict[str, Any]) -> dict[str, list[str]]:
    """Fetch every token the run needs from the server's ``GET /dev/token`` (dev mode).

    Returns:
        {"clients": one token per client (stalled ones included), "emit": one per emitter}.

    Raises:
        BenchError: the server is unreachable, not in dev mode (404) or refused a request;
            the message says which and how to give a secret instead.
    """
    users = [f"bench-{n}" for n in range(cfg["clients"] + cfg["stall"])]
    n_emit = emitters(cfg) if cfg["via"] == "emit" else 0
    users += [f"bench-emit-{k}" for k in range(n_emit)]
    path = f"{cfg['base']}/dev/token"
    url = f"{cfg['http_url']}/dev/token"
    hint = (
        "--secret (or PUSHSVC_JWT_SECRET) is required to mint tokens, unless the server "
        "runs `pushsvc serve --dev`"
    )

    async def one(conn: HttpConnection, user: str) -> str:
        query = urlencode({"user": user, "channels": GRANTS, "publish": GRANTS, "ttl": TOKEN_TTL})
        status, _, body = await conn.request("GET", f"{path}?{query}", [])
        if status == 404:
            raise BenchError(f"{hint}: GET {url} answered 404 (not in dev mode)")
        if status != 200:
            raise BenchError(f"{hint}: GET {url} answered {status}: {body[:120]!r}")
        return json.loads(body)["token"]

    async def run() -> list[str]:
        tls = ssl_context(cfg["tls"])
        conns = [
            HttpConnection(cfg["host"], cfg["port"], cfg["netloc"], tls)
            for _ in range(DEV_TOKEN_CONNECTIONS)
        ]
        tokens = [await one(conns[0], users[0])]  # one probe: a non-dev server gives one error
        rest = users[1:]

        async def share(k: int) -> list[str]:
            return [await one(conns[k], u) for u in rest[k :: len(conns)]]

        try:
            shares = await asyncio.wait_for(
                asyncio.gather(*(share(k) for k in range(len(conns)))), DEV_TOKEN_TIMEOUT
            )
        finally:
            for conn in conns:
                conn.close()
        for k in range(len(rest)):  # back in user order
            tokens.append(shares[k % len(conns)][k // len(conns)])
        return tokens

    try:
        tokens = run_loop(run())
    except (OSError, h11.ProtocolError, TimeoutError) as exc:
        raise BenchError(f"{hint}: GET {url} failed: {exc!r}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{hint}: GET {url} gave no token: {exc!r}") from None
    return {"clients": tokens[: len(tokens) - n_emit], "emit": tokens[len(tokens) - n_emit :]}
