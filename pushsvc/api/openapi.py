"""The HTTP API as OpenAPI 3.1: body schemas, error answers, security schemes.

FastAPI generates ``GET /openapi.json`` from the routes; the routes build their
bodies by hand (raw request bodies, msgspec-encoded answers), so FastAPI cannot
see them. This module gives it what it cannot infer, in FastAPI's own terms:

- the bodies as msgspec Structs (each defined beside its route: emit.py,
  history.py, presencehttp.py, demo.py, app.py), referenced with :func:`ref`,
  turned into JSON Schema components by :func:`msgspec.json.schema_components`
  and merged into the document by :func:`install` (FastAPI's documented way of
  extending the schema: wrap ``app.openapi``);
- ``responses=`` fragments for every error answer (:func:`errors`), with the
  ``{"error", "message"}`` body of :class:`pushsvc.api.errors.HTTPError` and its
  ``Retry-After`` (RFC 9110 10.2.3) and ``WWW-Authenticate`` (RFC 6750 3) headers;
- the two credentials the HTTP routes accept, as FastAPI ``Security`` schemes
  (:data:`SECURITY`): a bearer JWT and a configured API key, both sent as
  ``Authorization: Bearer ...`` (either one satisfies an operation).

docs/protocol.md is the authority on the contract; ``tests/test_openapi.py``
checks real answers against the served document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from msgspec import UNSET, Meta, UnsetType

from ..channels import CHANNEL_PATTERN, MAX_CHANNEL_LENGTH

CHANNEL_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_CHANNEL_LENGTH,
    "pattern": CHANNEL_PATTERN,
    "description": "Channel name: dot-separated tokens of [A-Za-z0-9_-], 1..128 characters; "
    "the first tokens _INBOX, _R_ and _JS are reserved. Anything else is answered 422.",
}

Channel = Annotated[str, Meta(min_length=1, max_length=MAX_CHANNEL_LENGTH, pattern=CHANNEL_PATTERN)]
Seq = Annotated[int, Meta(ge=1, description="JetStream stream sequence (unsigned 64-bit)")]


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Body of every JSON error answer of the HTTP routes."""

    error: Annotated[
        str,
        Meta(
            description="machine-readable code: bad_request, unauthorized, forbidden, "
            "too_large, unsupported_media_type, invalid_channel, rate_limited, "
            "unavailable, upgrade_required"
        ),
    ]
    message: Annotated[str, Meta(description="reason for a human; never contains a secret")]
    retry_after: Annotated[float, Meta(ge=0, description="seconds (429, 503)")] | UnsetType = UNSET


_REFERENCED: dict[str, type[msgspec.Struct]] = {}
_AMENDED: dict[str, dict[str, Any]] = {}


def ref(struct: type[msgspec.Struct]) -> dict[str, str]:
    """A JSON Schema reference to the component generated from ``struct``.

    The struct is remembered: :func:`install` puts a component for every struct
    referenced (and the structs they use) into the document.
    """
    _REFERENCED[struct.__name__] = struct
    return {"$ref": f"#/components/schemas/{struct.__name__}"}


def amend(struct: type[msgspec.Struct], **keywords: Any) -> None:
    """Add JSON Schema ``keywords`` to the component of ``struct``.

    For rules a struct's fields cannot express (e.g. ``anyOf`` of two ``required``
    lists: one of two optional fields must be present); :func:`components` merges
    them into the generated component whenever ``struct`` is in the document.
    """
    _AMENDED.setdefault(struct.__name__, {}).update(keywords)


def components() -> dict[str, Any]:
    """JSON Schema components of every struct passed to :func:`ref` so far (and the
    structs they use), with the keywords of :func:`amend`."""
    structs = tuple(_REFERENCED.values())
    _, schemas = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    for name, keywords in _AMENDED.items():
        if name in schemas:
            schemas[name].update(keywords)
    return schemas


def declare(schema: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` replacing a parameter's generated schema by ``schema``.

    For parameters the route parses itself (so that a bad value gets pushsvc's
    400/422 error body, not FastAPI's validation answer): the schema says what
    is accepted while the Python type stays ``str``. The description is kept.
    """

    def replace(generated: dict[str, Any]) -> None:
        description = generated.get("description")
        generated.clear()
        generated.update(schema)
        if description:
            generated["description"] = description

    return replace


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A ``responses=`` entry with an ``application/json`` body."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying (RFC 9110 10.2.3)",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("malformed request (the message says what)", {}),
    401: (
        "no, unknown or invalid credential",
        {
            "WWW-Authenticate": {
                "description": "Bearer (RFC 6750 3)",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    ),
    403: (
        "the credential does not grant this channel, or the Origin is refused, or it is "
        "not an API key (server API)",
        {},
    ),
    404: (
        "unknown or closed stream session: reconnect the stream; unknown server API operation",
        {},
    ),
    413: ("body larger than its limit (PUSHSVC_MAX_EMIT_BYTES, PUSHSVC_MAX_FRAME_BYTES)", {}),
    415: (
        "Content-Encoding other than identity: pushsvc does not decode bodies",
        {
            "Accept-Encoding": {
                "description": "identity (RFC 9110 15.5.16)",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    ),
    422: ("invalid channel name", {}),
    429: ("per-principal emit bucket empty", _RETRY_AFTER),
    503: ("NATS/JetStream cannot take or answer it now; retry later", _RETRY_AFTER),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the JSON error answers with these HTTP statuses.

    Each has the :class:`ErrorBody` schema and the headers the answer carries
    (``WWW-Authenticate`` on 401, ``Retry-After`` on 429 and 503).

    Raises:
        KeyError: a status pushsvc never answers with a JSON error.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _ERRORS[status]
        out[status] = json_body(ref(ErrorBody), description)
        if headers:
            out[status]["headers"] = headers
    return out


def text_body(media_type: str, description: str, **extra: Any) -> dict[str, Any]:
    """A ``responses=`` entry whose body is text of ``media_type`` (not JSON)."""
    return {
        "description": description,
        "content": {media_type: {"schema": {"type": "string"}}},
        **extra,
    }


JWT_SCHEME = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="bearerJWT",
    description="A JWT signed with PUSHSVC_JWT_SECRET / PUSHSVC_JWT_PUBLIC_KEY: emit needs a "
    "`publish` grant covering the channel, history a `channels` grant, presence a `presence` "
    "grant (docs/protocol.md).",
    auto_error=False,
)
API_KEY_SCHEME = HTTPBearer(
    scheme_name="apiKey",
    description="One of PUSHSVC_API_KEYS, sent as `Authorization: Bearer <key>` (any channel).",
    auto_error=False,
)
SECURITY = [Security(JWT_SCHEME), Security(API_KEY_SCHEME)]
"""Route ``dependencies=``: declares both schemes (alternatives); refuses nothing itself."""


def install(app: FastAPI) -> None:
    """Merge the msgspec-generated components into ``app``'s OpenAPI document.

    Wraps ``app.openapi`` (FastAPI: "Extending OpenAPI"); the host app's own
    components are kept (a host component of the same name wins). The document
    is built on its first request, so routes added after this call are in it.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        cached = app.openapi_schema is not None
        document = build()  # FastAPI builds it once and caches it in app.openapi_schema
        if not cached:
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in components().items():
                schemas.setdefault(name, schema)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
