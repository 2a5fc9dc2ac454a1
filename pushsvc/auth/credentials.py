"""Bearer credentials of the HTTP endpoints (emit, ``/history``, ``/presence``).

A reader presents ``Authorization: Bearer <credential>`` (RFC 6750 2.1): a
configured API key (any channel), a connection token (as for ``/ws``), or a
backend's emit token (``PUSHSVC_EMIT_AUDIENCE`` / ``PUSHSVC_EMIT_TYPE``). What the
principal may read is the caller's rule (subscribe grants, presence grants).
"""

from __future__ import annotations

from fastapi import Request

from .. import metrics
from ..api.errors import HTTPError
from .tokens import Authenticator, AuthError, Principal


def bearer_credential(request: Request) -> str:
    """The credential of ``Authorization: Bearer <credential>`` (RFC 6750 2.1).

    Raises:
        HTTPError: 401 ``unauthorized`` when the header is missing or malformed
            (counted in ``pushsvc_auth_failures_total{reason="missing"}``).
    """
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
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
