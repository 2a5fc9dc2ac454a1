"""How pushsvc runs under uvicorn: the uvicorn settings it needs and its listening socket.

``pushsvc serve`` uses both; an application that runs pushsvc under its own
uvicorn (``create_app``/``setup_app``) passes :func:`uvicorn_config` to
``uvicorn.run`` so the two cannot drift apart::

    uvicorn.run(app, host="0.0.0.0", port=8000, **pushsvc.uvicorn_config(settings))
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from ..config.settings import Settings
from .capacity import raise_nofile_limit

log = logging.getLogger("pushsvc.server")


class ListenError(Exception):
    """The listen address cannot be used (in use, not local, permission denied)."""


def uvicorn_config(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that pushsvc relies on.

    The same values ``pushsvc serve`` uses (see docs/operations.md, "What uvicorn
    must be told"): pushsvc's WebSocket protocol class (uvicorn's
    ``websockets-sansio`` with handshake fixes), ``ws_max_size`` =
    ``PUSHSVC_MAX_FRAME_BYTES`` (bigger frames close 1009), per-message deflate
    only with ``PUSHSVC_COMPRESSION=deflate`` (then negotiated without context
    takeover, :mod:`pushsvc.ws.deflate`),
    no protocol pings (the heartbeat is pushsvc's own ``ping``/``pong``, which
    also finds dead TCP peers: one heartbeat per connection, docs/capacity.md),
    pushsvc's httptools protocol
    (:mod:`pushsvc.server.httpprotocol`: upgrades parsed once), uvloop where
    available, lifespan on, ``PUSHSVC_SHUTDOWN_TIMEOUT`` seconds of graceful
    shutdown (emits in flight finish), and the log level. Host, port and logging
    configuration are not included: they belong to the host application.

    Args:
        settings: pushsvc settings; default :meth:`Settings.load` (``PUSHSVC_*``).

    Returns:
        A dict of uvicorn keyword arguments.

    Raises:
        SettingsError: invalid configuration (when loading from the environment).
    """
    settings = settings or Settings.load()
    return {
        "ws": "pushsvc.ws.protocol:WebSocketProtocol",
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": settings.compression == "deflate",
        "ws_ping_interval": None,
        "ws_ping_timeout": None,
        "http": "pushsvc.server.httpprotocol:HttpToolsProtocol",
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "log_level": settings.log_level,
    }


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: any free port) before anything else starts.

    First the process's soft open-file limit goes up to the hard one
    (:func:`pushsvc.server.capacity.raise_nofile_limit`, logged): every accepted
    connection is a descriptor, and ``--workers`` processes inherit the limit.

    Set up like uvicorn's own listener (``SO_REUSEADDR``; IPv6 when ``host``
    contains ``:``) and handed to uvicorn, so the address ``pushsvc serve`` prints
    is the one it serves, and a busy address fails before NATS is started.
    Connections that arrive while the server starts wait in the backlog.

    Args:
        host: IP address or host name to listen on.
        port: TCP port, 0..65535 (0 = any free port; read the chosen one with
            ``getsockname()``).
        backlog: listen queue length (uvicorn's default).

    Returns:
        A listening TCP socket.

    Raises:
        ListenError: the address cannot be used; the message names it and the
            cause (e.g. "address already in use").
    """
    before, after = raise_nofile_limit()
    if after != before:
        log.info("open-file limit raised from %d to %d", before, after)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        cause = exc.strerror or str(exc)
        cause = cause[:1].lower() + cause[1:]
        raise ListenError(f"cannot listen on {host}:{port}: {cause}") from None
    except Exception:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
