"""NATS connection options as pure configuration: credentials, TLS, and the refusals.

The connect itself (failing fast when NATS refuses us) is :func:`pushsvc.bus.natsconn.connect`.

Every place pushsvc talks to NATS (``serve``'s :class:`~pushsvc.bus.Bus`,
``pushsvc publish``, ``pushsvc bench``, :class:`~pushsvc.publisher.Publisher`)
connects through :func:`connect` with a :class:`NatsSecurity`, which turns the
``PUSHSVC_NATS_*`` settings (or the matching command-line flags, see
:func:`add_arguments`) into nats-py ``connect()`` keyword arguments:

============================  ======================  ===================================
setting                       flag                    nats-py ``connect()`` argument
============================  ======================  ===================================
``PUSHSVC_NATS_CREDS``        ``--nats-creds``        ``user_credentials`` (.creds file)
``PUSHSVC_NATS_NKEY``         ``--nats-nkey``         ``nkeys_seed`` (NKey seed file)
``PUSHSVC_NATS_USER``         ``--nats-user``         ``user``
``PUSHSVC_NATS_PASSWORD``     ``--nats-password``     ``password``
``PUSHSVC_NATS_TOKEN``        ``--nats-token``        ``token``
``PUSHSVC_NATS_TLS_CA``       ``--nats-tls-ca``       ``tls`` (``ssl.SSLContext`` trusting it)
``PUSHSVC_NATS_TLS_CERT``     ``--nats-tls-cert``     ``tls`` (client certificate, mutual TLS)
``PUSHSVC_NATS_TLS_KEY``      ``--nats-tls-key``      ``tls`` (its private key)
============================  ======================  ===================================

The authentication methods are those of the NATS docs ("Securing NATS":
token, username/password, NKeys, decentralized JWT with ``.creds`` files, TLS
client certificates). At most one of creds, nkey, user/password, token and
credentials inside the URL may be used.

How a failing connect is reported (:class:`NatsRefused`, :class:`NatsUnreachable`)
is :func:`pushsvc.bus.natsconn.connect`'s part.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from .errors import SettingsError

#: field of :class:`NatsSecurity` -> (``PUSHSVC_*`` variable, command-line flag, help text)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "creds": (
        "PUSHSVC_NATS_CREDS",
        "--nats-creds",
        "path of a NATS .creds file (user JWT + NKey seed; operator mode, hosted NATS)",
    ),
    "nkey": (
        "PUSHSVC_NATS_NKEY",
        "--nats-nkey",
        "path of a file holding an NKey user seed (SU...)",
    ),
    "user": ("PUSHSVC_NATS_USER", "--nats-user", "NATS user name (with --nats-password)"),
    "password": ("PUSHSVC_NATS_PASSWORD", "--nats-password", "NATS password (with --nats-user)"),
    "token": ("PUSHSVC_NATS_TOKEN", "--nats-token", "NATS authentication token"),
    "tls_ca": ("PUSHSVC_NATS_TLS_CA", "--nats-tls-ca", "PEM file of the CA(s) to trust for NATS"),
    "tls_cert": (
        "PUSHSVC_NATS_TLS_CERT",
        "--nats-tls-cert",
        "PEM client certificate for mutual TLS (with --nats-tls-key)",
    ),
    "tls_key": (
        "PUSHSVC_NATS_TLS_KEY",
        "--nats-tls-key",
        "PEM private key of --nats-tls-cert",
    ),
}

_FILES = ("creds", "nkey", "tls_ca", "tls_cert", "tls_key")


class NatsRefused(ConnectionError):
    """NATS refused the connection for a reason no retry can cure.

    Raised by :func:`connect` at the first connect: wrong credentials, a TLS
    certificate that does not verify, a credentials file that cannot be read.
    The message names the server URL (without any password) and the cause; it
    never contains a secret.

    Attributes:
        url: the server URL, userinfo password removed.
        reason: e.g. ``"authorization violation"``,
            ``"TLS certificate verification failed: ..."``.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"NATS at {url} refused the connection: {reason}")


