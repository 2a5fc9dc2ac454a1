"""Credentials: bearer parsing (one place), the connection handshakes' token, HTTP readers.

A connection (``/ws``, ``/sse``, ``/stream``) presents its token, in this order:
``Authorization: Bearer <jwt>``, ``?token=`` (never logged), the cookie named by
``PUSHSVC_AUTH_COOKIE`` (only with an origin allowlist); :func:`handshake_token`.

HTTP endpoints (emit, ``/history``, ``/presence``):

A reader presents ``Authorization: Bearer <credential>`` (RFC 6750 2.1): a
configured API key (any channel), a connection token (as for ``/ws``), or a
backend's emit token (``PUSHSVC_EMIT_AUDIENCE`` / ``PUSHSVC_EMIT_TYPE``). What the
principal may read is the caller's rule (subscribe grants, presence grants).
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser

from .. import metrics
from ..api.errors import HTTPError
from .tokens import Authenticator, AuthError, Principal


def parse_bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` value (RFC 6750 2.1), or None."""
    if not header:
        return None
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential


def handshake_token(headers: Headers, query_string: bytes, cookie: str | None) -> str | None:
    """A connection's token from its opening request, or None (WebSocket: the auth frame).

    Args:
        headers: the request headers.
        query_string: the raw query (``?token=``; most handshakes have none: no parse).
        cookie: ``PUSHSVC_AUTH_COOKIE`` (None: cookies are not read).
    """
    token = parse_bearer(headers.get("authorization"))
    if token is not None:
        return token
    if query_string:
        token = QueryParams(query_string).get("token")
        if token:
            return token
    if cookie and "cookie" in headers:
        token = cookie_parser(headers["cookie"]).get(cookie)
        if token:
            return token
    return None


def bearer_credential(request: Request) -> str:
    """The credential of ``Authorization: Bearer <credential>`` (RFC 6750 2.1).

    Raises:
        HTTPError: 401 ``unauthorized`` when the header is missing or malformed
            (counted in ``pushsvc_auth_failures_total{reason="missing"}``).
    """
    credential = parse_bearer(request.headers.get("authorization"))
    if credential is None:
        metrics.AUTH_FAILURES.labels("missing").inc()
        raise HTTPError(401, "unauthorized", "missing Authorization: Bearer credential")
    return credential


def reader(request: Request, auth: Authenticator) -> Principal | None:
    """The principal behind the request's bearer credential; None for an API key.

    Raises:
        HTTPError: 401 ``unauthorized`` when the header is missing or malformed, or
            the token is invalid, expired or revoked (counted in
            ``pushsvc_auth_failures_total`` by reason).
    """
    credential = bearer_credential(request)
    if auth.is_api_key(credential):
        return None
    try:
        return auth.verify(credential)  # a connection token, as for /ws
    except AuthError as exc:
        try:  # or a backend's emit token
            return auth.verify(credential, purpose="emit")
        except AuthError:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise HTTPError(401, "unauthorized", str(exc)) from None
