"""Closing a node's connections for a revoked token (``pushsvc revoke``, the server API)."""

from __future__ import annotations

from collections.abc import Iterable

from ..protocol import CLOSE_UNAUTHORIZED
from .member import Member


def disconnect_matching(
    clients: Iterable[Member],
    sub: str | None,
    jti: str | None,
    issued_before: float | None = None,
) -> int:
    """Close with 4001 every connection matching ``sub`` and/or ``jti``; returns how many.

    With ``issued_before`` (Unix seconds), a ``sub`` match only counts for tokens
    issued (``iat``) at or before it, as a revocation by ``sub`` refuses them
    (docs/operations.md, "Revocation").
    """
    closed = 0
    for member in list(clients):
        p = member.principal
        if (
            (sub is None or p.sub == sub)
            and (jti is None or p.jti == jti)
            and (issued_before is None or p.iat is None or p.iat <= issued_before)
        ):
            member.close(CLOSE_UNAUTHORIZED, "token revoked")
            closed += 1
    return closed