class NatsUnreachable(ConnectionError):
    """The first connect to NATS gave up: no server could be reached in time.

    Raised by :func:`connect` when a retry might still cure it (nothing listens,
    a timeout, a connection reset), unlike :class:`NatsRefused`. ``str(exc)`` is
    ``cannot reach NATS at <url>: <cause>``; it never contains a secret.

    Attributes:
        url: the server URL(s), comma-separated, userinfo passwords masked.
        cause: why, in a few words (:func:`connect_failure`), e.g.
            ``"connection refused"``.
        timeout: the seconds the connect was given.
    """

    def __init__(self, url: str, cause: str, timeout: float) -> None:
        self.url = url
        self.cause = cause
        self.timeout = timeout
        super().__init__(f"cannot reach NATS at {url}: {cause}")

    def with_timeout(self) -> str:
        """The message naming the time bound too: ``cannot reach NATS at <url> within
        <timeout> s: <cause>`` (what ``pushsvc serve`` says about
        ``PUSHSVC_CONNECT_TIMEOUT``)."""
        return f"cannot reach NATS at {self.url} within {self.timeout:g} s: {self.cause}"


class NatsSecurity(msgspec.Struct, kw_only=True, frozen=True):
    """How to authenticate to NATS and which TLS to use; all fields optional.

    Paths are file paths (``str``); ``password`` and ``token`` are the secrets
    themselves. Build with :meth:`from_settings`, :meth:`from_args` or the
    constructor, then call :meth:`check` (``Settings.load`` does for the server).
    Picklable (the bench sends it to its worker processes); the
    ``ssl.SSLContext`` is built on each :meth:`connect_options` call.
    """

    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __repr__(self) -> str:
        shown = {
            name: ("***" if name in ("password", "token") else value)
            for name in OPTIONS
            if (value := getattr(self, name)) is not None
        }
        return f"NatsSecurity({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_settings(cls, settings: Any) -> NatsSecurity:
        """From a :class:`~pushsvc.config.settings.Settings` (its ``nats_*`` fields)."""
        return cls(**{name: getattr(settings, "nats_" + name) for name in OPTIONS})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NatsSecurity:
        """From an argparse namespace filled by :func:`add_arguments`."""
        return cls(**{name: getattr(args, "nats_" + name, None) or None for name in OPTIONS})

    @property
    def wants_tls(self) -> bool:
        """True when a CA, client certificate or key is configured."""
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def check(self, servers: list[str] | None = None) -> None:
        """Validate: files readable and well-formed, pairs complete, one auth method.

        Args:
            servers: the NATS URLs, to refuse credentials inside a URL together
                with another authentication setting.

        Raises:
            SettingsError: naming the offending ``PUSHSVC_NATS_*`` setting(s).
        """
        texts: dict[str, str] = {}
        for name in _FILES:
            path = getattr(self, name)
            if path is None:
                continue
            try:
                texts[name] = Path(path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not a text file"
                raise SettingsError(_var(name), f"cannot read {path}: {why}") from None
        if "creds" in texts and not (
            "BEGIN NATS USER JWT" in texts["creds"] and "BEGIN USER NKEY SEED" in texts["creds"]
        ):
            raise SettingsError(
                _var("creds"),
                f"{self.creds} is not a NATS .creds file (user JWT + NKey seed, as nsc writes)",
            )
        if "nkey" in texts and not _is_user_seed(texts["nkey"]):
            raise SettingsError(_var("nkey"), f"{self.nkey} is not one NKey user seed (SU...)")
        for one, other in (("user", "password"), ("tls_cert", "tls_key")):
            given = {n for n in (one, other) if getattr(self, n) is not None}
            if len(given) == 1:
                (name,) = given
                missing = other if name == one else one
                raise SettingsError(_var(name), f"needs {_var(missing)} as well")
        methods = [name for name in ("creds", "nkey", "user", "token") if getattr(self, name)]
        labels = [_var(n) if n != "user" else f"{_var(n)}/{_var('password')}" for n in methods]
        if any(_has_userinfo(url) for url in servers or []):
            labels.append("credentials in PUSHSVC_NATS_URL")
        if len(labels) > 1:
            raise SettingsError(
                _var(methods[0]),
                f"conflicting NATS authentication: {' and '.join(labels)} are set; use one",
            )
        if self.tls_ca is not None:
            try:
                ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
            except ssl.SSLError as exc:
                raise SettingsError(
                    _var("tls_ca"), f"{self.tls_ca} holds no usable PEM CA: {exc.reason or exc}"
                ) from None
        if self.tls_cert is not None:
            try:
                self.tls_context()
            except ssl.SSLError as exc:
                raise SettingsError(
                    _var("tls_cert"),
                    f"cannot load the TLS files (certificate and key): {exc.reason or exc}",
                ) from None

    def tls_context(self) -> ssl.SSLContext | None:
        """A client ``ssl.SSLContext`` for the TLS settings, or None when none is set.

        Verifies the server's certificate and host name (``ssl.create_default_context``)
        against ``tls_ca`` when given, else the system's CAs; presents
        ``tls_cert``/``tls_key`` for mutual TLS.

        Raises:
            ssl.SSLError, OSError: a file is not valid PEM or cannot be read.
        """
        if not self.wants_tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect()`` (nats-py 2.x names).

        Returns:
            A dict with any of ``user_credentials``, ``nkeys_seed``, ``user``,
            ``password``, ``token``, ``tls``; empty when nothing is configured.
        """
        options: dict[str, Any] = {}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.nkey:
            options["nkeys_seed"] = self.nkey
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password
        if self.token is not None:
            options["token"] = self.token
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options

    def describe(self, servers: list[str] | None = None) -> str:
        """Which credentials are sent, for error messages (never the secret itself)."""
        if self.creds:
            return f"creds file {self.creds} ({_var('creds')})"
        if self.nkey:
            return f"NKey seed file {self.nkey} ({_var('nkey')})"
        if self.user is not None:
            return f"user {self.user!r} ({_var('user')}/{_var('password')})"
        if self.token is not None:
            return f"a token ({_var('token')})"
        if any(_has_userinfo(url) for url in servers or []):
            return "the credentials in the URL"
        return "no credentials"

    def secrets(self) -> list[str]:
        """The literal secrets (password, token) to keep out of logs."""
        return [s for s in (self.password, self.token) if s]


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Add ``--nats-creds`` ... ``--nats-tls-key`` to ``parser``.

    Each flag defaults to its ``PUSHSVC_NATS_*`` variable in ``env`` (default
    ``os.environ``); read them back with :meth:`NatsSecurity.from_args`.
    """
    env = os.environ if env is None else env
    group = parser.add_argument_group(
        "NATS security", "defaults: the PUSHSVC_NATS_* variables (prefer them for secrets)"
    )
    for name, (var, flag, help_text) in OPTIONS.items():
        group.add_argument(
            flag,
            dest="nats_" + name,
            default=env.get(var) or None,
            metavar="PATH" if name in _FILES else name.upper(),
            help=f"{help_text} (default ${var})",
        )


def display_url(url: str) -> str:
    """``url`` with any password in its userinfo replaced by ``***`` (for messages)."""
    parts = urlsplit(url if "://" in url else "nats://" + url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    masked = f"{user}:***" if user else "***"
    return parts._replace(netloc=f"{masked}@{host}").geturl()


def _var(name: str) -> str:
    return OPTIONS[name][0]


def _has_userinfo(url: str) -> bool:
    parts = urlsplit(url if "://" in url else "nats://" + url)
    return bool(parts.username or parts.password)


def _is_user_seed(text: str) -> bool:
    """True when ``text`` is one NKey user seed (nats-py reads the whole file as the seed)."""
    import nkeys

    seed = text.strip()
    if not seed.startswith("SU"):
        return False
    try:
        nkeys.from_seed(bytearray(seed.encode()))
    except Exception:
        return False
    return True
