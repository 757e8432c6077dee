"""The encoder replica: a thin Ray Serve shell around Encoder + TokenBudgetBatcher.

One replica = one model on one device (a GPU, or the CPUs it reserved). It receives
token ids (tokenisation is done in the ingress) and returns native-size vectors. Each served
model is its own deployment of this class (``ServiceConfig.encoder_deployment``). With
``engine: null`` it loads no model and answers at once (``batching.null_engine``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import torch
from ray import serve

from ..batching.null_engine import NullEngine
from ..batching.scheduler import EmbedResult, TokenBudgetBatcher
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from ..core.device import resolve_device, use_cpu_threads
from ..core.encoder import Encoder
from ..errors import OverloadedError
from ..placement import assigned_resources, reserved_cpus
from .autoscaling import BACKLOG_METRIC, REPLICA_RESOURCE_METRICS
from .logs import route_core_logs_to_serve
from .metrics import ReplicaMetrics

log = logging.getLogger("ray.serve")


# The deployment keeps its published name: users' Serve YAML, dashboards and logs refer to "KalmEncoder".
@serve.deployment(name="KalmEncoder", max_ongoing_requests=256, health_check_period_s=10)
class EncoderReplica:
    """One encoder replica: loads the model, batches the chunks sent to it, reports its backlog."""

    def __init__(self, config: dict):
        started = time.perf_counter()
        route_core_logs_to_serve()
        self.config = cfg = ServiceConfig(**config)
        self.revision = cfg.vector_revision
        self.metrics = ReplicaMetrics(cfg.model_id)
        self.batcher: TokenBudgetBatcher | NullEngine
        if cfg.engine == "null":
            self.batcher = NullEngine(read_model_files(cfg.model).hidden_size)
            self.description = {"model": cfg.model_id, "engine": "null", "dimensions": self.batcher.dimensions}
            self.max_batch_tokens = 16384  # the autoscaling backlog's unit; a null replica never holds a backlog
            log.warning("encoder replica runs the NULL engine: no model, every vector the same (benchmarks only)")
        else:
            encoder = self._load_encoder(cfg)
            self.batcher = TokenBudgetBatcher.for_encoder(encoder, cfg, on_batch=self._on_batch, on_drop=self._on_drop)
            self.description = {
                "model": cfg.model_id,
                "device": str(encoder.device),
                "dtype": str(encoder.dtype),
                "max_batch_tokens": encoder.max_batch_tokens,
            }
            self.max_batch_tokens = encoder.max_batch_tokens
        self.calls = 0  # embed calls received (one per chunk of a request)
        self.in_flight = 0  # embed calls inside this replica now (what Serve counts as its ongoing requests)
        self.in_flight_tokens = 0  # their tokens: what the autoscaling policy scales on
        resources = assigned_resources()
        # What this replica holds, for the policy's one-node cap.
        self.resource_stats = {name: resources.get(r, 0.0) for name, r in REPLICA_RESOURCE_METRICS.items()}
        log.info("encoder replica ready in %.1fs", time.perf_counter() - started)

    @staticmethod
    def _load_encoder(cfg: ServiceConfig) -> Encoder:
        device = resolve_device(cfg.device)
        if device.type == "cpu":
            use_cpu_threads(reserved_cpus())
        log.info(
            "encoder replica starting: model_id=%s model=%s device=%s torch_threads=%d OMP_NUM_THREADS=%s",
            cfg.model_id,
            cfg.model,
            device,
            torch.get_num_threads(),
            os.environ.get("OMP_NUM_THREADS"),
        )
        encoder = Encoder.from_pretrained(
            cfg.model,
            device=device,
            dtype=cfg.dtype,
            max_input_tokens=cfg.max_input_tokens,
            max_batch_tokens=cfg.max_batch_tokens,
            trust_remote_code=cfg.trust_remote_code,
        )
        encoder.warm_up()
        return encoder

    async def embed(self, token_ids: list[list[int]], priority: str = "bulk") -> EmbedResult | OverloadedError:
        """The chunk's vectors; or, when this replica's queue is full, the ``OverloadedError`` itself.

        A full queue is returned, not raised: Serve logs every raised exception as a failed request with
        its traceback, and under overload that would flood the log with one per 503.
        """
        if not self.config.priority_scheduling:
            priority = "bulk"  # one lane: first come, first served
        n_tokens = sum(len(ids) for ids in token_ids)
        self.calls += 1
        self.in_flight += 1
        self.in_flight_tokens += n_tokens
        try:
            return replace(await self.batcher.embed(token_ids, priority), revision=self.revision)
        except OverloadedError as exc:
            return exc
        finally:
            self.in_flight -= 1
            self.in_flight_tokens -= n_tokens

    def _on_batch(self, stats) -> None:
        self.metrics.record_batch(stats)
        self.metrics.record_queued(self.batcher.queued_tokens)

    def _on_drop(self, inputs: int) -> None:
        self.metrics.record_dropped(inputs, self.batcher.queued_tokens)

    def health(self) -> dict:
        return self.description

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve samples this for the autoscaling policy (serve_app.serve.autoscaling): work held, in forward
        passes, and the resources this replica holds."""
        return {BACKLOG_METRIC: self.in_flight_tokens / self.max_batch_tokens, **self.resource_stats}

    def stats(self) -> dict:
        """Scheduler counters since start (benchmarks read these), and which replica answered."""
        import ray

        s = self.batcher.stats
        return {
            "batches": s.batches,
            "rows": s.rows,
            "tokens": s.tokens,
            "padded_tokens": s.padded_tokens,
            "busy_s": s.busy_s,
            "longest_queue_s": s.longest_queue_s,
            "queued_tokens": self.batcher.queued_tokens,
            "dropped_inputs": s.dropped_inputs,
            "torch_threads": torch.get_num_threads(),
            "calls": self.calls,
            "in_flight": self.in_flight,
            "in_flight_tokens": self.in_flight_tokens,
            "model": self.config.model_id,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
