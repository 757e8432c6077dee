"""Prometheus metrics, exported the Ray way (``ray.serve.metrics``) from every node.

Ray prefixes every name with ``ray_``; docs/operations.md lists each series.
"""

from __future__ import annotations

from ray.serve import metrics

from ..batching.planning import BatchStats

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
TOKEN_BUCKETS = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
FRACTION_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0]

#: Failure reasons, by HTTP status.
FAILURE_REASONS = {
    400: "validation",
    401: "auth",
    404: "validation",
    413: "validation",
    429: "overload",
    503: "overload",
    504: "timeout",
    500: "internal",
}


class IngressMetrics:
    """Per-request series, recorded by the HTTP ingress."""

    def __init__(self):
        self.requests = metrics.Counter(
            "kalm_requests", "HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        self.failures = metrics.Counter(
            "kalm_request_failures",
            "Failed requests by reason (validation, auth, overload, timeout, internal).",
            tag_keys=("reason",),
        )
        self.inputs = metrics.Counter("kalm_embedded_inputs", "Inputs embedded.")
        self.tokens = metrics.Counter("kalm_embedded_tokens", "Tokens embedded (prompt and special tokens included).")
        self.tokenization_s = metrics.Histogram(
            "kalm_tokenization_seconds", "Validation and tokenisation time.", boundaries=LATENCY_BUCKETS_S
        )
        self.queue_s = metrics.Histogram(
            "kalm_queue_seconds", "Time from reaching a replica to the first batch.", boundaries=LATENCY_BUCKETS_S
        )
        self.inference_s = metrics.Histogram(
            "kalm_inference_seconds", "Time from first batch start to last batch end.", boundaries=LATENCY_BUCKETS_S
        )
        self.total_s = metrics.Histogram(
            "kalm_request_seconds",
            "Whole request time in the ingress.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.total_s.observe(seconds, tags={"route": route})
        if status >= 400:
            self.failures.inc(tags={"reason": FAILURE_REASONS.get(status, "internal")})

    def record_embedding(
        self, inputs: int, tokens: int, tokenization_s: float, queue_s: float, inference_s: float
    ) -> None:
        self.inputs.inc(inputs)
        self.tokens.inc(tokens)
        self.tokenization_s.observe(tokenization_s)
        self.queue_s.observe(queue_s)
        self.inference_s.observe(inference_s)


class ReplicaMetrics:
    """Per-batch series, recorded by each encoder replica.

    Ray exports a histogram's ``_sum`` from bucket midpoints (an approximation), so exact
    means (rows and tokens per batch, padding share) come from the counters.
    """

    def __init__(self):
        self.batches = metrics.Counter("kalm_batches", "Forward passes run.")
        self.batch_inputs = metrics.Counter("kalm_batch_inputs", "Inputs run in forward passes.")
        self.computed_tokens = metrics.Counter(
            "kalm_computed_tokens", "Tokens computed in forward passes, padding included."
        )
        # text tokens rather than padding tokens: Ray counters refuse an increment of 0, and packed
        # (CPU) batches have no padding, so a padding counter would never appear there
        self.text_tokens = metrics.Counter(
            "kalm_batch_text_tokens", "Text tokens computed in forward passes (computed minus these = padding)."
        )
        self.batch_rows = metrics.Histogram("kalm_batch_rows", "Inputs per forward pass.", boundaries=ROW_BUCKETS)
        self.batch_tokens = metrics.Histogram(
            "kalm_batch_tokens", "Tokens computed per forward pass, padding included.", boundaries=TOKEN_BUCKETS
        )
        self.padding = metrics.Histogram(
            "kalm_batch_padding_fraction", "Share of computed tokens that are padding.", boundaries=FRACTION_BUCKETS
        )
        self.batch_s = metrics.Histogram("kalm_batch_seconds", "Forward pass time.", boundaries=LATENCY_BUCKETS_S)
        self.queued_tokens = metrics.Gauge("kalm_replica_queued_tokens", "Tokens waiting in this replica's queue.")

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
