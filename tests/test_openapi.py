"""The served ``GET /openapi.json`` describes the real API.

schemathesis generates requests from the served document (positive and negative
data, with and without credentials) and validates every real answer of a real
uvicorn server against it: status declared, media type, body schema, required
headers, no 5xx. Then every error answer is provoked on purpose and validated
against the document the same way.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import httpx
import hypothesis
import schemathesis
from helpers import bearer
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

API_KEY = "k-openapi-0123456789"
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 12  # per operation and generation mode: ~250 requests in all


def fuzz(document: dict[str, Any], base: str, credentials: list[str | None]) -> set[Any]:
    """Send schemathesis-generated requests to ``base``; raise on the first non-conformance.

    Every operation gets ``EXAMPLES`` positive and ``EXAMPLES`` negative cases
    (derandomized: the same requests every run), each with one of ``credentials``
    as ``Authorization: Bearer`` (None: no header).

    Returns:
        the ``(operation, status)`` pairs seen.
    """
    schema = schemathesis.openapi.from_dict(document)
    seen: set[tuple[str, int]] = set()
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(result.ok(), mode, base, credentials, seen)
            except hypothesis.errors.Unsatisfiable:
                pass  # negative mode: nothing in this operation can be made invalid
    return seen


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base: str,
    credentials: list[str | None],
    seen: set[tuple[str, int]],
) -> None:
    checks = [not_a_server_error, *CONFORMANCE]  # NATS is up: no 5xx at all
    if mode.is_negative:
        checks.append(negative_data_rejection)

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(mode), credential=st.sampled_from(credentials))
    def run(case: schemathesis.Case, credential: str | None) -> None:
        headers = {}
        use = checks
        if credential is not None:  # ours replaces any generated Authorization
            headers["Authorization"] = f"Bearer {credential}"
            generated = case.headers or {}
            case.headers = {k: v for k, v in generated.items() if k.lower() != "authorization"}
            if len(case.headers) < len(generated):
                # the generated (maybe schema-violating) header is gone: the request
                # is only as negative as the rest of it, which may be nothing
                use = [c for c in checks if c is not negative_data_rejection]
        response = case.call_and_validate(base_url=base, headers=headers, checks=use, timeout=10)
        seen.add((operation.label, response.status_code))

    run()


async def test_generated_requests_get_declared_answers(start_server, http):
    srv = await start_server(dev=True, api_keys=[f"ops:{API_KEY}"])
    r = await http.get(f"{srv.base}/openapi.json")
    assert r.status_code == 200
    document = r.json()
    validate(document)  # a valid OpenAPI 3.1 document, as client generators need
    operations = {f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item}
    assert operations == {
        "GET /ws",
        "POST /emit",
        "POST /emit/{channel}",
        "GET /history/{channel}",
        "GET /presence/{channel}",
        "POST /api/{op}",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /static/pushsvc.js",
        "GET /",
        "GET /favicon.ico",
        "GET /static/{name}",
        "GET /dev/token",
        "POST /sse/commands",
        "POST /sse/ticket",
    }
    token = srv.token("fuzzer", channels=[">"], publish=[">"])
    seen = await asyncio.to_thread(fuzz, document, srv.base, [None, token, API_KEY, "wrong"])
    # every operation was answered, and the fuzzing reached past authentication
    assert {label for label, _ in seen} == operations
    assert {("POST /emit", 202), ("POST /emit/{channel}", 202), ("GET /ws", 426)} <= seen
    assert {("POST /emit", 401), ("POST /emit", 400), ("GET /history/{channel}", 200)} <= seen


def conforms(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """Validate one real answer against the operation ``method path`` of the document.

    Raises:
        schemathesis failures: undeclared status, media type, body or missing header
        (a declared 503 is fine here).
    """
    operation = schemathesis.openapi.from_dict(document)[path][method]
    params = {
        p["name"]: "x" for p in operation.definition.raw.get("parameters", []) if p["in"] == "path"
    }
    base = str(response.request.url).split(path.split("{")[0], 1)[0]
    case = operation.Case(path_parameters=params)
    case.validate_response(response, checks=CONFORMANCE, transport_kwargs={"base_url": base})


async def served(http: httpx.AsyncClient, srv: Any) -> dict[str, Any]:
    return (await http.get(f"{srv.base}/openapi.json")).json()


async def test_emit_and_history_errors_are_the_declared_ones(start_server, http, channel):
    srv = await start_server(max_emit_bytes=256, emit_rate=0.01, emit_burst=3)
    doc = await served(http, srv)
    emit, raw, hist = f"{srv.base}/emit", f"{srv.base}/emit/{channel}", f"{srv.base}/history"

    def svc(sub: str) -> dict[str, str]:  # one emit bucket (3 tokens) per case
        return bearer(srv.token(sub, channels=[], publish=[channel]))

    reader = bearer(srv.token("reader", channels=["granted.>"]))
    one = {"channel": channel, "data": 1}
    zipped = {**svc("s415"), "Content-Encoding": "gzip"}
    cases = [
        ("POST", "/emit", 400, await http.post(emit, content=b"[1]", headers=svc("s400"))),
        ("POST", "/emit", 401, await http.post(emit, json=one)),
        (
            "POST",
            "/emit",
            403,
            await http.post(emit, json={**one, "channel": "x"}, headers=svc("s403")),
        ),
        (
            "POST",
            "/emit/{channel}",
            413,
            await http.post(raw, content=b"x" * 300, headers=svc("s413")),
        ),
        (
            "POST",
            "/emit/{channel}",
            415,
            await http.post(raw, content=gzip.compress(b"1"), headers=zipped),
        ),
        ("POST", "/emit/{channel}", 422, await http.post(f"{emit}/a..b", headers=svc("s422"))),
        (
            "GET",
            "/history/{channel}",
            400,
            await http.get(f"{hist}/granted.x?since=-1", headers=reader),
        ),
        ("GET", "/history/{channel}", 401, await http.get(f"{hist}/{channel}")),
        ("GET", "/history/{channel}", 403, await http.get(f"{hist}/{channel}", headers=reader)),
        ("GET", "/history/{channel}", 422, await http.get(f"{hist}/_INBOX.x", headers=reader)),
    ]
    for method, path, expected, response in cases:
        assert response.status_code == expected, (path, response.text)
        assert set(response.json()) >= {"error", "message"}
        conforms(doc, method, path, response)
    assert cases[1][3].headers["www-authenticate"] == "Bearer"
    assert cases[4][3].json()["error"] == "unsupported_media_type"
    assert cases[4][3].headers["accept-encoding"] == "identity"
    # the largest sequence the schema allows is answered, not a 500
    top = await http.get(f"{hist}/granted.x?since={2**64 - 1}&limit={2**64 - 1}", headers=reader)
    assert top.status_code == 200, top.text
    assert top.json()["messages"] == []
    conforms(doc, "GET", "/history/{channel}", top)
    over = await http.get(f"{hist}/granted.x?since={2**64}", headers=reader)
    assert over.status_code == 400  # as declared: the maximum is 2^64-1
    conforms(doc, "GET", "/history/{channel}", over)
    # one principal's bucket: 3 emits in the burst, then 429 with Retry-After
    h = svc("burst")
    answers = [await http.post(raw, content=str(i).encode(), headers=h) for i in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    for a in answers:
        conforms(doc, "POST", "/emit/{channel}", a)


async def test_unavailable_answers_are_declared(start_server, http, own_nats, channel):
    srv = await start_server(nats_url=own_nats.url, publish_timeout=0.5)
    doc = await served(http, srv)
    token = bearer(srv.token("svc", channels=[channel], publish=[channel]))
    ok = await http.post(f"{srv.base}/emit/{channel}", content=b"1", headers=token)
    assert ok.status_code == 202
    own_nats.kill()
    answers = {
        ("POST", "/emit/{channel}"): await http.post(
            f"{srv.base}/emit/{channel}", content=b"2", headers=token
        ),
        ("POST", "/emit"): await http.post(
            f"{srv.base}/emit", json={"channel": channel, "data": 3}, headers=token
        ),
        ("GET", "/history/{channel}"): await http.get(
            f"{srv.base}/history/{channel}", headers=token
        ),
        ("GET", "/readyz"): await http.get(f"{srv.base}/readyz"),
    }
    for (method, path), response in answers.items():
        assert response.status_code == 503, (path, response.text)
        conforms(doc, method, path, response)
        if path != "/readyz":
            assert response.json()["error"] == "unavailable"
            assert int(response.headers["retry-after"]) >= 1
    assert answers[("GET", "/readyz")].json()["nats"] is False


async def test_presence_answers_are_declared(start_server, http, channel):
    srv = await start_server(presence_channels=["*.room"], api_keys=[f"ops:{API_KEY}"])
    doc = await served(http, srv)
    c = await srv.client(srv.token("alice", extra={"info": {"seat": 1}}))
    await c.subscribe(channel)
    url = f"{srv.base}/presence"
    watcher = bearer(srv.token("w", channels=[], extra={"presence": ["*.room"]}))
    cases = [
        (200, await http.get(f"{url}/{channel}", headers=bearer(API_KEY))),
        (200, await http.get(f"{url}/{channel}", headers=watcher)),
        (400, await http.get(f"{url}/elsewhere", headers=bearer(API_KEY))),
        (401, await http.get(f"{url}/{channel}")),
        (403, await http.get(f"{url}/{channel}", headers=bearer(srv.token("nogrant")))),
        (422, await http.get(f"{url}/a..b", headers=watcher)),
    ]
    off = await start_server(history_ttl=0, presence_channels=["*.room"])
    cases.append((503, await http.get(f"{off.base}/presence/{channel}", headers=watcher)))
    for expected, response in cases:
        assert response.status_code == expected, response.text
        conforms(doc, "GET", "/presence/{channel}", response)
    assert cases[0][1].json()["clients"][0]["info"] == {"seat": 1}
    assert int(cases[-1][1].headers["retry-after"]) >= 1


def upgrade_headers(**extra: str) -> dict[str, str]:
    """The headers of a WebSocket opening handshake (RFC 6455 4.1)."""
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **extra,
    }


async def test_ws_answers_are_declared(start_server, http):
    srv = await start_server(max_connections=1)
    doc = await served(http, srv)
    plain = await http.get(f"{srv.base}/ws")
    assert plain.status_code == 426
    assert plain.headers["upgrade"].lower() == "websocket"
    assert plain.json()["error"] == "upgrade_required"
    conforms(doc, "GET", "/ws", plain)
    refused = await http.get(
        f"{srv.base}/ws", headers=upgrade_headers(Authorization="Bearer not-a-jwt")
    )
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("text/plain")
    conforms(doc, "GET", "/ws", refused)
    malformed = await http.get(
        f"{srv.base}/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert malformed.status_code == 400  # no Sec-WebSocket-Key (websockets answers it)
    conforms(doc, "GET", "/ws", malformed)
    old = await http.get(
        f"{srv.base}/ws", headers=upgrade_headers(**{"Sec-WebSocket-Version": "8"})
    )
    assert old.status_code == 426 and old.headers["sec-websocket-version"] == "13"
    assert old.headers["upgrade"].lower() == "websocket"
    conforms(doc, "GET", "/ws", old)
    client = await srv.client()  # the WebSocket itself still works on the same path
    full = await http.get(f"{srv.base}/ws", headers=upgrade_headers())
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    conforms(doc, "GET", "/ws", full)
    await client.subscribe("still.here")
    await client.close()


async def test_text_answers_are_not_declared_json(start_server, http):
    srv = await start_server()
    doc = await served(http, srv)
    for path, media_type in (("/metrics", "text/plain"), ("/static/pushsvc.js", "text/javascript")):
        response = await http.get(f"{srv.base}{path}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert list(doc["paths"][path]["get"]["responses"]["200"]["content"]) == [media_type]
        conforms(doc, "GET", path, response)
    metrics = (await http.get(f"{srv.base}/metrics")).text
    assert "# TYPE pushsvc_connections gauge" in metrics
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerJWT"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearerJWT"]["description"],
    }
    assert schemes["apiKey"]["scheme"] == "bearer"
    for path in ("/emit", "/emit/{channel}"):
        op = doc["paths"][path]["post"]
        assert op["security"] == [{"bearerJWT": []}, {"apiKey": []}]
        assert any(p["name"] == "Idempotency-Key" for p in op["parameters"])
        assert op["requestBody"]["required"] is True
    assert list(doc["paths"]["/emit"]["post"]["requestBody"]["content"]) == ["application/json"]
    assert (
        "application/octet-stream"
        in doc["paths"]["/emit/{channel}"]["post"]["requestBody"]["content"]
    )
