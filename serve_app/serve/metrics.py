"""Prometheus metrics, exported the Ray way (``ray.serve.metrics``) from every node.

Ray prefixes every name with ``ray_``; docs/operations.md lists each series. Every series carries
the served model's id as its ``model`` label (``-`` for requests that named no served model), so a
dashboard shows each model's load and latency.
"""

from __future__ import annotations

from ray.serve import metrics

from ..batching.planning import BatchStats

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
ROW_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
TOKEN_BUCKETS: list[float] = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
FRACTION_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0]

#: The ``model`` label of a request that named no served model (or failed before naming one).
NO_MODEL = "-"

#: Failure reasons, by HTTP status.
FAILURE_REASONS = {
    400: "validation",
    401: "auth",
    404: "validation",
    405: "validation",
    408: "client_timeout",
    413: "validation",
    431: "validation",
    499: "cancelled",  # the client went away: counted, but not as the service's failure
    429: "overload",
    503: "overload",
    504: "timeout",
    500: "internal",
}


class IngressMetrics:
    """Per-request series, recorded by the HTTP ingress."""

    def __init__(self):
        self.requests = metrics.Counter(
            "kalm_requests", "HTTP requests by route, model and status code.", tag_keys=("route", "model", "status")
        )
        self.failures = metrics.Counter(
            "kalm_request_failures",
            "Failed requests by reason (validation, auth, overload, timeout, client_timeout, cancelled, internal).",
            tag_keys=("reason", "model"),
        )
        model = ("model",)
        self.inputs = metrics.Counter("kalm_embedded_inputs", "Inputs embedded.", tag_keys=model)
        self.tokens = metrics.Counter(
            "kalm_embedded_tokens", "Tokens embedded (prompt and special tokens included).", tag_keys=model
        )
        self.tokenization_s = metrics.Histogram(
            "kalm_tokenization_seconds",
            "Validation and tokenisation time.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=model,
        )
        self.queue_s = metrics.Histogram(
            "kalm_queue_seconds",
            "Time from reaching a replica to the first batch.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=model,
        )
        self.inference_s = metrics.Histogram(
            "kalm_inference_seconds",
            "Time from first batch start to last batch end.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=model,
        )
        self.total_s = metrics.Histogram(
            "kalm_request_seconds",
            "Whole request time in the ingress.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route", "model"),
        )

    def record(self, route: str, status: int, seconds: float, model: str = NO_MODEL) -> None:
        self.requests.inc(tags={"route": route, "model": model, "status": str(status)})
        self.total_s.observe(seconds, tags={"route": route, "model": model})
        if status >= 400:
            self.failures.inc(tags={"reason": FAILURE_REASONS.get(status, "internal"), "model": model})

    def record_embedding(
        self, model: str, inputs: int, tokens: int, tokenization_s: float, queue_s: float, inference_s: float
    ) -> None:
        tags = {"model": model}
        self.inputs.inc(inputs, tags=tags)
        self.tokens.inc(tokens, tags=tags)
        self.tokenization_s.observe(tokenization_s, tags=tags)
        self.queue_s.observe(queue_s, tags=tags)
        self.inference_s.observe(inference_s, tags=tags)


class ReplicaMetrics:
    """Per-batch series, recorded by each encoder replica.

    Ray exports a histogram's ``_sum`` from bucket midpoints (an approximation), so exact
    means (rows and tokens per batch, padding share) come from the counters. Every series carries
    the replica's model as its ``model`` label.
    """

    def __init__(self, model: str):
        tags = ("model",)
        self.batches = metrics.Counter("kalm_batches", "Forward passes run.", tag_keys=tags)
        self.batch_inputs = metrics.Counter("kalm_batch_inputs", "Inputs run in forward passes.", tag_keys=tags)
        self.computed_tokens = metrics.Counter(
            "kalm_computed_tokens", "Tokens computed in forward passes, padding included.", tag_keys=tags
        )
        # text tokens rather than padding tokens: Ray counters refuse an increment of 0, and packed
        # (CPU) batches have no padding, so a padding counter would never appear there
        self.text_tokens = metrics.Counter(
            "kalm_batch_text_tokens",
            "Text tokens computed in forward passes (computed minus these = padding).",
            tag_keys=tags,
        )
        self.batch_rows = metrics.Histogram(
            "kalm_batch_rows", "Inputs per forward pass.", boundaries=ROW_BUCKETS, tag_keys=tags
        )
        self.batch_tokens = metrics.Histogram(
            "kalm_batch_tokens",
            "Tokens computed per forward pass, padding included.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=tags,
        )
        self.padding = metrics.Histogram(
            "kalm_batch_padding_fraction",
            "Share of computed tokens that are padding.",
            boundaries=FRACTION_BUCKETS,
            tag_keys=tags,
        )
        self.batch_s = metrics.Histogram(
            "kalm_batch_seconds", "Forward pass time.", boundaries=LATENCY_BUCKETS_S, tag_keys=tags
        )
        self.queued_tokens = metrics.Gauge(
            "kalm_replica_queued_tokens", "Tokens waiting in this replica's queue.", tag_keys=tags
        )
        self.dropped_inputs = metrics.Counter(
            "kalm_dropped_inputs",
            "Queued inputs dropped uncomputed because their request was cancelled or failed.",
            tag_keys=tags,
        )
        for series in vars(self).values():
            series.set_default_tags({"model": model})

    def record_batch(self, stats: BatchStats) -> None:
        self.batches.inc()
        self.batch_inputs.inc(stats.rows)
        self.computed_tokens.inc(stats.padded_tokens)
        self.text_tokens.inc(stats.tokens)
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        self.padding.observe(1 - stats.tokens / stats.padded_tokens if stats.padded_tokens else 0.0)
        self.batch_s.observe(stats.seconds)

    def record_queued(self, tokens: int) -> None:
        self.queued_tokens.set(tokens)

    def record_dropped(self, inputs: int, queued_tokens: int) -> None:
        self.dropped_inputs.inc(inputs)
        self.queued_tokens.set(queued_tokens)
