"""The JSON answers shared by pushsvc's HTTP routes: errors, and bodies from Structs.

Body ``{"error": code, "message": reason, "retry_after"?: seconds}``; 401 carries
``WWW-Authenticate: Bearer`` (RFC 6750 3) and 429/503 carry ``Retry-After`` in
whole seconds (RFC 9110 10.2.3). The OpenAPI description of these answers is
:func:`pushsvc.api.openapi.errors`.
"""

from __future__ import annotations

import math

import msgspec
from fastapi.responses import JSONResponse, Response


def json_response(body: msgspec.Struct, status: int = 200) -> Response:
    """``body`` encoded by msgspec as an ``application/json`` answer with ``status``."""
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


class HTTPError(Exception):
    """A request refused with an HTTP ``status``, an error ``code`` and a client-safe message.

    Args:
        status: HTTP status (4xx/5xx).
        code: machine-readable code, e.g. ``invalid_channel``.
        message: reason safe to show the caller (never a token or secret).
        retry_after: seconds the caller should wait (429, 503), or None.
        headers: further response headers, e.g. ``Accept-Encoding`` on 415.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        headers = dict(self.headers)
        body: dict[str, object] = {"error": self.code, "message": str(self)}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            body["retry_after"] = round(self.retry_after, 3)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(body, status_code=self.status, headers=headers)
