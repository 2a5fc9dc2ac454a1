"""JWT verification: token -> :class:`Principal`, plus a bounded verified-token cache.

Rules (RFC 7519, RFC 8725 "JWT Best Current Practices"):

- algorithms are pinned by configuration (``PUSHSVC_JWT_ALGORITHMS``; default
  HS256 with ``PUSHSVC_JWT_SECRET``, RS256/ES256 with ``PUSHSVC_JWT_PUBLIC_KEY``);
  ``alg: none`` and HS/asymmetric mixing are never accepted (RFC 8725 3.1, 3.2);
- ``exp`` and ``sub`` are required; ``nbf``/``iat`` are honoured; ``aud`` and
  ``iss`` are checked when configured (RFC 8725 3.9, 3.10); ``leeway`` seconds of
  clock skew are tolerated (default 30);
- unknown ``crit`` header parameters are rejected (RFC 7515 4.1.11, PyJWT);
- ``kid``/``jku``/``x5u``/``jwk`` never trigger a fetch: keys come only from settings
  (RFC 8725 3.10);
- explicit typing (RFC 8725 3.11): with ``PUSHSVC_JWT_TYPE`` / ``PUSHSVC_EMIT_TYPE``
  set, the header ``typ`` must name that type (compared as RFC 7515 4.1.9 says:
  case-insensitively, ``application/`` optional), so a connection token can never
  be replayed as an emit token or the other way round; ``PUSHSVC_EMIT_AUDIENCE``
  does the same job with ``aud`` (RFC 8725 3.9);
- another user's personal channel ``user.<sub>`` is only reachable through a grant
  whose first token is literally ``user`` (e.g. ``user.*``): a catch-all ``>`` or a
  leading ``*`` never grants a subscription to someone else's private channel.

Verification is PyJWT's; this module adds the claim shapes and the cache.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import msgspec
from jwt.algorithms import Algorithm

from ..channels import (
    PERSONAL_PREFIX,
    InvalidChannel,
    any_grant_matches,
    grant_covers,
    personal_channel,
    validate_grant,
)
from ..config.settings import Settings


class AuthError(Exception):
    """The token is missing, malformed, expired or not signed by a trusted key.

    ``str(exc)`` is a reason safe to show a client (it never contains the token).

    Attributes:
        reason: a short fixed code for metrics and logs (the label of
            ``pushsvc_auth_failures_total``): ``missing``, ``too_large``,
            ``expired``, ``not_yet_valid``, ``audience``, ``issuer``, ``claims``,
            ``algorithm``, ``signature``, ``type``, ``grants``, ``revoked``,
            ``invalid``.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class Principal(msgspec.Struct, frozen=True):
    """Who a verified token speaks for.

    Attributes:
        sub: the user id (JWT ``sub``).
        exp: expiry, Unix seconds (JWT ``exp``); ``inf`` for API keys.
        channels: subscribe grants (NATS wildcard patterns).
        publish: publish grants (NATS wildcard patterns).
        jti: token id (JWT ``jti``) or None; used for revocation.
        iat: issued-at, Unix seconds (JWT ``iat``) or None; used for revocation by ``sub``.
        presence: presence grants (JWT ``presence``): channels whose presence the
            holder may read (NATS wildcard patterns).
        subs: server-side subscriptions (JWT ``subs``): channels the session is
            subscribed to at ``welcome`` without asking.
        info: the JWT ``info`` claim (a JSON object of at most ``MAX_INFO_BYTES``
            bytes) as compact JSON bytes, shown in presence and join/leave; or None.
        rpc: RPC grants (JWT ``rpc``): method names the holder may call (NATS
            wildcard patterns over ``<prefix>-rpc.<method>``); none = no RPC.
    """

    sub: str
    exp: float
    channels: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    jti: str | None = None
    iat: float | None = None
    presence: tuple[str, ...] = ()
    subs: tuple[str, ...] = ()
    info: bytes | None = None
    rpc: tuple[str, ...] = ()

    def can_call(self, method: str) -> bool:
        """True when an ``rpc`` grant covers ``method`` (NATS wildcard rules)."""
        return any_grant_matches(self.rpc, method)

    def can_see_presence(self, channel: str) -> bool:
        """True when a ``presence`` grant covers ``channel`` (same personal-channel rule
        as :meth:`can_subscribe`: another user's ``user.<x>`` needs a ``user.`` grant)."""
        return self._granted(self.presence, channel)

    def can_subscribe(self, channel: str) -> bool:
        """True when a grant covers ``channel`` or it is the user's personal channel.

        A channel listed in ``subs`` (server-side subscriptions) is granted too. A
        wildcard ``channel`` (``orders.*``) needs a grant covering all of it.
        Personal channels of *other* users (``user.<x>``) need a grant that names
        ``user`` as its first token (``user.*``, ``user.bob``, ``user.>``): wildcard
        grants such as ``>`` or ``*.bob`` do not reach them (least privilege).
        """
        if channel == personal_channel(self.sub) or channel in self.subs:
            return True
        return self._granted(self.channels, channel)

    def _granted(self, grants: tuple[str, ...], name: str) -> bool:
        """Some grant covers every channel ``name`` (a channel or a pattern) matches
        (:func:`~pushsvc.channels.grant_covers`); another user's personal channels,
        and ``user.`` patterns, only by grants whose first token is ``user``."""
        if name.startswith(PERSONAL_PREFIX) and name != personal_channel(self.sub):
            grants = tuple(g for g in grants if g.startswith(PERSONAL_PREFIX))
        return any(grant_covers(g, name) for g in grants)

    def can_publish(self, channel: str) -> bool:
        """True when a ``publish`` grant covers ``channel``."""
        return any_grant_matches(self.publish, channel)


