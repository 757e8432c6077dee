"""The HTTP ingress: OpenAI routes, auth, limits, tokenisation; model work goes to replicas.

Request flow: body (size-limited) → ``EmbeddingRequest`` → ``validate_request``
(model id, limits, tokenisation) → chunks sent to ``KalmEncoder`` replicas →
Matryoshka truncation → float or base64 answer.
"""

import asyncio
import hmac
import logging
import time
import uuid

import numpy as np
import orjson
from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response

from .. import environment
from ..api import token_ids
from ..api.http_errors import error_response, status_of
from ..api.protocol import EmbeddingRequest, PreparedRequest, render_embeddings, render_models, validate_request
from ..batching.planning import plan_batches
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from ..core.tokenization import TextTokenizer
from ..core.vectors import truncate_dimensions
from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from .logs import route_core_logs_to_serve
from .metrics import IngressMetrics

log = logging.getLogger("ray.serve")

app = FastAPI(title="KaLM embeddings", docs_url=None, redoc_url=None)

#: Replica failures that are safe to retry elsewhere: embedding is idempotent. A replica
#: process that dies mid-call, or the node under it, gives ActorDiedError; an unreachable
#: one ActorUnavailableError (both RayActorError); a finished result that lived in the object
#: store of a node that is gone, ObjectLostError.
RETRYABLE = (ActorDiedError, ActorUnavailableError, RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError)
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.1  # before attempt 2; doubled for each further one (the request timeout bounds it all)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


@serve.deployment(name="EmbeddingsIngress", max_ongoing_requests=1024)
@serve.ingress(app)
class EmbeddingsIngress:
    def __init__(self, encoder: DeploymentHandle, config: dict):
        route_core_logs_to_serve()
        self.config = cfg = ServiceConfig(**config)
        files = read_model_files(cfg.model)
        self.tokenizer = TextTokenizer(files, cfg.max_input_tokens)
        self.native_dimensions = files.hidden_size
        token_ids.prepare(cfg.token_id_inputs)
        self.encoder = encoder
        self.api_keys = [k.encode() for k in environment.api_keys()]
        self.metrics = IngressMetrics()
        self.created = int(time.time())
        log.info(
            "ingress ready: model_id=%s max_input_tokens=%d api_keys=%s",
            cfg.model_id,
            self.tokenizer.max_input_tokens,
            "on" if self.api_keys else "off",
        )

    # --- routes ----------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._answer(request, "/v1/embeddings", self._embeddings)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def body(request: Request, timings: dict):
            self._authenticate(request)
            return Response(render_models(self.config.model_id, self.created), media_type="application/json")

        return await self._answer(request, "/v1/models", body)

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(self.encoder.health.remote(), timeout=5)
        except Exception as exc:  # no replica ready yet, or all busy starting
            return Response(
                orjson.dumps({"status": "starting", "detail": type(exc).__name__}), 503, media_type="application/json"
            )
        return Response(b'{"status":"ok"}', media_type="application/json")

    # --- one place for ids, errors, logs and metrics ----------------------------------

    async def _answer(self, request: Request, route: str, handler) -> Response:
        # Serve's proxy puts its request id (the client's x-request-id, or a new one) on the
        # request and on the answer; logs use the same id.
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        timings: dict = {}
        try:
            response = await handler(request, timings)
        except Exception as exc:
            if status_of(exc) == 500:
                log.exception("request %s failed", request_id)
            response = error_response(exc, request_id)
        total_s = time.perf_counter() - started
        if "inputs" in timings and response.status_code == 200:
            response.headers.update(
                {
                    "x-total-time": _ms(total_s),
                    "x-tokenization-time": _ms(timings["tokenization_s"]),
                    "x-queue-time": _ms(timings["queue_s"]),
                    "x-inference-time": _ms(timings["inference_s"]),
                    "x-compute-tokens": str(timings["tokens"]),
                }
            )
        self.metrics.record(route, response.status_code, total_s)
        # One structured line per request; never the texts.
        log.info(
            "request "
            + orjson.dumps(
                {
                    "request_id": request_id,
                    "route": route,
                    "status": response.status_code,
                    "inputs": timings.get("inputs"),
                    "tokens": timings.get("tokens"),
                    "total_ms": round(total_s * 1e3, 2),
                    "tokenization_ms": _round_ms(timings.get("tokenization_s")),
                    "queue_ms": _round_ms(timings.get("queue_s")),
                    "inference_ms": _round_ms(timings.get("inference_s")),
                }
            ).decode()
        )
        return response

    # --- /v1/embeddings ---------------------------------------------------------------

    async def _embeddings(self, request: Request, timings: dict) -> Response:
        self._authenticate(request)
        body = await self._read_body(request)
        t0 = time.perf_counter()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
        req = EmbeddingRequest.model_validate(parsed)
        # Tokenisation is CPU work: keep the event loop free for other requests meanwhile.
        prepared = await asyncio.to_thread(validate_request, req, self.config, self.tokenizer, self.native_dimensions)
        timings.update(
            tokenization_s=time.perf_counter() - t0, inputs=len(prepared.token_ids), tokens=prepared.n_tokens
        )
        vectors, queue_s, inference_s = await self._embed(prepared)
        timings.update(queue_s=queue_s, inference_s=inference_s)
        self.metrics.record_embedding(
            len(prepared.token_ids), prepared.n_tokens, timings["tokenization_s"], queue_s, inference_s
        )
        vectors = truncate_dimensions(vectors, prepared.dimensions)
        return Response(
            render_embeddings(vectors, prepared.encoding_format, self.config.model_id, prepared.n_tokens),
            media_type="application/json",
        )

    async def _embed(self, prepared: PreparedRequest) -> tuple[np.ndarray, float, float]:
        """Send the request in chunks (spread over replicas); reassemble in input order."""
        lengths = [len(ids) for ids in prepared.token_ids]
        chunks = plan_batches(lengths, self.config.max_chunk_tokens)
        calls = [self._embed_chunk([prepared.token_ids[i] for i in chunk], prepared.priority) for chunk in chunks]
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"request not answered within {self.config.request_timeout_s:.0f}s; retry, or send fewer tokens"
            ) from None
        vectors = np.empty((len(lengths), self.native_dimensions), np.float32)
        for chunk, result in zip(chunks, results):
            vectors[chunk] = result.vectors
        return vectors, max(r.queue_s for r in results), max(r.inference_s for r in results)

    async def _embed_chunk(self, token_ids: list[list[int]], priority: str):
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self.encoder.embed.remote(token_ids, priority)
            except BackPressureError:
                raise OverloadedError("all encoder replicas are at their queue limit; retry shortly") from None
            except RETRYABLE as exc:
                if attempt == MAX_ATTEMPTS:
                    raise
                log.warning("encoder replica lost (%s); retrying chunk, attempt %d", type(exc).__name__, attempt + 1)
                # Serve's router drops a dead replica at once; the pause covers an unreachable one.
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))

    # --- checks -----------------------------------------------------------------------

    def _authenticate(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k) for k in self.api_keys):
            raise AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)
