"""The HTTP ingress: OpenAI routes, auth, limits, tokenisation; model work goes to replicas.

Request flow: headers (size-bounded) → body (size- and time-bounded; large bodies take turns)
→ the route's ``prepare`` (parse, find the model the request names, validate, tokenise: an
``EncodingWork``) → chunks sent to that model's ``EncoderReplica`` replicas (``serve/dispatch.py``)
→ the route's answer from the vectors (embeddings, OpenAI's and Cohere's: Matryoshka truncation,
the types asked (``core/quantization.py``), float or base64; rerank and score: cosine
similarities, ``api/rerank.py``). Every route that embeds shares this path.

``EmbeddingsService`` does all of it given the served models (``serve/models.py``), each with any
encoder handle (``embed.remote(...)``, ``health.remote()``), and ``build_http_app`` puts it behind
FastAPI routes, so tests run the whole HTTP contract in-process with fake handles;
``EmbeddingsIngress`` is the Ray Serve shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from .. import environment
from ..api import cohere, rerank, token_ids
from ..api.api_keys import authenticate
from ..api.http_errors import error_response, status_of
from ..api.protocol import parse_request, validate_and_tokenize
from ..api.rendering import render_embeddings, render_models
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from ..core.quantization import quantize
from ..core.tokenization import TextTokenizer
from ..core.vectors import truncate_dimensions
from ..errors import (
    BodyReadTimeoutError,
    ClientDisconnectedError,
    HeadersTooLargeError,
    InvalidRequestError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RouteNotFoundError,
    UnsupportedContentEncodingError,
)
from . import memory
from .dispatch import embed_on_replicas
from .logs import route_core_logs_to_serve
from .metrics import NO_MODEL, IngressMetrics
from .models import ServedModel, ServedModels
from .proxy_fences import REPLACED_HEADER, replaced_note, request_id_is_usable

log = logging.getLogger("ray.serve")

#: An embeddings route's request, read and tokenised, and how to write its answer from the vectors

#: Bodies larger than this are "large": read, parsed and tokenised at most
#: ``max_concurrent_large_requests`` at a time per ingress (docs/limits.md).
LARGE_BODY_BYTES = 1024 * 1024


@dataclass
class RequestTimings:
    """What one embeddings request cost, filled in as it goes: for its headers, metrics and log line."""

    model: str = NO_MODEL  # the served model's id, once the request's ``model`` is found
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


@dataclass(frozen=True)
class EncodingWork:
    """A request of any route that embeds, parsed, validated and tokenised: what to embed on which
    model's replicas, and how to answer from the vectors (native size, input order)."""

    model: ServedModel
    token_ids: list[list[int]]
    n_tokens: int
    priority: str
    answer: Callable[[np.ndarray], bytes]