MAX_INFO_BYTES = 1024  # largest ``info`` claim, as compact JSON
MAX_SUBS = 128  # most channels a ``subs`` claim may list

MAX_REVOCATIONS = 100_000
DEFAULT_REVOCATION_TTL = 86400.0  # seconds a revocation is remembered without "ttl"
MAX_REVOCATION_TTL = 365 * 86400.0  # seconds: the longest revocation accepted


class Revocation(msgspec.Struct, frozen=True):
    """A control message on ``<prefix>-control.disconnect``.

    ``{"sub": "alice"}`` and/or ``{"jti": "t-42"}``, optionally ``"ttl"`` (seconds
    the revocation is remembered, default 86400: set it to the longest token
    lifetime you issue).
    """

    sub: str | None = None
    jti: str | None = None
    ttl: float = DEFAULT_REVOCATION_TTL

    @property
    def valid(self) -> bool:
        """Names a ``sub`` and/or a ``jti``, and ``0 < ttl <=`` :data:`MAX_REVOCATION_TTL`."""
        return (self.sub is not None or self.jti is not None) and (
            0 < self.ttl <= MAX_REVOCATION_TTL
        )


class _PreparedKeys(Algorithm):
    """An :class:`~jwt.algorithms.Algorithm` remembering what ``prepare_key`` made of a key.

    PyJWT prepares the key on every decode: for HS* it re-checks that the secret
    is not a PEM, SSH, DER or JWK document (a JSON parse and a failed X.509 load,
    ~12 us), for RS*/ES* it parses the PEM. pushsvc's keys come from settings and
    never change, so each is prepared once (the checks still run, once, and a key
    they refuse is refused every time: failures are not remembered). Signing,
    verification and key-length checks are the wrapped algorithm's.
    """

    _MAX_KEYS = 8  # keys are settings: a handful at most

    def __init__(self, algorithm: Algorithm) -> None:
        self._algorithm = algorithm
        self._prepared: dict[Any, Any] = {}

    def prepare_key(self, key: Any) -> Any:
        try:
            return self._prepared[key]
        except (KeyError, TypeError):  # TypeError: an unhashable key, prepare each time
            pass
        prepared = self._algorithm.prepare_key(key)
        if len(self._prepared) < self._MAX_KEYS:
            try:
                self._prepared[key] = prepared
            except TypeError:
                pass
        return prepared

    def sign(self, msg: bytes, key: Any) -> bytes:
        return self._algorithm.sign(msg, key)

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        return self._algorithm.verify(msg, key, sig)

    def check_key_length(self, key: Any) -> str | None:
        return self._algorithm.check_key_length(key)

    def compute_hash_digest(self, bytestr: bytes) -> bytes:
        return self._algorithm.compute_hash_digest(bytestr)

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:  # type: ignore[override]
        raise NotImplementedError

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        raise NotImplementedError


