"""A small async publisher for Python producers.

No SDK is needed to publish (any NATS client can publish to ``push.<channel>``);
this adds channel validation, JSON encoding and idempotency::

    async with Publisher("nats://127.0.0.1:4222") as pub:
        seq = await pub.publish("news", {"title": "hi"}, msg_id="news-42")

    # a secured NATS: operator-mode creds and a private CA
    Publisher("tls://nats.example:4222", creds="/etc/pushsvc/app.creds", tls_ca="/etc/ca.pem")
    # the same settings as one struct (what ``pushsvc publish`` passes)
    Publisher(
        "tls://nats.example:4222",
        security=pushsvc.NatsSecurity(creds="/etc/pushsvc/app.creds", tls_ca="/etc/ca.pem"),
    )
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors

from ..channels import subject_for, validate_channel
from ..config.nats import NatsSecurity, NatsUnreachable, display_url
from . import Unavailable, confirm
from .natsconn import connect


class Publisher:
    """Publishes to pushsvc channels over NATS.

    Args:
        servers: NATS URL or list of URLs.
        prefix: subject prefix (``PUSHSVC_SUBJECT_PREFIX``, default ``push``).
        jetstream: wait for the JetStream ack and return the stream sequence
            (history on); False = core publish + flush, returns None.
        timeout: seconds to wait for NATS.
        security: all NATS security settings as one
            :class:`~pushsvc.bus.natsconn.NatsSecurity` (e.g.
            ``NatsSecurity.from_settings(settings)``); equivalent to the eight
            keyword arguments below, which may not be given with it.
        creds: path of a NATS ``.creds`` file (user JWT + NKey seed).
        nkey: path of a file holding an NKey user seed.
        user: user name (with ``password``).
        password: password (with ``user``).
        token: authentication token.
        tls_ca: PEM file of the CA(s) to trust (TLS; ``tls://`` URLs).
        tls_cert: PEM client certificate for mutual TLS (with ``tls_key``).
        tls_key: PEM private key of ``tls_cert``.

    The security arguments are those of ``PUSHSVC_NATS_*`` (see
    :mod:`pushsvc.bus.natsconn`); at most one authentication method.

    Raises:
        SettingsError: (a ``ValueError``) a file cannot be read, a pair is
            incomplete, or two authentication methods are given.
        TypeError: ``security`` given together with one of the eight keyword arguments.
    """

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = "push",
        jetstream: bool = True,
        timeout: float = 2.0,
        security: NatsSecurity | None = None,
        creds: str | None = None,
        nkey: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.servers = servers
        given = NatsSecurity(
            creds=creds,
            nkey=nkey,
            user=user,
            password=password,
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        if security is not None and given != NatsSecurity():
            raise TypeError("Publisher takes security= or the NATS keyword arguments, not both")
        self.security = given if security is None else security
        self.security.check([servers] if isinstance(servers, str) else list(servers))
        self.prefix = prefix
        self.jetstream = jetstream
        self.timeout = timeout
        self._nc: Any = None
        self._encoder = msgspec.json.Encoder()

    async def connect(self) -> Publisher:
        """Connect to NATS.

        Raises:
            NatsRefused: NATS refused the credentials or the TLS handshake failed
                (at once, no retries); the message names the URL and the cause.
            Unavailable: NATS not reachable within ``timeout`` seconds.
        """
        try:
            self._nc = await connect(
                self.servers,
                self.security,
                timeout=self.timeout,
                connect_timeout=max(1, int(self.timeout)),
                max_reconnect_attempts=-1,
            )
        except NatsUnreachable as exc:
            raise Unavailable(str(exc)) from None
        return self

    @property
    def url(self) -> str:
        """The NATS server URL(s) this publisher uses, comma-separated, credentials masked."""
        urls = [self.servers] if isinstance(self.servers, str) else self.servers
        return ",".join(map(display_url, urls))

    async def close(self) -> None:
        """Flush and close the connection."""
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def __aenter__(self) -> Publisher:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(self, channel: str, data: Any, *, msg_id: str | None = None) -> int | None:
        """Publish ``data`` to ``channel``.

        Args:
            channel: a valid channel name (no wildcards).
            data: ``bytes`` are sent as they are; anything else is JSON-encoded.
            msg_id: idempotency key (``Nats-Msg-Id``): duplicates within the
                stream's dedupe window are stored and delivered once.

        Returns:
            The stream sequence (JetStream mode), else None.

        Raises:
            InvalidChannel: bad channel name.
            Unavailable: NATS did not take the message.
        """
        if self._nc is None:
            raise Unavailable("publisher is not connected")
        channel = validate_channel(channel)
        payload = data if isinstance(data, bytes) else self._encoder.encode(data)
        subject = subject_for(self.prefix, channel)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            if self.jetstream:
                ack = await self._nc.jetstream().publish(
                    subject, payload, timeout=self.timeout, headers=headers
                )
                return ack.seq
            await self._nc.publish(subject, payload, headers=headers)
            await confirm(self._nc, self.timeout)
            return None
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            raise Unavailable(
                f"no JetStream stream stores {subject} on the NATS at {self.url}: is this "
                "the NATS pushsvc uses, with history on? (history off: publish without JetStream)"
            ) from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise Unavailable(
                f"the NATS at {self.url} did not take the message ({type(exc).__name__})"
            ) from None
