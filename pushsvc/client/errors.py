"""Errors of the Python client (:mod:`pushsvc.client`).

Every error is a :class:`PushsvcError` with a ``code`` string: the ``error``
frame codes of docs/protocol.md ("Error codes") for refusals by the server, or a
client-side code (``closed``, ``connection_lost``, ``stopped``, ``unauthorized``).
"""

from __future__ import annotations

from ..protocol import RequestId


class PushsvcError(Exception):
    """Base class of the client's errors.

    Attributes:
        code: a machine-readable code (see the module docstring).
        message: one line for humans.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CommandError(PushsvcError):
    """The server refused a command with an ``error`` frame; the connection stays open.

    ``code`` is one of docs/protocol.md's error codes: ``bad_request``,
    ``forbidden``, ``invalid_channel``, ``rate_limited``, ``limit_exceeded``,
    ``unavailable``.

    Attributes:
        id: the command id the server echoed (None for an error naming no command).
        retry_after: seconds to wait before retrying (``rate_limited``), or None.
        channel: the channel or pattern of the refused command, when it had one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        id: RequestId = None,
        retry_after: float | None = None,
        channel: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.id = id
        self.retry_after = retry_after
        self.channel = channel

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionLost(PushsvcError):
    """The connection closed while a command waited for its answer (code ``connection_lost``).

    The command may or may not have been applied (a ``publish`` may be stored):
    retry it once the client is connected again if that is safe.
    """

    def __init__(self, message: str = "connection closed before the answer came") -> None:
        super().__init__("connection_lost", message)


class ClientClosed(PushsvcError):
    """The application closed the client (code ``closed``); nothing more happens on it."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__("closed", message)


class Stopped(PushsvcError):
    """The client stopped for good and does not reconnect (code ``stopped``).

    Raised by every waiting call, and by the iterators of the client's
    subscriptions once their buffered messages are consumed. Causes: a close code
    that means "do not reconnect" (4001 without ``get_token``, 1009, 4003, 4011,
    4500-4999: see :mod:`pushsvc.client.closecodes`), or a handshake the server
    refused with a status that retrying cannot change (e.g. 403, 404).

    Attributes:
        close_code: the WebSocket close code, or None (handshake refused, bad URL).
        reason: the close reason or the refusal's body (one line).
        status: the HTTP status of a refused handshake, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        close_code: int | None = None,
        reason: str = "",
        status: int | None = None,
        code: str = "stopped",
    ) -> None:
        super().__init__(code, message)
        self.close_code = close_code
        self.reason = reason
        self.status = status


class Unauthorized(Stopped):
    """No token can be had: stops the client (code ``unauthorized``).

    Raise it from ``get_token`` to say the user may not connect any more (logged
    out, account closed): the client stops instead of retrying (other exceptions
    from ``get_token`` are retried with backoff), as centrifuge-js's
    ``UnauthorizedError``. The client raises it itself when the server closed
    with 4001 and there is no ``get_token`` to ask for a new token.
    """

    def __init__(
        self, message: str = "unauthorized", *, close_code: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, close_code=close_code, reason=reason, code="unauthorized")
