"""The server URL a client command is given (``pushsvc subscribe --url``, ``pushsvc bench --url``).

One rule for both: ``http://host:port[/base]`` (``https`` for TLS), the
``ws(s)://`` form of it, or the ``/ws`` endpoint itself (``ws://host:port/base/ws``:
a path ending in ``/ws`` names the endpoint, the rest is the base path). A URL
without a scheme is taken as ``http://`` (``127.0.0.1:8000``). The port defaults
to 80 (443 with TLS) and must be 1..65535 (RFC 3986 3.2.3 allows an empty port;
a client cannot connect to it). Parsed with :func:`urllib.parse.urlsplit`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

_SCHEMES = {"http": False, "ws": False, "https": True, "wss": True}  # scheme -> TLS


class ServerURL(msgspec.Struct, frozen=True):
    """A pushsvc server as a client reaches it.

    Attributes:
        host: host name or IP address (an IPv6 address without brackets).
        port: TCP port, 1..65535.
        tls: ``https``/``wss``.
        base: the base path (``PUSHSVC_BASE_PATH``) without a trailing ``/``; "" at the root.
        query: the query string, kept on :attr:`ws_url` ("" when none).
    """

    host: str
    port: int
    tls: bool
    base: str = ""
    query: str = ""

    @property
    def netloc(self) -> str:
        """``host:port`` (``[v6]:port``), also the ``Host`` header the bench sends."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def http_url(self) -> str:
        """``http(s)://host:port/base``: where ``/emit`` and ``/dev/token`` live."""
        return f"{'https' if self.tls else 'http'}://{self.netloc}{self.base}"

    @property
    def ws_url(self) -> str:
        """``ws(s)://host:port/base/ws[?query]``: the WebSocket endpoint."""
        query = f"?{self.query}" if self.query else ""
        return f"{'wss' if self.tls else 'ws'}://{self.netloc}{self.base}/ws{query}"


def parse_server_url(url: str, name: str = "URL") -> ServerURL:
    """Parse a server URL (see the module docstring for the forms accepted).

    Args:
        url: what the user gave.
        name: how error messages call it, e.g. ``--url``.

    Raises:
        ValueError: ``"<name> must be http(s)://host:port[/base] ..."`` for another
            scheme or no host; ``"bad port in <name> ..."`` for a port outside 1..65535.
    """
    parts = urlsplit(url if "://" in url else "http://" + url)
    tls = _SCHEMES.get(parts.scheme.lower())
    if tls is None or not parts.hostname:
        raise ValueError(f"{name} must be http(s)://host:port[/base] (or ws(s)://...), got {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError(f"bad port in {name} {url!r} (1..65535)")
    base = parts.path.rstrip("/").removesuffix("/ws")
    return ServerURL(parts.hostname, port or (443 if tls else 80), tls, base, parts.query)
