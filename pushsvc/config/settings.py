"""Settings: ``PUSHSVC_*`` environment variables, overridden by CLI flags, validated at start.

Every field of :class:`Settings` is read from the environment variable named
``PUSHSVC_`` + the field name in upper case (``jwt_secret`` <- ``PUSHSVC_JWT_SECRET``).
Types are converted by msgspec (``"30"`` -> ``30``, ``"true"`` -> ``True``); list
fields take comma-separated values. :meth:`Settings.load` raises
:class:`SettingsError` naming the offending setting, which the CLI prints as one
line (no traceback).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..channels import InvalidChannel, validate_grant
from .errors import SettingsError
from .nats import NatsSecurity, display_url

ENV_PREFIX = "PUSHSVC_"
#: lifecycle event types (``PUSHSVC_EVENTS``; docs/server-api.md, "Lifecycle events")
EVENT_TYPES = ("connect", "disconnect", "subscribe", "unsubscribe", "occupied", "vacated")
#: ``PUSHSVC_COMPRESSION`` values (docs/protocol.md, "Compression")
COMPRESSION_MODES = ("off", "deflate")
MAX_WRITE_DELAY = 1.0  # seconds: a longer hold would stall interactive channels


class Settings(msgspec.Struct, kw_only=True):
    """Validated runtime configuration. Durations are seconds, sizes are bytes.

    Build with :meth:`load` (environment + overrides, validated) rather than the
    constructor, which does not validate cross-field rules.
    """

    # --- network -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    dev: bool = False
    base_path: str = ""

    # --- NATS ----------------------------------------------------------------
    nats_url: str | None = None  # None: start the bundled nats-server
    data_dir: str | None = None  # bundled nats-server JetStream store
    subject_prefix: str = "push"
    connect_timeout: float = 5.0  # bound on reaching NATS at start-up
    publish_timeout: float = 2.0  # JetStream publish ack wait
    history_ttl: float = 300.0  # 0 = history off (live only)
    history_size: int = 1000  # messages kept per channel
    stream: str = "PUSHSVC"
    stream_replicas: int = 1
    dedupe_window: float = 120.0
    revocation_bucket: str = "PUSHSVC_REVOCATIONS"  # JetStream KV bucket of revocations
    # secured NATS (see pushsvc.bus.natsconn): at most one auth method; paths are files
    nats_creds: str | None = None  # .creds file: user JWT + NKey seed (operator mode)
    nats_nkey: str | None = None  # file holding an NKey user seed
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_tls_ca: str | None = None  # PEM CA bundle to verify the NATS server
    nats_tls_cert: str | None = None  # PEM client certificate (mutual TLS)
    nats_tls_key: str | None = None  # PEM private key of nats_tls_cert

    # --- tokens --------------------------------------------------------------
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # path to a PEM file
    jwt_algorithms: list[str] = msgspec.field(default_factory=list)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 30.0
    emit_audience: str | None = None  # aud required of emit tokens (default: jwt_audience)
    jwt_type: str | None = None  # required JOSE "typ" of connection tokens (RFC 8725 3.11)
    emit_type: str | None = None  # required JOSE "typ" of emit/history tokens
    api_keys: list[str] = msgspec.field(default_factory=list)  # "id:key" or "key"
    token_cache_size: int = 10000
    auth_cookie: str | None = None
    ticket_ttl: float = 30.0  # seconds a POST /sse/ticket ticket stays valid (single use)
    sse_retry: float = 2.0  # seconds: the SSE `retry:` field (the browser's reconnect delay)

    # --- sessions ------------------------------------------------------------
    ping_interval: float = 25.0
    pong_timeout: float = 10.0
    auth_timeout: float = 5.0
    max_frame_bytes: int = 65536
    max_emit_bytes: int = 65536
    send_queue_bytes: int = 1048576
    send_timeout: float = 10.0
    coalesce_bytes: int = 65536
    #: WebSocket permessage-deflate (RFC 7692): ``off`` or ``deflate`` (compressed once
    #: per batch, shared by every connection that negotiated it; pushsvc.ws.deflate)
    compression: str = "off"
    compression_min_bytes: int = 512  # bytes: smaller batches go out uncompressed
    write_delay: float = 0.0  # seconds a channel's messages are held to coalesce (0 = none)
    allowed_origins: list[str] = msgspec.field(default_factory=list)

    # --- limits --------------------------------------------------------------
    command_rate: float = 20.0
    command_burst: int = 50
    rate_limit_strikes: int = 10
    emit_rate: float = 200.0
    emit_burst: int = 400
    max_connections_per_user: int = 10
    max_subscriptions: int = 128
    max_connections: int = 20000

    # --- presence, join/leave, server-side subscriptions ---------------------------
    presence_bucket: str = "PUSHSVC_PRESENCE"  # JetStream KV bucket of presence entries
    presence_ttl: float = 60.0  # s an entry outlives its node's last refresh
    presence_channels: list[str] = msgspec.field(default_factory=list)  # patterns; none = off
    presence_limit: int = 1000  # clients listed per presence answer (counts stay exact)
    join_leave_channels: list[str] = msgspec.field(default_factory=list)  # patterns
    auto_subscribe_personal: bool = False  # every session is subscribed to user.<sub>
    wildcard_subscriptions: bool = True  # subscribe accepts patterns (orders.*, orders.>)

    # --- client RPC (NATS request/reply on <prefix>-rpc.<method>) -----------------------
    rpc_timeout: float = 5.0  # s a service has to reply before the call is `unavailable`

    # --- authorisation callouts (NATS requests; pushsvc.auth.callouts) -------------------
    connect_auth_subject: str | None = None  # decides connections with a non-JWT credential
    subscribe_auth_subject: str | None = None  # decides subscriptions the token does not grant
    auth_callout_timeout: float = 2.0  # s a callout has to answer (then: refused)

    # --- server API -----------------------------------------------------------
    api_timeout: float = 2.0  # s a cluster-wide server API request waits for every node
    node_bucket: str = "PUSHSVC_NODES"  # JetStream KV bucket of live nodes (server API)
    events: list[str] = msgspec.field(default_factory=list)  # lifecycle event types; none = off
    events_stream: str = "PUSHSVC_EVENTS"  # JetStream stream keeping them (history on)
    events_ttl: float = 86400.0  # s the events stream keeps an event

    # --- operations ----------------------------------------------------------
    node_name: str | None = None  # None: the host name (see load)
    shutdown_timeout: float = 10.0  # bound on the graceful part of a shutdown
    drain_delay: float = 0.0  # /readyz answers 503 this long after SIGTERM before closing
    log_level: str = "info"
    log_format: str = "text"  # text | json
    heap_trim_interval: float = 60.0  # s between malloc_trim(3) calls of `serve` (0 = off)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``PUSHSVC_*`` from ``env`` (default ``os.environ``), apply ``overrides``.

        Overrides whose value is ``None`` are ignored, so argparse namespaces can be
        passed straight through.

        Raises:
            SettingsError: a value has the wrong type or breaks a rule (see
                :meth:`validate`); the message names the setting.
        """
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        for name, field in fields.items():
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                value: Any = env[key]
                if _is_list(field.type):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                raw[name] = value
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in fields:
                raise SettingsError(ENV_PREFIX + name.upper(), "unknown setting")
            raw[name] = value
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(_setting_from_error(str(exc)), str(exc)) from None
        if settings.node_name is None:
            settings.node_name = default_node_name()
        settings.validate()
        return settings

    @property
    def history(self) -> bool:
        """True when JetStream history is on (``history_ttl`` > 0)."""
        return self.history_ttl > 0

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split on commas (cluster seed servers)."""
        return split_servers(self.nats_url or "")

    def validate(self) -> None:
        """Check cross-field rules.

        Raises:
            SettingsError: naming the first setting that is wrong.
        """
        self._validate_credentials()
        self._validate_names()
        check_port(self.port, "PUSHSVC_PORT", any_free=True)
        self._validate_numbers()
        self._validate_access()

    def _validate_credentials(self) -> None:
        """NATS URL(s) and security, the JWT key or secret and algorithms."""
        if self.nats_url is not None:
            for url in self.nats_servers or [""]:
                check_nats_url(url, "PUSHSVC_NATS_URL")
        NatsSecurity.from_settings(self).check(self.nats_servers)
        if self.jwt_public_key is not None:
            path = Path(self.jwt_public_key)
            try:
                text = path.read_text()
            except OSError as exc:
                raise SettingsError(
                    "PUSHSVC_JWT_PUBLIC_KEY", f"cannot read {path}: {exc.strerror}"
                ) from None
            if "BEGIN" not in text:
                raise SettingsError("PUSHSVC_JWT_PUBLIC_KEY", f"{path} is not a PEM file")
        if self.jwt_secret is None and self.jwt_public_key is None and not self.dev:
            raise SettingsError(
                "PUSHSVC_JWT_SECRET",
                "missing: set PUSHSVC_JWT_SECRET (HS256) or PUSHSVC_JWT_PUBLIC_KEY "
                "(RS256/ES256), or run with --dev",
            )
        for alg in self.jwt_algorithms:
            if alg.lower() == "none" or alg not in _KNOWN_ALGORITHMS:
                raise SettingsError("PUSHSVC_JWT_ALGORITHMS", f"unsupported algorithm {alg!r}")
        families = {alg[:2] for alg in self.jwt_algorithms}
        if "HS" in families and len(families) > 1:
            raise SettingsError(
                "PUSHSVC_JWT_ALGORITHMS", "HS* and RS*/ES*/PS* must not be mixed (RFC 8725 3.1)"
            )

    def _validate_names(self) -> None:
        """Stream, bucket and subject names: NATS tokens (NATS docs, "Subject-Based Messaging")."""
        if self.stream and not self.stream.replace("_", "").replace("-", "").isalnum():
            raise SettingsError("PUSHSVC_STREAM", f"invalid stream name {self.stream!r}")
        if not _is_token(self.subject_prefix):
            raise SettingsError(
                "PUSHSVC_SUBJECT_PREFIX", "must be one token of [A-Za-z0-9_-], e.g. 'push'"
            )
        names = {
            "PUSHSVC_REVOCATION_BUCKET": ("bucket", self.revocation_bucket),
            "PUSHSVC_EVENTS_STREAM": ("stream", self.events_stream),
            "PUSHSVC_NODE_BUCKET": ("KV bucket", self.node_bucket),
            "PUSHSVC_PRESENCE_BUCKET": ("KV bucket", self.presence_bucket),
        }
        for setting, (what, value) in names.items():
            if not _is_token(value):
                raise SettingsError(setting, f"invalid {what} name {value!r}")
        for name in ("connect_auth_subject", "subscribe_auth_subject"):
            subject = getattr(self, name)
            if subject is not None and not _is_subject(subject):
                raise SettingsError(
                    ENV_PREFIX + name.upper(),
                    f"{subject!r} is not a NATS subject (dot-separated tokens, no wildcards)",
                )

    def _validate_numbers(self) -> None:
        """Sizes (bytes), rates, counts and durations (seconds) in their ranges."""
        positive = {
            "max_frame_bytes": self.max_frame_bytes,
            "max_emit_bytes": self.max_emit_bytes,
            "send_queue_bytes": self.send_queue_bytes,
            "coalesce_bytes": self.coalesce_bytes,
            "ping_interval": self.ping_interval,
            "pong_timeout": self.pong_timeout,
            "auth_timeout": self.auth_timeout,
            "send_timeout": self.send_timeout,
            "connect_timeout": self.connect_timeout,
            "history_size": self.history_size,
            "command_rate": self.command_rate,
            "command_burst": self.command_burst,
            "emit_rate": self.emit_rate,
            "emit_burst": self.emit_burst,
            "max_connections_per_user": self.max_connections_per_user,
            "max_subscriptions": self.max_subscriptions,
            "max_connections": self.max_connections,
            "workers": self.workers,
            "presence_limit": self.presence_limit,
            "shutdown_timeout": self.shutdown_timeout,
            "rpc_timeout": self.rpc_timeout,
            "auth_callout_timeout": self.auth_callout_timeout,
            "api_timeout": self.api_timeout,
            "events_ttl": self.events_ttl,
            "ticket_ttl": self.ticket_ttl,
            "sse_retry": self.sse_retry,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(ENV_PREFIX + name.upper(), f"must be > 0, got {value}")
        self._validate_compression()
        if self.drain_delay < 0:
            raise SettingsError("PUSHSVC_DRAIN_DELAY", "must be >= 0 (0 = close at once)")
        if self.log_format not in ("text", "json"):
            raise SettingsError(
                "PUSHSVC_LOG_FORMAT", f"must be 'text' or 'json', got {self.log_format!r}"
            )
        if self.node_name is not None and not _is_node_name(self.node_name):
            raise SettingsError(
                "PUSHSVC_NODE_NAME",
                "must be 1..64 characters of [A-Za-z0-9_.-] (it names the NATS connection, "
                "log lines and the pushsvc_info metric)",
            )
        if self.heap_trim_interval < 0:
            raise SettingsError("PUSHSVC_HEAP_TRIM_INTERVAL", "must be >= 0 s (0 turns it off)")
        if self.history_ttl < 0:
            raise SettingsError("PUSHSVC_HISTORY_TTL", "must be >= 0 (0 turns history off)")
        if not 0 <= self.write_delay <= MAX_WRITE_DELAY:
            raise SettingsError(
                "PUSHSVC_WRITE_DELAY",
                f"must be in 0..{MAX_WRITE_DELAY} seconds (0 turns it off), got {self.write_delay}",
            )
        if self.ping_interval < 0.1:
            raise SettingsError("PUSHSVC_PING_INTERVAL", "must be >= 0.1 s")
        if self.presence_ttl < 1:
            raise SettingsError("PUSHSVC_PRESENCE_TTL", "must be >= 1 s")

    def _validate_compression(self) -> None:
        """``compression`` is one of :data:`COMPRESSION_MODES`; the threshold is >= 0 bytes."""
        if self.compression not in COMPRESSION_MODES:
            raise SettingsError(
                "PUSHSVC_COMPRESSION",
                f"must be one of {', '.join(COMPRESSION_MODES)}, got {self.compression!r}",
            )
        if self.compression_min_bytes < 0:
            raise SettingsError(
                "PUSHSVC_COMPRESSION_MIN_BYTES",
                f"must be >= 0 bytes (0 compresses every batch), got {self.compression_min_bytes}",
            )

    def _validate_access(self) -> None:
        """Origins and cookies, API keys, event types, channel patterns, the base path."""
        if self.auth_cookie and not self.allowed_origins:
            raise SettingsError(
                "PUSHSVC_AUTH_COOKIE",
                "cookie auth requires PUSHSVC_ALLOWED_ORIGINS (cross-site WebSocket hijacking)",
            )
        for origin in self.allowed_origins:
            if "://" not in origin:
                raise SettingsError(
                    "PUSHSVC_ALLOWED_ORIGINS", f"{origin!r} must include the scheme"
                )
        for entry in self.api_keys:
            if not entry.rsplit(":", 1)[-1]:
                raise SettingsError("PUSHSVC_API_KEYS", "empty API key")
        for kind in self.events:
            if kind not in EVENT_TYPES:
                raise SettingsError(
                    "PUSHSVC_EVENTS",
                    f"unknown event type {kind!r}; one of {', '.join(EVENT_TYPES)}",
                )
        for name in ("presence_channels", "join_leave_channels"):
            for pattern in getattr(self, name):
                try:
                    validate_grant(pattern)
                except InvalidChannel as exc:
                    raise SettingsError(ENV_PREFIX + name.upper(), str(exc)) from None
        if self.base_path and (not self.base_path.startswith("/") or self.base_path.endswith("/")):
            raise SettingsError("PUSHSVC_BASE_PATH", "must start with '/' and not end with '/'")

    def algorithms(self) -> list[str]:
        """JWT algorithms accepted: configured ones, else HS256 for a secret, else RS256+ES256."""
        if self.jwt_algorithms:
            return list(self.jwt_algorithms)
        if self.jwt_public_key is not None:
            return ["RS256", "ES256"]
        return ["HS256"]


_KNOWN_ALGORITHMS = {
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
}


def check_port(port: int, setting: str, *, any_free: bool = False) -> None:
    """Check a TCP port number: 1..65535 (RFC 6335 6), or 0 when ``any_free`` allows it.

    Args:
        port: the port number.
        setting: what to name in the error (a variable or a flag, e.g. ``PUSHSVC_PORT``).
        any_free: 0 is accepted and means "any free port" (the caller prints the real one).

    Raises:
        SettingsError: out of range.
    """
    low = 0 if any_free else 1
    if not low <= port <= 65535:
        extra = " (0 = any free port)" if any_free else ""
        raise SettingsError(setting, f"port must be {low}..65535{extra}, got {port}")


def check_nats_url(url: str, setting: str) -> str:
    """Check one NATS server URL (``nats://host:port``; scheme ``nats``, ``tls``, ``ws``, ``wss``).

    A URL without a scheme gets ``nats://``. The port, when given, must be 1..65535.

    Args:
        url: the URL to check.
        setting: what to name in the error, e.g. ``PUSHSVC_NATS_URL`` or ``--nats-url``.

    Returns:
        The URL as given.

    Raises:
        SettingsError: not a NATS URL, or a bad port.
    """

    shown = display_url(url)  # credentials in the URL never reach a message
    parts = urlsplit(url if "://" in url else "nats://" + url)
    if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        raise SettingsError(setting, f"not a NATS URL: {shown!r}")
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(setting, f"bad port in {shown!r} (1..65535)") from None
    if port is not None:
        try:
            check_port(port, setting)
        except SettingsError:
            raise SettingsError(setting, f"port must be 1..65535 in {shown!r}") from None
    elif parts.netloc.endswith(":"):  # "host:" would silently mean the default 4222
        raise SettingsError(setting, f"empty port in {shown!r}")
    return url


def split_servers(url: str) -> list[str]:
    """A comma-separated NATS URL list (``PUSHSVC_NATS_URL``, ``--nats-url``) as URLs."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _is_subject(value: str) -> bool:
    """A NATS subject one can publish to: non-empty dot-separated tokens, no wildcards
    or whitespace (NATS docs, "Subject-Based Messaging")."""
    tokens = value.split(".")
    return all(t and t not in ("*", ">") and t.isprintable() and " " not in t for t in tokens)


def _is_token(value: str) -> bool:
    return bool(value) and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)


def default_node_name() -> str:
    """The host name as a node name: characters outside ``[A-Za-z0-9_.-]`` become ``-``,
    at most 64 characters (``pushsvc`` when the host has no name)."""
    name = "".join(
        c if c.isascii() and (c.isalnum() or c in "_.-") else "-" for c in socket.gethostname()
    )
    return name[:64] or "pushsvc"


def _is_node_name(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)


def _is_list(tp: Any) -> bool:
    return getattr(tp, "__origin__", None) is list


def _setting_from_error(message: str) -> str:
    # msgspec says e.g. "Expected `int`, got `str` - at `$.port`"
    if "$." in message:
        name = message.rsplit("$.", 1)[1].split("[")[0].strip("` ")
        return ENV_PREFIX + name.upper()
    return "PUSHSVC"
