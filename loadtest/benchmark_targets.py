"""What the benchmark drives: the replica's path in-process, or any OpenAI-compatible URL.

Both count a request's tokens with the model's tokenizer, never from a server's ``usage``, so
every target is measured alike.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loadtest.benchmark_workload import Request
from serve_app.batching.scheduler import EmbedResult, TokenBudgetBatcher
from serve_app.config import ServiceConfig
from serve_app.core.tokenization import TextTokenizer


def count_tokens(tokenizer: TextTokenizer, req: Request) -> int:
    """The request's tokens as the model's tokenizer makes them (prompt and special tokens included)."""
    return sum(len(t.ids) for t in tokenizer.encode_texts(list(req.texts), tokenizer.prompt_for(req.instruction), True))


def batch_summary(batches: float, rows: float, tokens: float, padded: float) -> dict:
    if not batches:
        return {}
    return {
        "batches": int(batches),
        "mean_rows": round(rows / batches, 2),
        "mean_tokens": round(padded / batches, 1),
        "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0,
    }


class InProcess:
    """The replica's path without Ray or HTTP: tokenise, TokenBudgetBatcher, Encoder."""

    def __init__(self, encoder: Any, config: ServiceConfig):
        self.encoder = encoder
        self.interactive_max_tokens = config.interactive_max_tokens
        self.batcher = TokenBudgetBatcher.for_encoder(encoder, config)
        self.results: list[tuple[str, EmbedResult]] = []  # (request kind, result): where the time went

    async def call(self, req: Request, priority: str | None = None) -> int:
        tok = self.encoder.tokenizer
        ids = [
            t.ids
            for t in await asyncio.to_thread(tok.encode_texts, list(req.texts), tok.prompt_for(req.instruction), True)
        ]
        n = sum(map(len, ids))
        result = await self.batcher.embed(
            ids, priority or ("interactive" if n <= self.interactive_max_tokens else "bulk")
        )
        self.results.append((req.kind, result))
        return n

    def batch_stats_since(self, before: dict) -> dict:
        s = self.batcher.stats
        batches, rows = s.batches - before["batches"], s.rows - before["rows"]
        tokens, padded = s.tokens - before["tokens"], s.padded_tokens - before["padded_tokens"]
        return batch_summary(batches, rows, tokens, padded)

    def snapshot(self) -> dict:
        s = self.batcher.stats
        return {"batches": s.batches, "rows": s.rows, "tokens": s.tokens, "padded_tokens": s.padded_tokens}


class Served:
    """Any OpenAI-compatible /v1/embeddings endpoint.

    ``plain_openai``: only OpenAI's fields; a query's instruction goes into its text
    (``tokenizer.prompt_for``), which is how the service itself formats it. ``call``
    returns the request's tokens as ``tokenizer`` counts them, whatever the server says.
    """

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None,
        ray_address: str | None,
        tokenizer: TextTokenizer,
        plain_openai: bool = False,
        transport: Any = None,
    ):
        import httpx

        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            timeout=600,
            headers=headers,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            transport=transport,
        )
        self.model = model
        self.ray_address = ray_address
        self.tokenizer = tokenizer
        self.plain_openai = plain_openai

    async def resolve_model(self) -> str:
        if not self.model:
            resp = await self.client.get(self.url + "/v1/models")
            self.model = resp.json()["data"][0]["id"]
        return self.model

    async def call(self, req: Request, priority: str | None = None) -> int:
        body: dict = {"model": self.model, "input": list(req.texts), "encoding_format": "base64"}
        if self.plain_openai:
            body["input"] = [self.tokenizer.prompt_for(req.instruction) + text for text in req.texts]
        else:
            if req.instruction:
                body["instruction"] = req.instruction
            if priority:
                body["priority"] = priority
        resp = await self.client.post(self.url + "/v1/embeddings", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
        if len(resp.json()["data"]) != len(req.texts):
            raise RuntimeError(f"{len(req.texts)} inputs sent, {len(resp.json()['data'])} embeddings received")
        return count_tokens(self.tokenizer, req)

    async def batch_counters(self) -> dict | None:
        """Scheduler counters of the (first) encoder replica, when this process can reach the Ray cluster."""
        if not self.ray_address:
            return None
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=self.ray_address, namespace="serve", log_to_driver=False)
        return await serve.get_deployment_handle("KalmEncoder", app_name="kalm").stats.remote()

    @staticmethod
    def batch_stats_between(before: dict | None, after: dict | None) -> dict | None:
        if before is None or after is None:
            return None
        return batch_summary(*(after[k] - before[k] for k in ("batches", "rows", "tokens", "padded_tokens")))
