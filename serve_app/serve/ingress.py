"""The HTTP ingress: OpenAI routes, auth, limits, tokenisation; model work goes to replicas.

Request flow: headers (size-bounded) → body (size- and time-bounded; large bodies take turns)
→ ``parse_request`` → ``validate_and_tokenize`` (model id, limits, tokenisation) → chunks sent to
``EncoderReplica`` replicas (``serve/dispatch.py``) → Matryoshka truncation → float or base64 answer.

``EmbeddingsService`` does all of it given any encoder handle (``embed.remote(...)``,
``health.remote()``), and ``build_http_app`` puts it behind FastAPI routes, so tests run the
whole HTTP contract in-process with a fake handle; ``EmbeddingsIngress`` is the Ray Serve shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from .. import environment
from ..api import token_ids
from ..api.http_errors import error_response, status_of
from ..api.protocol import TokenizedRequest, parse_request, validate_and_tokenize
from ..api.rendering import render_embeddings, render_models
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from ..core.tokenization import TextTokenizer
from ..core.vectors import truncate_dimensions
from ..errors import (
    AuthenticationError,
    BodyReadTimeoutError,
    ClientDisconnectedError,
    HeadersTooLargeError,
    InvalidRequestError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
)
from .dispatch import EncoderHandle, embed_on_replicas
from .logs import route_core_logs_to_serve
from .metrics import IngressMetrics
from .proxy_fences import REPLACED_HEADER, replaced_note, request_id_is_usable

log = logging.getLogger("ray.serve")

#: Bodies larger than this are "large": read, parsed and tokenised at most
#: ``max_concurrent_large_requests`` at a time per ingress (docs/limits.md).
LARGE_BODY_BYTES = 1024 * 1024


@dataclass
class RequestTimings:
    """What one embeddings request cost, filled in as it goes: for its headers, metrics and log line."""

    inputs: int | None = None
    tokens: int | None = None
    tokenization_s: float | None = None
    queue_s: float | None = None
    inference_s: float | None = None
    render_s: float | None = None

    def headers(self, total_s: float) -> dict[str, str]:
        """Where an embeddings request's time went, as response headers (none for other routes)."""
        if self.tokenization_s is None or self.queue_s is None or self.inference_s is None:
            return {}
        return {
            "x-total-time": _ms(total_s),
            "x-tokenization-time": _ms(self.tokenization_s),
            "x-queue-time": _ms(self.queue_s),
            "x-inference-time": _ms(self.inference_s),
            "x-render-time": _ms(self.render_s or 0.0),
            "x-compute-tokens": str(self.tokens),
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status, media_type="application/json")


