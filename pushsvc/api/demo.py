"""The demo page of ``pushsvc serve --dev``: a chat plus a protocol console.

Serves ``pushsvc/static/index.html`` at the base path and its assets (stylesheet,
script, icon) under ``static/``; the page talks to the node only through
``/static/pushsvc.js``, ``/dev/token`` (also here: it mints tokens with the node's
secret) and ``/ws`` like any other client. Mounted by :mod:`pushsvc.app` in dev
mode only.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

import msgspec
from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse, Response

from ..auth.tokens import mint_token
from ..channels import InvalidChannel, validate_grant
from ..config.settings import Settings
from .errors import HTTPError, json_response
from .openapi import declare, errors, json_body, ref, text_body

# file name in pushsvc/static -> media type; nothing else in that folder is served here
DEMO_ASSETS: dict[str, str] = {
    "demo.css": "text/css",
    "demo.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


def static_path(name: str) -> str:
    """Filesystem path of ``pushsvc/static/<name>`` (installed package data)."""
    return str(resources.files("pushsvc") / "static" / name)


def static_file_route(
    router: APIRouter, url: str, name: str, media_type: str, operation_id: str, summary: str
) -> None:
    """Add ``GET url`` to ``router``: the file ``pushsvc/static/<name>`` as ``media_type``."""

    async def static_file() -> FileResponse:
        return FileResponse(static_path(name), media_type=media_type)

    static_file.__doc__ = summary
    router.get(
        url,
        operation_id=operation_id,
        summary=summary,
        response_class=FileResponse,
        responses={200: text_body(media_type, summary)},
    )(static_file)


def demo_router() -> APIRouter:
    """Routes of the demo page, relative to the base path.

    Returns:
        A router with ``GET /`` (the page), ``GET /static/{name}`` for the names in
        :data:`DEMO_ASSETS` (404 for any other name) and ``GET /favicon.ico`` (the SVG
        icon, so browsers and crawlers asking for the conventional path get no 404).
    """
    router = APIRouter()

    static_file_route(router, "/", "index.html", "text/html", "demoPage", "Demo page (dev mode)")
    static_file_route(
        router,
        "/favicon.ico",
        "favicon.svg",
        "image/svg+xml",
        "demoIcon",
        "Demo icon (dev mode), at the conventional path",
    )

    @router.get(
        "/static/{name}",
        operation_id="demoAsset",
        summary="Demo page asset (dev mode)",
        response_class=FileResponse,
        responses={
            200: {
                "description": "The asset",
                "content": {t: {"schema": {"type": "string"}} for t in DEMO_ASSETS.values()},
            },
            404: {
                "description": "Not one of the demo's assets",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        },
    )
    async def asset(
        name: Annotated[str, Path(json_schema_extra=declare({"enum": sorted(DEMO_ASSETS)}))],
    ) -> FileResponse:
        """A stylesheet, script or icon of the demo page."""
        media_type = DEMO_ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, "not found")
        return FileResponse(static_path(name), media_type=media_type)

    return router


class DevToken(msgspec.Struct):
    """Answer of ``GET /dev/token`` (dev mode only): ``ttl`` in seconds."""

    token: str
    user: str
    ttl: int


def dev_token_router(settings: Settings) -> APIRouter:
    """``GET /dev/token?user=&channels=&publish=&ttl=``: a token signed with the node's
    secret (dev mode only; never mounted without ``--dev``).

    ``channels``/``publish`` are comma-separated grants (default ``>``); the
    ``presence`` claim repeats the ``channels`` grants (who may subscribe may see who
    is there); ``ttl`` seconds, 1..86400. A malformed grant answers 400.
    """
    router = APIRouter()

    @router.get(
        "/dev/token",
        operation_id="devToken",
        summary="Mint a token (dev mode)",
        response_model=None,
        responses={
            200: json_body(ref(DevToken), "A token signed with the node's secret"),
            **errors(400),
        },
    )
    async def dev_token(
        user: str = Query("dev", min_length=1, max_length=64),
        channels: str = Query(">"),
        publish: str = Query(">"),
        ttl: int = Query(3600, ge=1, le=86400),
    ) -> Response:
        """Mint a token (dev mode only; never enabled without ``--dev``)."""
        try:
            grants = [validate_grant(c) for c in channels.split(",") if c]
            pub = [validate_grant(c) for c in publish.split(",") if c]
        except InvalidChannel as exc:
            return HTTPError(400, "bad_request", str(exc)).response()
        token = mint_token(
            settings.jwt_secret or "",
            user,
            channels=grants,
            publish=pub,
            ttl=ttl,
            extra={"presence": grants} if grants else None,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            headers={"typ": settings.jwt_type} if settings.jwt_type else None,
        )
        return json_response(DevToken(token, user, ttl))

    return router
