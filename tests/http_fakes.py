"""The ingress in-process: its ASGI app over a fake encoder handle, no Ray, no model.

``FakeEncoder`` answers like the encoder deployment's handle (``embed.remote(...)`` returns an
awaitable with ``cancel()``) with deterministic vectors, and can be made slow, failing or
overloaded; ``RecordingMetrics`` keeps what the ingress reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from serve_app.batching.scheduler import EmbedResult
from serve_app.config import ServiceConfig
from serve_app.core.tokenization import TextTokenizer
from serve_app.errors import OverloadedError
from serve_app.serve.ingress import EmbeddingsService, build_http_app
from serve_app.serve.models import ServedModel, ServedModels

DIMENSIONS = 64  # the tiny stand-in's


def fake_vector(ids: list[int]) -> np.ndarray:
    """What the fake encoder returns for one input: unit length, a function of its ids only."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(ids, np.int64).tobytes()))
    v = rng.standard_normal(DIMENSIONS).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeResponse:
    def __init__(self, encoder: FakeEncoder, token_ids: list[list[int]]):
        self.encoder, self.token_ids, self.cancelled = encoder, token_ids, False

    def cancel(self) -> None:
        self.cancelled = True
        self.encoder.cancelled.append(self)

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> EmbedResult | OverloadedError:
        enc = self.encoder
        enc.calls.append(self)
        revision = enc.revision_of_call(len(enc.calls))
        if enc.failure is not None and enc.fail_on_call in (None, len(enc.calls)):
            if isinstance(enc.failure, OverloadedError):
                return enc.failure  # at once, as a replica with a full queue answers
            raise enc.failure
        await asyncio.sleep(enc.delay_s)
        vectors = np.stack([fake_vector(ids) for ids in self.token_ids])
        return EmbedResult(vectors, 0.0, enc.delay_s, 1, revision=revision)


@dataclass
class _Method:
    call: object

    def remote(self, *args):
        return self.call(*args)


@dataclass
class FakeEncoder:
    delay_s: float = 0.0
    # Given by every call, or only by call number ``fail_on_call``: an overload is returned, as
    # replicas do, anything else raised.
    failure: BaseException | None = None
    fail_on_call: int | None = None
    healthy: bool = True
    # The model version that answers call number n (a redeploy rolling through answers with two).
    revision_of_call: Callable[[int], str] = lambda n: "v1"
    calls: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)

    def __post_init__(self):
        self.embed = _Method(lambda token_ids, priority="bulk": FakeResponse(self, token_ids))
        self.health = _Method(self._health)

    async def _health(self) -> dict:
        if not self.healthy:
            raise RuntimeError("no replica yet")
        return {"device": "cpu"}


class _Ready:
    """An encoder handle's answer that is already there."""

    def __init__(self, result: EmbedResult):
        self.result = result

    def cancel(self) -> None:
        pass

    def __await__(self):
        yield from ()
        return self.result


class InProcessEncoder:
    """A real ``Encoder`` behind the encoder handle's interface: the ingress over the model's vectors, no Ray."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.embed = _Method(lambda token_ids, priority="bulk": _Ready(self._embed(token_ids)))
        self.health = _Method(lambda: _Ready({"device": "cpu"}))  # type: ignore[arg-type]

    def _embed(self, token_ids: list[list[int]]) -> EmbedResult:
        return EmbedResult(self.encoder.embed_token_ids(token_ids), 0.0, 0.0, 1)


class RecordingMetrics:
    def __init__(self):
        self.requests: list[tuple[str, int]] = []
        self.models: list[str] = []  # each request's model label

    def record(self, route: str, status: int, seconds: float, model: str) -> None:
        self.requests.append((route, status))
        self.models.append(model)

    def record_embedding(self, *args) -> None:
        pass


def make_service(
    model_dir,
    encoder: FakeEncoder | InProcessEncoder | None = None,
    api_keys=(),
    tokenizers: dict | None = None,
    encoders: list[FakeEncoder] | None = None,
    **config,
) -> EmbeddingsService:
    """The ingress over fake encoders: one model in ``model_dir``, or with ``models=[...]`` in the
    config, one fake encoder per model (``encoders``, else new ones)."""
    cfg = ServiceConfig(model=str(model_dir), **config)
    served = cfg.served_models()
    encoders = encoders or ([encoder or FakeEncoder()] if len(served) == 1 else [FakeEncoder() for _ in served])
    cache = tokenizers if tokenizers is not None else {}
    models = []
    for model, model_encoder in zip(served, encoders, strict=True):
        key = (model.model, model.max_input_tokens)
        if key not in cache:
            cache[key] = TextTokenizer.from_dir(model.model, model.max_input_tokens)
        models.append(ServedModel(model, cache[key], DIMENSIONS, model_encoder))
    return EmbeddingsService(ServedModels(models), cfg, list(api_keys), RecordingMetrics())


@contextlib.asynccontextmanager
async def client_for(service: EmbeddingsService):
    transport = httpx.ASGITransport(app=build_http_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=60) as client:
        yield client


async def call_asgi(service: EmbeddingsService, method: str, path: str, headers: dict, receive) -> dict:
    """Run one request through the app with a hand-written ``receive`` (slow or vanishing clients)."""
    app = build_http_app(service)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("ingress", 80),
    }
    sent: dict = {"status": None, "headers": {}, "body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return sent