class EmbeddingsService:
    """The ingress's request handling, free of Ray Serve's deployment machinery."""

    def __init__(
        self,
        encoder: EncoderHandle,
        config: ServiceConfig,
        tokenizer: TextTokenizer,
        native_dimensions: int,
        api_keys: list[str],
        metrics: IngressMetrics,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.native_dimensions = native_dimensions
        self.encoder = encoder
        self.api_keys = [k.encode() for k in api_keys]
        self.metrics = metrics
        self.created = int(time.time())
        self.large_requests = asyncio.Semaphore(config.max_concurrent_large_requests)
        token_ids.prepare(config.token_id_inputs)

    # --- routes ----------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        return await self.answer(request, "/v1/embeddings", self._embeddings)

    async def models(self, request: Request) -> Response:
        async def body(request: Request, timings: RequestTimings) -> Response:
            self._authenticate(request)
            return _json(render_models(self.config.model_id, self.created))

        return await self.answer(request, "/v1/models", body)

    async def health(self, request: Request) -> Response:
        async def body(request: Request, timings: RequestTimings) -> Response:
            try:
                await asyncio.wait_for(self.encoder.health.remote(), timeout=5)
            except Exception as exc:  # no replica ready yet, or all busy starting
                return _json(orjson.dumps({"status": "starting", "detail": type(exc).__name__}), 503)
            return _json(b'{"status":"ok"}')

        return await self.answer(request, "/health", body, record=False)

    async def unknown_route(self, request: Request, exc: HTTPException) -> Response:
        """FastAPI's own 404 and 405, in OpenAI's shape (what OpenAI answers for an unknown URL)."""

        async def body(request: Request, timings: RequestTimings) -> Response:
            where = f"{request.method} {request.url.path}"
            if exc.status_code == 405:
                raise MethodNotAllowedError(f"method not allowed: {where}")
            raise RouteNotFoundError(f"Invalid URL ({where})")

        return await self.answer(request, "unknown", body)

    # --- one place for ids, errors, logs and metrics ----------------------------------

    async def answer(
        self,
        request: Request,
        route: str,
        handler: Callable[[Request, RequestTimings], Awaitable[Response]],
        record: bool = True,
    ) -> Response:
        # Serve's proxy puts its request id (the client's x-request-id, or a new one) on the
        # request and on the answer; logs use the same id. An unusable one is bounded by the
        # proxy's fences where they run, else replaced here (in logs only: the proxy echoes it).
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        replaced = not request_id_is_usable(request_id)
        if replaced:
            request_id = uuid.uuid4().hex
        started = time.perf_counter()
        timings = RequestTimings()
        try:
            self._check_headers(request)
            response = await handler(request, timings)
        except asyncio.CancelledError:
            # The client went away (Serve cancels the call): not an error of ours.
            self._finish(request_id, route, 499, time.perf_counter() - started, timings, record)
            raise
        except Exception as exc:
            if status_of(exc) == 500:
                log.exception("request %s failed", request_id)
            response = error_response(exc, request_id)
        total_s = time.perf_counter() - started
        if response.status_code == 200:
            response.headers.update(timings.headers(total_s))
        if replaced:
            response.headers[REPLACED_HEADER] = replaced_note(request_id)
        self._finish(request_id, route, response.status_code, total_s, timings, record)
        return response

    def _finish(
        self, request_id: str, route: str, status: int, total_s: float, timings: RequestTimings, record: bool
    ) -> None:
        if not record:
            return
        self.metrics.record(route, status, total_s)
        # One structured line per request; never the texts.
        log.info(
            "request "
            + orjson.dumps(
                {
                    "request_id": request_id,
                    "route": route,
                    "status": status,
                    "inputs": timings.inputs,
                    "tokens": timings.tokens,
                    "total_ms": round(total_s * 1e3, 2),
                    "tokenization_ms": _round_ms(timings.tokenization_s),
                    "queue_ms": _round_ms(timings.queue_s),
                    "inference_ms": _round_ms(timings.inference_s),
                }
            ).decode()
        )

    # --- /v1/embeddings ---------------------------------------------------------------

    async def _embeddings(self, request: Request, timings: RequestTimings) -> Response:
        self._authenticate(request)
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
        # A large request waits for its turn before its body is read (or, sent without a length,
        # once it is): the bodies, parsed JSON and tokenisations in memory at once are bounded, and
        # CPU is left for small requests. Parsing and tokenising run off the event loop.
        declared_large = declared.isdigit() and int(declared) > LARGE_BODY_BYTES
        async with self._turn(declared_large):
            body = await self._read_body(request)
            t0 = time.perf_counter()
            async with self._turn(not declared_large and len(body) > LARGE_BODY_BYTES):
                tokenized = await asyncio.to_thread(self._validate_and_tokenize, body)
            del body
        timings.tokenization_s = time.perf_counter() - t0
        timings.inputs, timings.tokens = len(tokenized.token_ids), tokenized.n_tokens
        embedded = await embed_on_replicas(
            self.encoder,
            tokenized.token_ids,
            tokenized.priority,
            self.config.max_chunk_tokens,
            self.config.request_timeout_s,
            self.native_dimensions,
        )
        timings.queue_s, timings.inference_s = embedded.queue_s, embedded.inference_s
        self.metrics.record_embedding(
            len(tokenized.token_ids), tokenized.n_tokens, timings.tokenization_s, embedded.queue_s, embedded.inference_s
        )
        t1 = time.perf_counter()
        vectors = truncate_dimensions(embedded.vectors, tokenized.dimensions)
        answer = render_embeddings(vectors, tokenized.encoding_format, self.config.model_id, tokenized.n_tokens)
        timings.render_s = time.perf_counter() - t1
        return _json(answer)

    def _turn(self, large: bool) -> contextlib.AbstractAsyncContextManager:
        """The large requests' turn, or nothing to wait for (small requests do not take turns)."""
        return self.large_requests if large else contextlib.nullcontext()

    def _validate_and_tokenize(self, body: bytearray) -> TokenizedRequest:
        """Parse, validate, tokenise: CPU work, run in a thread."""
        req = parse_request(body, self.config, self.tokenizer.max_input_tokens)
        return validate_and_tokenize(req, self.config, self.tokenizer, self.native_dimensions)

    # --- checks -----------------------------------------------------------------------

    def _check_headers(self, request: Request) -> None:
        size = sum(len(name) + len(value) for name, value in request.scope["headers"])
        if size > self.config.max_header_bytes:
            raise HeadersTooLargeError(
                f"request headers are {size} bytes, more than the limit of {self.config.max_header_bytes} bytes"
            )

    def _authenticate(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k) for k in self.api_keys):
            raise AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'")

    async def _read_body(self, request: Request) -> bytearray:
        try:
            return await asyncio.wait_for(self._receive_body(request), self.config.body_read_timeout_s)
        except asyncio.TimeoutError:
            raise BodyReadTimeoutError(
                f"request body not received within {self.config.body_read_timeout_s:g}s"
            ) from None
        except (ClientDisconnect, TaskCancelledError):
            # Starlette's disconnect, or (through Serve's proxy) the proxy cancelling the call that
            # streams the body to us once its client has gone.
            raise ClientDisconnectedError("the client closed the connection while sending its body") from None

    async def _receive_body(self, request: Request) -> bytearray:
        limit = self.config.max_body_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
        return body  # not copied to bytes: orjson reads a bytearray, and a 32 MiB copy is 32 MiB more