class EmbeddingsService:
    """The ingress's request handling, free of Ray Serve's deployment machinery."""

    def __init__(self, models: ServedModels, config: ServiceConfig, api_keys: list[str], metrics: IngressMetrics):
        self.models = models
        self.config = config  # the service's limits (each model's own: ``ServedModel.config``)
        self.api_keys = [k.encode() for k in api_keys]
        self.metrics = metrics
        self.created = int(time.time())
        self.large_requests = asyncio.Semaphore(config.max_concurrent_large_requests)
        token_ids.prepare(config.token_id_inputs)
        for model in models:  # int8/uint8 ranges read now: a missing file fails the deploy, not a request
            _ = model.calibration

    @property
    def tokenizer(self) -> TextTokenizer:
        """The first model's tokenizer (a single-model service's only one)."""
        return self.models.first.tokenizer

    @property
    def encoder(self) -> Any:
        """The first model's encoder handle (a single-model service's only one)."""
        return self.models.first.encoder

    # --- routes ----------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        return await self.answer(
            request, "/v1/embeddings", functools.partial(self._encode, prepare=self._validate_and_tokenize)
        )

    async def cohere_embed(self, request: Request) -> Response:
        return await self.answer(
            request, "/v2/embed", functools.partial(self._encode, prepare=self._validate_and_tokenize_cohere_embed)
        )

    async def rerank(self, request: Request) -> Response:
        return await self.answer(
            request, request.url.path, functools.partial(self._encode, prepare=self._validate_and_tokenize_rerank)
        )

    async def score(self, request: Request) -> Response:
        return await self.answer(
            request, "/v1/score", functools.partial(self._encode, prepare=self._validate_and_tokenize_score)
        )

    async def list_models(self, request: Request) -> Response:
        async def body(request: Request, timings: RequestTimings) -> Response:
            self._authenticate(request)
            return _json(render_models([model.id for model in self.models], self.created))

        return await self.answer(request, "/v1/models", body)

    async def health(self, request: Request) -> Response:
        """Ready when every model has a replica that answers."""

        async def body(request: Request, timings: RequestTimings) -> Response:
            try:
                checks = [model.encoder.health.remote() for model in self.models]
                await asyncio.wait_for(asyncio.gather(*checks), timeout=5)
            except Exception as exc:  # no replica ready yet, or all busy starting
                return _json(orjson.dumps({"status": "starting", "detail": type(exc).__name__}), 503)
            return _json(b'{"status":"ok"}')

        return await self.answer(request, "/health", body, record=False)

    async def unknown_route(self, request: Request, exc: HTTPException) -> Response:
        """FastAPI's own 404 and 405, in OpenAI's shape (what OpenAI answers for an unknown URL)."""

        async def body(request: Request, timings: RequestTimings) -> Response:
            self._authenticate(request)  # every route but /health needs the key, an unknown one too
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
        self.metrics.record(route, status, total_s, timings.model)
        # One structured line per request; never the texts.
        log.info(
            "request "
            + orjson.dumps(
                {
                    "request_id": request_id,
                    "route": route,
                    "model": timings.model,
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

    # --- every route that embeds: body, tokens, the model's replicas, answer ----------------

    async def _encode(
        self, request: Request, timings: RequestTimings, prepare: Callable[[bytearray], EncodingWork]
    ) -> Response:
        self._authenticate(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # a compressed body would escape the byte limit once inflated
            raise UnsupportedContentEncodingError(
                f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed"
            )
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
        # A large request waits for its turn before its body is read (sent without a length, once
        # the part received passes LARGE_BODY_BYTES, before more is read): the bodies, parsed JSON
        # and tokenisations in memory at once are bounded, whatever the client's upload pattern, and
        # CPU is left for small requests. Parsing and tokenising run off the event loop.
        declared_large = declared.isdigit() and int(declared) > LARGE_BODY_BYTES
        async with contextlib.AsyncExitStack() as turn:
            if declared_large:
                await turn.enter_async_context(self.large_requests)
            body = await self._read_body(request, None if declared_large else turn)
            large = len(body) > LARGE_BODY_BYTES
            t0 = time.perf_counter()
            work = await asyncio.to_thread(prepare, body)
            del body
        if large:  # its body, text and JSON are freed: their pages go back to the OS (serve/memory.py)
            await asyncio.to_thread(memory.trim)
        timings.tokenization_s = time.perf_counter() - t0
        timings.model, timings.inputs, timings.tokens = work.model.id, len(work.token_ids), work.n_tokens
        embedded = await embed_on_replicas(
            work.model.encoder,
            work.token_ids,
            work.priority,
            self.config.max_chunk_tokens,
            self.config.request_timeout_s,
            work.model.dimensions,
        )
        timings.queue_s, timings.inference_s = embedded.queue_s, embedded.inference_s
        self.metrics.record_embedding(
            work.model.id,
            len(work.token_ids),
            work.n_tokens,
            timings.tokenization_s,
            embedded.queue_s,
            embedded.inference_s,
        )
        t1 = time.perf_counter()
        answer = work.answer(embedded.vectors)
        timings.render_s = time.perf_counter() - t1
        return _json(answer)

    # --- each route's parsing, validation and tokenising: CPU work, run in a thread ----------

    def _validate_and_tokenize(self, body: bytearray) -> EncodingWork:
        req = parse_request(body, self.config, self.models.min_input_tokens)
        model = self.models.resolve(req.model)
        tokenized = validate_and_tokenize(req, model.config, model.tokenizer, model.dimensions, model.calibration)

        def answer(vectors: np.ndarray) -> bytes:
            vectors = quantize(
                truncate_dimensions(vectors, tokenized.dimensions), req.embedding_type, model.calibration
            )
            return render_embeddings(vectors, tokenized.encoding_format, model.id, tokenized.n_tokens)

        return EncodingWork(model, tokenized.token_ids, tokenized.n_tokens, tokenized.priority, answer)

    def _validate_and_tokenize_cohere_embed(self, body: bytearray) -> EncodingWork:
        req = cohere.parse_cohere_embed(body, self.config)
        model = self.models.resolve(req.model)
        tokenized = cohere.tokenize_cohere_embed(
            req, model.config, model.tokenizer, model.dimensions, model.calibration
        )

        def answer(vectors: np.ndarray) -> bytes:
            vectors = truncate_dimensions(vectors, tokenized.dimensions)
            typed = {t: quantize(vectors, t, model.calibration) for t in tokenized.embedding_types}
            return cohere.render_cohere_embed(typed, req.texts, tokenized.n_tokens)

        return EncodingWork(model, tokenized.token_ids, tokenized.n_tokens, tokenized.priority, answer)

    def _validate_and_tokenize_rerank(self, body: bytearray) -> EncodingWork:
        req = rerank.parse_rerank(body, self.config)
        model = self.models.resolve(req.model)
        tokenized = rerank.tokenize_pairs(rerank.rerank_pairs(req, model.config), model.config, model.tokenizer)

        def answer(vectors: np.ndarray) -> bytes:
            return rerank.render_rerank(req, tokenized, rerank.pair_scores(tokenized, vectors), model.id)

        return EncodingWork(model, tokenized.token_ids, tokenized.n_tokens, tokenized.pairs.priority, answer)

    def _validate_and_tokenize_score(self, body: bytearray) -> EncodingWork:
        req = rerank.parse_score(body, self.config)
        model = self.models.resolve(req.model)
        tokenized = rerank.tokenize_pairs(rerank.score_pairs(req, model.config), model.config, model.tokenizer)

        def answer(vectors: np.ndarray) -> bytes:
            return rerank.render_score(tokenized, rerank.pair_scores(tokenized, vectors), model.id, self.created)

        return EncodingWork(model, tokenized.token_ids, tokenized.n_tokens, tokenized.pairs.priority, answer)

    # --- checks -----------------------------------------------------------------------

    def _check_headers(self, request: Request) -> None:
        size = sum(len(name) + len(value) for name, value in request.scope["headers"])
        if size > self.config.max_header_bytes:
            raise HeadersTooLargeError(
                f"request headers are {size} bytes, more than the limit of {self.config.max_header_bytes} bytes"
            )

    def _authenticate(self, request: Request) -> None:
        authenticate(request.headers.get("authorization", ""), self.api_keys)

    async def _read_body(self, request: Request, turn: contextlib.AsyncExitStack | None) -> bytearray:
        """The body, within ``body_read_timeout_s``. With ``turn`` (no declared length), the request
        takes its large-request turn in ``turn`` once past LARGE_BODY_BYTES; that wait is not the
        client's and does not count."""
        limit = self.config.max_body_bytes
        body = bytearray()  # not copied to bytes later: orjson reads a bytearray, and a 32 MiB copy is 32 MiB more
        chunks = request.stream()

        async def read(up_to: int | None) -> bool:
            """Append chunks until the body ends (True) or passes ``up_to`` bytes (False)."""
            async for chunk in chunks:
                body.extend(chunk)
                if len(body) > limit:
                    raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
                if up_to is not None and len(body) > up_to:
                    return False
            return True

        # One deadline per phase (a task each), not one per chunk: before the turn, and after it.
        time_left = self.config.body_read_timeout_s
        try:
            started = time.monotonic()
            if await asyncio.wait_for(read(None if turn is None else LARGE_BODY_BYTES), time_left):
                return body
            time_left -= time.monotonic() - started
            assert turn is not None, "read stops early only to take the turn"
            await turn.enter_async_context(self.large_requests)
            await asyncio.wait_for(read(None), time_left)
            return body
        except asyncio.TimeoutError:
            raise BodyReadTimeoutError(
                f"request body not received within {self.config.body_read_timeout_s:g}s"
            ) from None
        except (ClientDisconnect, TaskCancelledError):
            # Starlette's disconnect, or (through Serve's proxy) the proxy cancelling the call that
            # streams the body to us once its client has gone.
            raise ClientDisconnectedError("the client closed the connection while sending its body") from None


def build_http_app(service: EmbeddingsService) -> FastAPI:
    """The ingress's ASGI app: the OpenAI routes, and OpenAI-shaped answers for everything else.

    No OpenAPI schema or docs routes: they would answer without a key.
    """
    app = FastAPI(title="KaLM embeddings", openapi_url=None, docs_url=None, redoc_url=None)
    for slash in ("", "/"):  # with a trailing slash served, not redirected: a redirected POST loses its body
        app.add_api_route(f"/v1/embeddings{slash}", service.embeddings, methods=["POST"])
        app.add_api_route(f"/v2/embed{slash}", service.cohere_embed, methods=["POST"])
        for path in ("/v1/rerank", "/v2/rerank"):  # Jina's and Cohere's v1, Cohere's v2
            app.add_api_route(f"{path}{slash}", service.rerank, methods=["POST"])
        app.add_api_route(f"/v1/score{slash}", service.score, methods=["POST"])
        app.add_api_route(f"/v1/models{slash}", service.list_models, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET", "HEAD"])
    app.add_exception_handler(HTTPException, service.unknown_route)  # type: ignore[arg-type]

    async def invalid(request: Request, exc: Exception) -> Response:  # routes take no typed parameters
        return error_response(InvalidRequestError(str(exc)), "")

    app.add_exception_handler(RequestValidationError, invalid)
    return app


@serve.deployment(name="EmbeddingsIngress", max_ongoing_requests=1024)
@serve.ingress()
class EmbeddingsIngress:
    """The Ray Serve shell: builds the service from the app's config and serves its routes."""

    def __init__(self, config: dict, models: list[tuple[Any, dict]]):
        """``models``: each served model's encoder deployment and single-model config, in config order."""
        route_core_logs_to_serve()
        memory.return_big_buffers()
        served = []
        for encoder, model_config in models:
            cfg = ServiceConfig(**model_config)
            files = read_model_files(cfg.model)
            served.append(ServedModel(cfg, TextTokenizer(files, cfg.max_input_tokens), files.hidden_size, encoder))
        self.service = EmbeddingsService(
            ServedModels(served), ServiceConfig(**config), environment.api_keys(), IngressMetrics()
        )
        for model in served:
            log.info(
                "ingress ready: model_id=%s deployment=%s max_input_tokens=%d api_keys=%s",
                model.id,
                model.config.encoder_deployment,
                model.tokenizer.max_input_tokens,
                "on" if self.service.api_keys else "off",
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)
