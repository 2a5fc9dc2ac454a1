"""Authorisation callouts over NATS: apps that do not mint JWTs decide connections and
subscriptions themselves (e.g. a Django or Flask app checking its session cookie).

Both are NATS requests (:mod:`pushsvc.bus.requests`) answered by any service in
any language, bounded by ``PUSHSVC_AUTH_CALLOUT_TIMEOUT`` seconds (default 2):

- **connect** (``PUSHSVC_CONNECT_AUTH_SUBJECT``): a connection presenting a
  credential that is not a JWT (the auth cookie, ``?ticket=``, ``Authorization:
  Bearer <opaque>``, an ``auth`` frame with a non-JWT token) is decided by a
  request ``{"credential", "transport", "origin", "remote"}``. The answer
  ``{"allow": true, "sub": S, "channels"?, "publish"?, "presence"?, "rpc"?,
  "info"?, "subs"?, "exp"?}`` (the claims of a JWT, same rules; no ``exp``: the
  session lasts :data:`DEFAULT_SESSION_TTL` s, then the client reconnects and is
  asked about again) admits it; ``{"allow": false, "reason": R}`` refuses it.
  No answer in time, no responder, or an unreadable answer: refused too
  (``callout_unavailable``). JWTs are still verified as always, without a request.
- **subscribe** (``PUSHSVC_SUBSCRIBE_AUTH_SUBJECT``): a subscription the token
  does not grant asks ``{"user", "client", "channel", "info"}`` ->
  ``{"allow": bool, "reason"?, "ttl"?}``. An allowed answer with ``ttl`` (s) is
  remembered per (user, channel) for that long (at most :data:`MAX_CACHE`
  entries); refusals are not remembered. Presence and history reads the grants
  do not cover ask the same question.

Refusals count in ``pushsvc_auth_failures_total`` (reasons ``callout_denied``,
``callout_unavailable``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Final

import msgspec

from .. import metrics
from ..bus import NoResponders, Unavailable
from ..bus.requests import Requests
from ..config.settings import Settings
from .tokens import Authenticator, AuthError, Principal, principal_of

DEFAULT_SESSION_TTL: Final = 3600.0  # s a callout-admitted session lasts without "exp"
MAX_CACHE: Final = 10_000  # (user, channel) subscribe decisions remembered
MAX_REASON: Final = 200  # characters of a refusal's reason passed on

DENIED: Final = "callout_denied"
UNAVAILABLE: Final = "callout_unavailable"


class CalloutUnavailable(AuthError):
    """The callout did not answer (timeout, no responder, NATS away, bad answer):
    HTTP handshakes answer 503, an auth frame closes 4001, a subscribe ``unavailable``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, UNAVAILABLE)


class Callouts:
    """The node's callouts; :meth:`install` hands them to the :class:`Authenticator`.

    Args:
        settings: ``connect_auth_subject``, ``subscribe_auth_subject``,
            ``auth_callout_timeout`` (s).
        requests: the bus's request/reply (:attr:`pushsvc.bus.Bus.requests`).
    """

    def __init__(self, settings: Settings, requests: Requests) -> None:
        self.settings = settings
        self.requests = requests
        self.timeout = settings.auth_callout_timeout
        self._allowed: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> until (monotonic)

    def install(self, auth: Authenticator) -> None:
        """Turn on the configured callouts in ``auth`` (none configured: nothing changes)."""
        if self.settings.connect_auth_subject:
            auth.connect_callout = self.connect
        if self.settings.subscribe_auth_subject:
            auth.subscribe_callout = self.subscribe

    async def _ask(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request; the answer as a JSON object.

        Raises:
            CalloutUnavailable: no answer in time, nobody subscribed, NATS away,
                an error reply, or an answer that is not a JSON object.
        """
        try:
            reply = await self.requests.request(
                subject, json.dumps(body).encode(), timeout=self.timeout
            )
        except NoResponders:
            raise CalloutUnavailable("the authorisation service is not running") from None
        except Unavailable:  # RequestTimeout included
            raise CalloutUnavailable("the authorisation service did not answer") from None
        if reply.error is not None:
            raise CalloutUnavailable("the authorisation service failed")
        try:
            answer = msgspec.json.decode(reply.data)
        except (msgspec.DecodeError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            raise CalloutUnavailable("the authorisation service's answer is not a JSON object")
        return answer

    async def connect(self, credential: str, context: dict[str, str | None]) -> Principal:
        """Ask ``PUSHSVC_CONNECT_AUTH_SUBJECT`` about a non-JWT credential.

        Args:
            credential: what the connection presented.
            context: ``transport`` (``ws``, ``sse``, ``stream``), ``origin`` and
                ``remote`` (the peer's IP address), each possibly None.

        The caller counts a refusal in ``pushsvc_auth_failures_total`` (as for a
        refused JWT).

        Raises:
            AuthError: ``callout_denied`` (``allow`` not true, the answer's
                claims invalid, or its ``exp`` past); ``callout_unavailable``.
        """
        subject = self.settings.connect_auth_subject
        assert subject is not None
        answer = await self._ask(subject, {"credential": credential, **context})
        if answer.get("allow") is not True:
            raise AuthError(_reason(answer, "not allowed to connect"), DENIED)
        now = time.time()
        try:
            principal = principal_of(answer, default_exp=now + DEFAULT_SESSION_TTL)
        except AuthError as exc:
            raise AuthError(f"authorisation answer invalid: {exc}", DENIED) from None
        if principal.exp <= now:
            raise AuthError("authorisation answer already expired", DENIED)
        if principal.iat is None:  # a revocation by sub refuses sessions admitted before it
            principal = msgspec.structs.replace(principal, iat=now)
        return principal

    async def subscribe(self, principal: Principal, client: str | None, channel: str) -> bool:
        """Ask ``PUSHSVC_SUBSCRIBE_AUTH_SUBJECT`` whether ``principal`` may read ``channel``.

        Returns:
            True when allowed (remembered for the answer's ``ttl`` s).

        Raises:
            CalloutUnavailable: no usable answer.
        """
        key = (principal.sub, channel)
        until = self._allowed.get(key)
        now = time.monotonic()
        if until is not None:
            if now < until:
                self._allowed.move_to_end(key)
                return True
            del self._allowed[key]
        subject = self.settings.subscribe_auth_subject
        assert subject is not None
        info = None if principal.info is None else msgspec.json.decode(principal.info)
        body = {"user": principal.sub, "client": client, "channel": channel, "info": info}
        try:
            answer = await self._ask(subject, body)
        except CalloutUnavailable:
            metrics.AUTH_FAILURES.labels(UNAVAILABLE).inc()
            raise
        if answer.get("allow") is not True:
            metrics.AUTH_FAILURES.labels(DENIED).inc()
            return False
        ttl = answer.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            self._allowed[key] = now + float(ttl)
            if len(self._allowed) > MAX_CACHE:
                self._allowed.popitem(last=False)
        return True


def _reason(answer: dict[str, Any], default: str) -> str:
    reason = answer.get("reason")
    return reason[:MAX_REASON] if isinstance(reason, str) and reason else default