def key_caching_decoder(algorithms: list[str]) -> Any:
    """A :class:`jwt.PyJWT` whose ``algorithms`` prepare each key once (:class:`_PreparedKeys`).

    Same ``decode`` as the module-level :func:`jwt.decode` (same checks, errors
    and options); the PyJWT instance's signature layer has the named algorithms
    re-registered (``PyJWS.unregister_algorithm``/``register_algorithm``). If a
    PyJWT release no longer exposes that layer, returns the :mod:`jwt` module
    itself (every decode prepares its key, as before).

    Args:
        algorithms: algorithm names as ``Settings.algorithms()`` gives them.

    Returns:
        An object with PyJWT's ``decode(token, key, algorithms=..., ...)``.
    """
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if not isinstance(jws, jwt.PyJWS):
        return jwt
    for name in algorithms:
        try:
            algorithm = jws.get_algorithm_by_name(name)
        except NotImplementedError:  # e.g. ES256 without cryptography: as jwt.decode does
            continue
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, _PreparedKeys(algorithm))
    return decoder


def parse_revocation(payload: bytes) -> Revocation | None:
    """Decode a control message; None when it is malformed or names neither sub nor jti."""
    try:
        revocation = msgspec.json.decode(payload, type=Revocation)
    except (msgspec.DecodeError, RecursionError):
        return None
    return revocation if revocation.valid else None


