"""The proxy's fences, in-process: Serve's plain-text answers become OpenAI-shaped, request ids are bounded."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.responses import JSONResponse, PlainTextResponse

from serve_app.serve.proxy_fences import ProxyFences, middlewares

pytestmark = pytest.mark.http


def behind_fences(inner) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=ProxyFences(inner)), base_url="http://proxy")


def get(inner, headers=None) -> httpx.Response:
    async def go():
        async with behind_fences(inner) as client:
            return await client.get("/v1/embeddings", headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "status, type_, code",
    [
        (503, "rate_limit_error", "overloaded"),
        (500, "server_error", None),
        (408, "invalid_request_error", "request_timeout"),
    ],
)
def test_the_proxys_plain_text_answers_become_openai_errors(status, type_, code):
    async def proxy_answer(scope, receive, send):  # what Serve's proxy sends when it answers itself
        await PlainTextResponse("Request dropped due to backpressure", status, {"retry-after": "1"})(
            scope, receive, send
        )

    resp = get(proxy_answer)
    assert resp.status_code == status
    assert resp.json() == {
        "error": {"message": "Request dropped due to backpressure", "type": type_, "param": None, "code": code}
    }
    assert resp.headers["retry-after"] == "1"
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_answers_of_the_ingress_pass_untouched():
    async def ingress(scope, receive, send):
        await JSONResponse({"error": {"message": "m", "type": "t", "param": None, "code": None}}, 400)(
            scope, receive, send
        )

    resp = get(ingress)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "m"


def test_an_over_long_request_id_is_replaced_before_serve_echoes_it():
    seen = {}

    async def app(scope, receive, send):
        seen.update(dict(scope["headers"]))
        await JSONResponse({"ok": True})(scope, receive, send)

    resp = get(app, {"x-request-id": "r" * 10_000})
    fresh = seen[b"x-request-id"].decode()
    assert len(fresh) == 32 and fresh in resp.headers["x-request-id-replaced"]
    get(app, {"x-request-id": "short-id-1"})
    assert seen[b"x-request-id"] == b"short-id-1"


def test_serve_gets_starlette_middleware_from_the_callback():
    from starlette.middleware import Middleware

    assert [m.cls for m in middlewares()] == [ProxyFences] and all(isinstance(m, Middleware) for m in middlewares())


def test_with_keys_set_every_path_but_health_needs_one_serves_own_routes_too():
    async def serve_routes(scope, receive, send):  # Serve's /-/routes and /-/healthz, and the ingress
        await JSONResponse({"/": "kalm"})(scope, receive, send)

    async def go(path, headers=None):
        transport = httpx.ASGITransport(app=ProxyFences(serve_routes, api_keys=["sk-1"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.get(path, headers=headers)

    for path in ("/-/routes", "/-/healthz", "/v1/models", "/anything"):
        resp = asyncio.run(go(path))
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
        assert asyncio.run(go(path, {"authorization": "Bearer sk-1"})).status_code == 200
    assert asyncio.run(go("/health")).status_code == 200
    assert asyncio.run(go("/-/routes", {"authorization": "Bearer sk-2"})).status_code == 401


def test_without_keys_serves_routes_answer_as_before():
    async def serve_routes(scope, receive, send):
        await JSONResponse({"/": "kalm"})(scope, receive, send)

    async def go():
        transport = httpx.ASGITransport(app=ProxyFences(serve_routes, api_keys=[]))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.get("/-/routes")

    assert asyncio.run(go()).json() == {"/": "kalm"}
