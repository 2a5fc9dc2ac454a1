"""Opening a NATS connection: credentials, TLS, and failing fast when NATS refuses us.

Every place pushsvc talks to NATS (``serve``'s :class:`~pushsvc.bus.Bus`,
``pushsvc publish``, ``pushsvc bench``, :class:`~pushsvc.publisher.Publisher`)
connects through :func:`connect` with a :class:`~pushsvc.config.nats.NatsSecurity`
(the ``PUSHSVC_NATS_*`` settings as nats-py ``connect()`` arguments: the table is
in :mod:`pushsvc.config.nats`).

nats-py retries a failing first connect while ``allow_reconnect`` is on and only
reports each failure to ``error_cb``; :func:`connect` watches those reports and
stops at the first one that no retry can cure (authorization violation, TLS
certificate verification, an unreadable file), raising :class:`NatsRefused`.
When the connect gives up otherwise (time bound reached, every server tried), it
raises :class:`NatsUnreachable` naming the URL(s) and the cause of the last
failed attempt (:func:`connect_failure`), so callers report it in one line.
Secrets (password, token, seeds, URL passwords) never appear in its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

from ..config.nats import NatsRefused, NatsSecurity, NatsUnreachable, display_url


def refusal_reason(exc: BaseException) -> str | None:
    """The cause of a connect failure no retry can cure, or None (retry may help).

    Authorization errors are the server's ``-ERR 'Authorization Violation'`` (and
    ``'User Authentication Expired'``, ``'Authentication Timeout'``); TLS errors
    are the ``ssl`` module's; unreadable files are the credentials files nats-py
    opens at each connect.
    """
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text:
        return "authorization violation"
    if "authentication expired" in text or "authentication timeout" in text:
        return f"authorization failed ({str(exc).removeprefix('nats: ').strip(chr(39))})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        why = exc.reason or str(exc)
        if "CERTIFICATE_REQUIRED" in why:
            why += " (the server wants a client certificate: PUSHSVC_NATS_TLS_CERT/KEY)"
        return f"TLS handshake failed: {why}"
    if "secure connection" in text and "tls required" in text:
        return "the server requires TLS (use a tls:// URL or the PUSHSVC_NATS_TLS_* settings)"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"file unreadable: {exc.filename}: {exc.strerror}"
    if type(exc).__module__.startswith("nkeys"):
        return "invalid NKey seed"
    return None


def connect_failure(exc: BaseException, attempts: list[Exception] | None = None) -> str:
    """Why a NATS connect failed, in a few words, e.g. ``connection refused``.

    Args:
        exc: the exception that ended the connect (often a timeout).
        attempts: errors nats-py reported to ``error_cb`` on the way; the last
            one is the real cause when ``exc`` is only the timeout.
    """
    last = attempts[-1] if attempts else exc
    if isinstance(last, ConnectionRefusedError):
        return "connection refused"
    if isinstance(last, OSError) and last.strerror:
        return last.strerror[:1].lower() + last.strerror[1:]
    if isinstance(last, TimeoutError | asyncio.TimeoutError | nats.errors.TimeoutError):
        return "no answer (timeout)"
    text = str(last).strip()
    return f"{type(last).__name__}: {text}" if text else type(last).__name__


ErrorCallback = Callable[[Exception], Awaitable[None]]


async def connect(
    servers: str | list[str],
    security: NatsSecurity | None = None,
    *,
    timeout: float,
    error_cb: ErrorCallback | None = None,
    **options: Any,
) -> NatsClient:
    """``nats.connect()`` with ``security`` applied, bounded and failing fast.

    Args:
        servers: NATS URL or URLs (``nats://``, ``tls://``, ``ws(s)://``).
        security: credentials and TLS; None = none.
        timeout: seconds for the whole first connect (all retries included).
        error_cb: nats-py's error callback once connected (errors on a live
            connection, failed reconnects); the failed attempts of the first
            connect are kept to name the cause instead. None = ignore them
            (nats-py's default would print tracebacks).
        **options: any other ``nats.connect()`` keyword (``name``,
            ``allow_reconnect``, ``connect_timeout``, ...).

    Returns:
        The connected nats-py client.

    Raises:
        NatsRefused: the server refused us (see :func:`refusal_reason`); raised at
            the first such report, not after the retries.
        NatsUnreachable: not connected within ``timeout`` seconds, or the connect
            failed otherwise (e.g. every server tried with ``allow_reconnect=False``);
            names the URL(s) and the cause of the last failed attempt.
    """
    security = security or NatsSecurity()
    urls = [servers] if isinstance(servers, str) else list(servers)
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[NatsRefused] = loop.create_future()
    attempts: list[Exception] = []  # failed attempts of the first connect
    connected = False
    nc = NatsClient()

    async def on_error(exc: Exception) -> None:
        reason = _refusal(exc, security, urls)
        if reason is not None and not refused.done() and not task.done():
            # only while the first connect runs: later refusals (on reconnect) are
            # reported to error_cb like any other error
            refused.set_result(NatsRefused(_current_url(nc, urls), reason))
            return
        if not connected:  # the first connect: summed up in NatsUnreachable
            attempts.append(exc)
        elif error_cb is not None:
            await error_cb(exc)

    task = asyncio.ensure_future(
        nc.connect(servers, error_cb=on_error, **security.connect_options(), **options)
    )
    try:
        done, _ = await asyncio.wait(
            {task, refused}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
    except asyncio.CancelledError:
        task.cancel()
        await _close_quietly(nc, task)
        raise
    failed = task.exception() if task in done else None
    if task in done and failed is None:
        connected = True
        return nc
    if failed is None:  # not connected within the time bound
        task.cancel()
    exc = failed or TimeoutError(f"no NATS connection within {timeout:g} s")
    reason = _refusal(failed, security, urls) if failed is not None else None
    await _close_quietly(nc, task)
    if refused.done():
        raise refused.result()
    if reason is not None:
        raise NatsRefused(_current_url(nc, urls), reason) from None
    shown = ", ".join(display_url(u) for u in urls)
    raise NatsUnreachable(shown, connect_failure(exc, attempts), timeout) from None


def _refusal(exc: BaseException, security: NatsSecurity, urls: list[str]) -> str | None:
    """:func:`refusal_reason`, naming what was sent for an authorization failure."""
    reason = refusal_reason(exc)
    if reason is not None and reason.startswith("authorization"):
        reason += f" (sent: {security.describe(urls)})"
    return reason


async def _close_quietly(nc: NatsClient, task: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        await task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 2)


def _current_url(nc: NatsClient, urls: list[str]) -> str:
    server = getattr(nc, "_current_server", None)
    uri = getattr(server, "uri", None)
    if uri is not None:
        return display_url(uri.geturl())
    return ", ".join(display_url(u) for u in urls)