class Authenticator:
    """Verifies tokens with the configured key, caching verified ones.

    Args:
        settings: uses ``jwt_secret``/``jwt_public_key``, ``algorithms()``,
            ``jwt_audience``, ``emit_audience``, ``jwt_issuer``, ``jwt_leeway``
            (seconds), ``token_cache_size`` and ``api_keys``.

    The cache maps SHA-256(token) -> Principal and is bounded (LRU,
    ``token_cache_size`` entries). A cached entry is only used while
    ``now < exp + leeway``, so a cached token stops being accepted at its expiry
    exactly as an uncached one would.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.algorithms = settings.algorithms()
        if settings.jwt_public_key is not None:
            with open(settings.jwt_public_key) as f:
                self._key: Any = f.read()
        else:
            self._key = settings.jwt_secret or ""
        self._jwt = key_caching_decoder(self.algorithms)
        self.leeway = settings.jwt_leeway
        self._cache: OrderedDict[tuple[bytes, str], Principal] = OrderedDict()
        self._cache_size = settings.token_cache_size
        self._api_keys: dict[str, str] = {}
        for i, entry in enumerate(settings.api_keys):
            key_id, sep, key = entry.rpartition(":")
            self._api_keys[key if sep else entry] = key_id if sep else f"key{i}"
        self.cache_hits = 0
        self._revoked_jti: dict[str, tuple[float, float]] = {}  # jti -> (revoked at, until)
        self._revoked_sub: dict[str, tuple[float, float]] = {}  # sub -> (revoked at, until)
        #: the connect callout (:mod:`pushsvc.auth.callouts`): decides non-JWT credentials
        self.connect_callout: ConnectCallout | None = None
        #: the subscribe callout: decides subscriptions the grants do not cover
        self.subscribe_callout: SubscribeCallout | None = None

    def verify(self, token: object, *, purpose: str = "connect") -> Principal:
        """Verify a connection (``purpose="connect"``) or emit (``"emit"``) token.

        Returns:
            The :class:`Principal`.

        Raises:
            AuthError: with a client-safe reason.
        """
        if not isinstance(token, str) or not token:
            raise AuthError("missing token", "missing")
        if len(token) > 8192:
            raise AuthError("token too large", "too_large")
        key = (hashlib.sha256(token.encode()).digest(), purpose)
        cached = self._cache.get(key)
        if cached is not None:
            if time.time() < cached.exp + self.leeway:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                self._check_revoked(cached)
                return cached
            del self._cache[key]
            raise AuthError("token expired", "expired")
        principal = self._decode(token, purpose)
        self._cache[key] = principal
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self._check_revoked(principal)
        return principal

    def revoke(self, revocation: Revocation, at: float | None = None) -> None:
        """Refuse tokens from now on: by ``jti``, and/or every token of ``sub`` issued
        (``iat``) at or before ``at`` (Unix seconds, default now; a token of that
        user without ``iat`` is refused while the entry lives). Entries are kept
        until ``at + revocation.ttl``, at most ``MAX_REVOCATIONS`` of each kind
        (expired ones, else the oldest, dropped first). Applying the same
        revocation twice changes nothing.
        """
        now = time.time() if at is None else at
        until = now + revocation.ttl
        for table, key in (
            (self._revoked_jti, revocation.jti),
            (self._revoked_sub, revocation.sub),
        ):
            if key is None:
                continue
            table[key] = max(table.get(key, (now, until)), (now, until))
            if len(table) > MAX_REVOCATIONS:
                clock = time.time()
                for old in [k for k, (_, u) in table.items() if u <= clock] or [next(iter(table))]:
                    del table[old]

    def _check_revoked(self, principal: Principal) -> None:
        if not (self._revoked_jti or self._revoked_sub):
            return
        now = time.time()
        if principal.jti is not None:
            entry = self._revoked_jti.get(principal.jti)
            if entry is not None and now < entry[1]:
                raise AuthError("token revoked", "revoked")
        entry = self._revoked_sub.get(principal.sub)
        if entry is not None and now < entry[1]:
            if principal.iat is None or principal.iat <= entry[0]:
                raise AuthError("token revoked", "revoked")

    def verify_emit(self, credential: str) -> Principal:
        """Verify an emit credential: a configured API key or a JWT.

        An API key yields a principal ``apikey:<id>`` allowed to publish anywhere.

        Raises:
            AuthError: unknown key or invalid token.
        """
        key_id = self._api_keys.get(credential)
        if key_id is not None:
            return Principal(sub=f"apikey:{key_id}", exp=float("inf"), publish=(">",))
        return self.verify(credential, purpose="emit")

    def is_api_key(self, credential: str) -> bool:
        """True when ``credential`` is one of the configured API keys (``PUSHSVC_API_KEYS``)."""
        return credential in self._api_keys

    def expires_in(self, principal: Principal) -> float:
        """Seconds until the session must close: ``exp + leeway - now`` (may be <= 0)."""
        return principal.exp + self.leeway - time.time()

    def _decode(self, token: str, purpose: str) -> Principal:
        audience = self.settings.jwt_audience
        expected_type = self.settings.jwt_type
        if purpose == "emit":
            if self.settings.emit_audience is not None:
                audience = self.settings.emit_audience
            expected_type = self.settings.emit_type
        try:
            if expected_type is not None:
                _check_type(jwt.get_unverified_header(token).get("typ"), expected_type)
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", "expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid", "not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted", "audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted", "issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks required claim {exc.claim!r}", "claims") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not accepted", "algorithm") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid", "signature") from None
        except (jwt.InvalidTokenError, ValueError, TypeError, ArithmeticError):
            # ArithmeticError: PyJWT's int() of an "exp"/"nbf" of Infinity (json allows it)
            raise AuthError("token invalid") from None
        return principal_of(claims)

    # --- callouts (pushsvc.auth.callouts sets these; None: off) --------------------------
    async def authenticate(self, credential: object, context: dict[str, str | None]) -> Principal:
        """A connection's principal: :meth:`verify` for a JWT; otherwise, with
        ``PUSHSVC_CONNECT_AUTH_SUBJECT``, the connect callout's decision.

        Args:
            credential: what the connection presented (JWT, cookie, ticket, opaque token).
            context: ``transport``, ``origin``, ``remote`` (the peer's address) for the
                callout.

        Raises:
            AuthError: refused (``reason`` ``callout_denied`` / ``callout_unavailable``
                for the callout's answers).
        """
        callout = self.connect_callout
        if callout is None or not isinstance(credential, str) or is_jwt(credential):
            return self.verify(credential)
        principal = await callout(credential, context)
        self._check_revoked(principal)
        return principal

    async def may_subscribe(self, principal: Principal, client: str | None, channel: str) -> bool:
        """A subscription (or presence/history read) ``principal``'s grants do not cover:
        with ``PUSHSVC_SUBSCRIBE_AUTH_SUBJECT``, what the subscribe callout answers;
        else False.

        Raises:
            AuthError: ``callout_unavailable``: the callout did not answer.
        """
        callout = self.subscribe_callout
        return False if callout is None else await callout(principal, client, channel)


ConnectCallout = Callable[[str, dict[str, "str | None"]], Awaitable[Principal]]
SubscribeCallout = Callable[[Principal, "str | None", str], Awaitable[bool]]


def is_jwt(credential: str) -> bool:
    """True when ``credential`` is shaped as a JWS compact serialization (RFC 7515 7.1), as
    PyJWT parses it (nothing verified)."""
    try:
        return credential.count(".") == 2 and bool(jwt.get_unverified_header(credential))
    except jwt.InvalidTokenError:
        return False


def principal_of(claims: dict[str, Any], *, default_exp: float | None = None) -> Principal:
    """The :class:`Principal` a verified token's claims (or a connect callout's
    answer, same names) describe.

    Args:
        claims: ``sub`` (required), ``exp`` (Unix seconds; required unless
            ``default_exp``), ``channels``, ``publish``, ``presence``, ``rpc``,
            ``subs``, ``info``, ``jti``, ``iat``.
        default_exp: ``exp`` when the claims have none.

    Raises:
        AuthError: ``claims`` (bad ``sub``/``exp``/``info``) or ``grants`` (a
            grant breaks the grammar).
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("token 'sub' must be a non-empty string", "claims")
    exp = claims.get("exp", default_exp)
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp != exp:
        raise AuthError("token 'exp' must be a number", "claims")
    jti = claims.get("jti")
    try:
        return Principal(
            sub=sub,
            exp=float(exp),
            channels=_grants(claims.get("channels")),
            publish=_grants(claims.get("publish")),
            jti=jti if isinstance(jti, str) else None,
            iat=float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else None,
            presence=_grants(claims.get("presence")),
            subs=_subs(claims.get("subs")),
            info=_info(claims.get("info")),
            rpc=_grants(claims.get("rpc")),
        )
    except InvalidChannel as exc:
        raise AuthError(f"token grant invalid: {exc}", "grants") from None


def _info(value: object) -> bytes | None:
    """The ``info`` claim as compact JSON bytes.

    Raises:
        AuthError: not a JSON object, or larger than ``MAX_INFO_BYTES`` bytes encoded.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AuthError("token 'info' must be a JSON object", "claims")
    raw = msgspec.json.encode(value)
    if len(raw) > MAX_INFO_BYTES:
        raise AuthError(f"token 'info' larger than {MAX_INFO_BYTES} bytes", "claims")
    return raw


def _subs(value: object) -> tuple[str, ...]:
    """The ``subs`` claim: a list of channels or grant patterns (at most ``MAX_SUBS``).

    Raises:
        InvalidChannel: not a list of valid channels/patterns, or too long.
    """
    subs = _grants(value)
    if len(subs) > MAX_SUBS:
        raise InvalidChannel(f"'subs' lists more than {MAX_SUBS} channels")
    return tuple(dict.fromkeys(subs))


def _normalise_type(value: str) -> str:
    value = value.lower()
    return value[len("application/") :] if value.startswith("application/") else value


def _check_type(actual: object, expected: str) -> None:
    """Compare a JOSE ``typ`` header with the configured type (RFC 7515 4.1.9).

    Raises:
        AuthError: ``typ`` absent, not a string, or another type.
    """
    if not isinstance(actual, str) or _normalise_type(actual) != _normalise_type(expected):
        raise AuthError("token type not accepted", "type")


def _grants(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidChannel("grants must be a list of strings")
    return tuple(validate_grant(v) for v in value)


def mint_token(
    secret: str,
    sub: str,
    *,
    channels: list[str] | None = None,
    publish: list[str] | None = None,
    presence: list[str] | None = None,
    subs: list[str] | None = None,
    rpc: list[str] | None = None,
    info: dict[str, Any] | None = None,
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    jti: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """Mint a JWT for ``sub`` valid ``ttl`` seconds (used by ``pushsvc token`` and tests).

    Args:
        secret: HS* shared secret, or a PEM private key for RS*/ES*.
        channels / publish / presence / rpc: grant patterns (validated); ``subs``
            server-side subscriptions; ``info`` a JSON object (the ``info`` claim).
        headers: extra JOSE header fields, e.g. ``{"typ": "pushsvc+jwt"}``.

    Raises:
        InvalidChannel: a grant is malformed.
    """
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if channels:
        claims["channels"] = [validate_grant(c) for c in channels]
    if publish:
        claims["publish"] = [validate_grant(c) for c in publish]
    for name, grants in (("presence", presence), ("subs", subs), ("rpc", rpc)):
        if grants:
            claims[name] = [validate_grant(c) for c in grants]
    if info is not None:
        claims["info"] = info
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    if jti:
        claims["jti"] = jti
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)
