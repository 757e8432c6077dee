"""Fences in Ray Serve's HTTP proxy, in front of every ingress: a bounded request id, the API key on
Serve's own routes too, and the proxy's own error answers in OpenAI's shape.

Serve's proxy answers some requests itself, in plain text (its back-pressure 503, a 500 when an
ingress replica dies mid-request), and echoes the client's ``x-request-id`` at any length; its ``/-/routes`` and ``/-/healthz`` answer
anyone. With ``KALM_API_KEYS`` set, every path but ``/health`` needs a key here (the ingress checks
its own routes as well, for proxies without these fences). Serve
runs this module's middleware in each proxy when the Ray cluster's environment has

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.serve.proxy_fences:middlewares

(``scripts/serve.sh`` sets it; on a cluster, set it where ``ray start`` runs: docs/limits.md).
Without it the ingress still bounds what it logs, and says so in ``x-request-id-replaced``.
"""

from __future__ import annotations

import asyncio
import uuid

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import environment
from ..api.api_keys import OPEN_PATHS, authenticate
from ..api.http_errors import error_body, error_response
from ..errors import AuthenticationError
from . import memory, proxy_connections

#: Longest ``x-request-id`` used as given; a longer (or non-printable) one is replaced by a fresh id.
MAX_REQUEST_ID_CHARS = 128

REPLACED_HEADER = "x-request-id-replaced"

#: OpenAI's type and code for the statuses the proxy answers itself.
PROXY_ERRORS = {503: ("rate_limit_error", "overloaded"), 408: ("invalid_request_error", "request_timeout")}


def request_id_is_usable(request_id: str) -> bool:
    return len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isprintable()


def replaced_note(fresh_id: str) -> str:
    return f"x-request-id longer than {MAX_REQUEST_ID_CHARS} characters or not printable; replaced by {fresh_id}"


class ProxyFences:
    """Pure ASGI middleware (it runs before Serve's own request-id middleware)."""

    def __init__(self, app: ASGIApp, api_keys: list[str] | None = None):
        self.app = app
        self.api_keys = [k.encode() for k in (environment.api_keys() if api_keys is None else api_keys)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = self._bound_request_id(scope)
        if scope["path"] not in OPEN_PATHS:
            try:
                authenticate(Headers(scope=scope).get("authorization", ""), self.api_keys)
            except AuthenticationError as exc:
                await error_response(exc, "")(scope, receive, send)
                return
        held: list[Message] = []

        async def send_openai_shaped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if note:
                    message.setdefault("headers", []).append((REPLACED_HEADER.encode(), note.encode()))
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    held.append(message)  # a plain-text answer of the proxy's own: rewrite it
                    return
            elif message["type"] == "http.response.body" and held:
                held.append(message)
                if message.get("more_body"):
                    return
                await self._send_rewritten(held, send)
                return
            await send(message)

        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, receive_counted, send_openai_shaped)
        finally:
            if received > memory.TRIM_AFTER_BYTES:  # the proxy held the body in pieces: hand them back
                await asyncio.to_thread(memory.trim)

    @staticmethod
    def _bound_request_id(scope: Scope) -> str | None:
        headers = scope["headers"]
        for i, (name, value) in enumerate(headers):
            if name == b"x-request-id" and not request_id_is_usable(value.decode("latin-1")):
                fresh = uuid.uuid4().hex
                scope["headers"] = [*headers[:i], (name, fresh.encode()), *headers[i + 1 :]]
                return replaced_note(fresh)
        return None

    @staticmethod
    async def _send_rewritten(held: list[Message], send: Send) -> None:
        start, *bodies = held
        status = start["status"]
        text = b"".join(m.get("body", b"") for m in bodies).decode("utf-8", "replace").strip()
        type_, code = PROXY_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        body = error_body(text or f"HTTP {status}", type_, None, code)
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """What Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in each proxy."""
    proxy_connections.install()
    memory.return_big_buffers()  # the proxy holds each body it forwards
    return [Middleware(ProxyFences)]
