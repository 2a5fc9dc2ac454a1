"""``pushsvc api OP``: the server API from the command line, over NATS.

The same operations as ``nats req <prefix>-api.<op> '<json>'`` (the ``nats`` CLI is
not something every user has) and ``POST /api/<op>``: the flags build the JSON
body, the answer is printed as one JSON line. NATS is ``--nats-url`` (default
``PUSHSVC_NATS_URL``, else ``nats://127.0.0.1:4222``), with the ``PUSHSVC_NATS_*``
security settings; the prefix is ``PUSHSVC_SUBJECT_PREFIX`` (default ``push``).
Exit status: 0 answered, 1 refused (the error JSON on stderr) or NATS away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from ..config import nats as natsconfig
from ..config.errors import SettingsError
from ..config.settings import check_nats_url, split_servers
from .schemas import OPS

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

_FIELDS = ("user", "client", "channel", "since", "epoch", "pattern", "reason", "code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``OP`` and the body flags to the ``pushsvc api`` sub-parser."""
    parser.add_argument("op", choices=list(OPS), help="the operation (docs/server-api.md)")
    parser.add_argument("--user", help="target user (JWT sub)")
    parser.add_argument("--client", help="target connection (welcome.client)")
    parser.add_argument("--channel", help="channel (subscribe, unsubscribe, presence)")
    parser.add_argument("--since", type=int, help="subscribe: replay after this seq")
    parser.add_argument("--epoch", help="subscribe: the stream epoch of --since")
    parser.add_argument("--pattern", help="channels: only those this pattern covers")
    parser.add_argument("--reason", help="disconnect: the close reason")
    parser.add_argument(
        "--reconnect",
        action="store_true",
        default=None,
        help="disconnect: clients reconnect (4012) instead of stopping (4011)",
    )
    parser.add_argument("--code", type=int, help="disconnect: an app close code, 4100-4999")
    parser.add_argument("--data", help="the whole JSON body instead of the flags")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    parser.add_argument(
        "--nats-url", help="NATS URL(s) (default PUSHSVC_NATS_URL, else nats://127.0.0.1:4222)"
    )
    natsconfig.add_arguments(parser)


def body_of(args: argparse.Namespace) -> bytes:
    """The request body: ``--data`` as given, else the flags that were set.

    Raises:
        SettingsError: ``--data`` is not a JSON object.
    """
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError:
            raise SettingsError("--data", "must be a JSON object") from None
        if not isinstance(data, dict):
            raise SettingsError("--data", "must be a JSON object")
        return json.dumps(data).encode()
    body: dict[str, Any] = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
    if args.reconnect:
        body["reconnect"] = True
    return json.dumps(body).encode()


def run(args: argparse.Namespace) -> int:
    """Send the request, print the answer; the exit status."""
    from ..bus import Unavailable, request_once

    if args.nats_url:
        url, setting = args.nats_url, "--nats-url"
    else:
        url, setting = os.environ.get("PUSHSVC_NATS_URL") or DEFAULT_NATS_URL, "PUSHSVC_NATS_URL"
    servers = [check_nats_url(u, setting) for u in split_servers(url)]
    security = natsconfig.NatsSecurity.from_args(args)
    security.check(servers)
    prefix = os.environ.get("PUSHSVC_SUBJECT_PREFIX", "push")
    subject = f"{prefix}-api.{args.op}"
    try:
        reply = asyncio.run(
            request_once(servers, security, subject, body_of(args), timeout=args.timeout)
        )
    except (Unavailable, natsconfig.NatsRefused) as exc:
        print(f"pushsvc: api {args.op}: {exc}", file=sys.stderr)
        return 1
    text = reply.data.decode(errors="replace")
    if reply.error is not None:
        print(text, file=sys.stderr)
        return 1
    print(text)
    return 0