def build_http_app(service: EmbeddingsService) -> FastAPI:
    """The ingress's ASGI app: the OpenAI routes, and OpenAI-shaped answers for everything else.

    No OpenAPI schema or docs routes: they would answer without a key.
    """
    app = FastAPI(title="KaLM embeddings", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route("/v1/embeddings", service.embeddings, methods=["POST"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_exception_handler(HTTPException, service.unknown_route)  # type: ignore[arg-type]

    async def invalid(request: Request, exc: Exception) -> Response:  # routes take no typed parameters
        return error_response(InvalidRequestError(str(exc)), "")

    app.add_exception_handler(RequestValidationError, invalid)
    return app


@serve.deployment(name="EmbeddingsIngress", max_ongoing_requests=1024)
@serve.ingress()
class EmbeddingsIngress:
    """The Ray Serve shell: builds the service from the app's config and serves its routes."""

    def __init__(self, encoder: Any, config: dict):
        route_core_logs_to_serve()
        cfg = ServiceConfig(**config)
        files = read_model_files(cfg.model)
        tokenizer = TextTokenizer(files, cfg.max_input_tokens)
        self.service = EmbeddingsService(
            encoder, cfg, tokenizer, files.hidden_size, environment.api_keys(), IngressMetrics()
        )
        log.info(
            "ingress ready: model_id=%s max_input_tokens=%d api_keys=%s",
            cfg.model_id,
            tokenizer.max_input_tokens,
            "on" if self.service.api_keys else "off",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)
