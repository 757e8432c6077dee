"""Autoscaling the encoder on the work it holds (tokens), not only on how many calls it holds.

Serve's default policy scales on ongoing requests per replica: here, chunk calls from the
ingress, queued or running. For batched work a call is anything from one 10-token query
to an 8,192-token chunk, so the same count means very different loads. Measured on one CPU
replica (tiny stand-in, ``max_batch_tokens`` 512; docs/scaling.md): 32 query clients
kept 7.2 calls in the replica, 70% busy, holding 0.1 forward passes of work (their latency
came from the HTTP side, which more encoder replicas don't help); 2 document clients kept
1.8 calls in it, 90% busy, holding 28 forward passes (p50 277 ms). Serve's default
(target 2) would add replicas for the first and none for the second.

So each replica reports its backlog in forward passes (``EncoderReplica.record_autoscaling_stats``:
tokens of the calls it holds / ``max_batch_tokens``), and the policy wants::

    by_tokens   = backlog / target_batches_per_replica, at most the calls in flight
                  (a chunk runs on one replica: more replicas than chunks can't help)
    by_requests = ongoing requests / target_ongoing_requests   (Serve's own signal: a replica
                  full of tiny queries runs out of concurrency slots before it runs out of compute)
    desired     = max(by_tokens, by_requests)

Calls still waiting in the ingress's queue (all replicas at ``max_ongoing_requests``) count with
the mean backlog of the running ones. Serve applies ``min_replicas``/``max_replicas``, the
up/down delays and factors around the returned number, as for its default policy.

On a one-node cluster (a laptop, one machine: nothing adds nodes) the policy never wants more
replicas than that node can ever hold, from its resources and what a replica takes (each replica
reports its own, :data:`REPLICA_RESOURCE_METRICS`), and says so once in the log. Asking for more
would leave replicas unplaceable for good, with Serve warning every 30 s that they have "taken
more than 30s to be scheduled". Clusters of several nodes are left uncapped: there, replicas that
find no room are what makes the Ray autoscaler add nodes.

Kept free of torch and the rest of the package: Serve pickles this module into its controller.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("ray.serve")

#: Name of the per-replica custom autoscaling metric (forward passes of work held by the replica).
BACKLOG_METRIC = "backlog_batches"
#: Per-replica metrics with the Ray resources a replica holds: metric name -> Ray resource.
REPLICA_RESOURCE_METRICS = {"replica_cpus": "CPU", "replica_gpus": "GPU"}
#: How long the policy reuses its view of the cluster's nodes (it runs several times a second).
NODES_REFRESH_S = 10.0


def encoder_autoscaling_config(initial_replicas: int = 1, max_replicas: int = 8) -> dict:
    """The encoder deployment's ``autoscaling_config`` (Serve's options), which ``serve.app.build_app``
    sets with replica counts from ``serve_app.placement``. An ``autoscaling_config`` under
    ``KalmEncoder`` in the Serve YAML replaces it whole."""
    return {
        "min_replicas": 1,  # always one warm replica (a laptop runs exactly this one)
        "initial_replicas": initial_replicas,  # at deploy time: every GPU of the cluster, or 1
        "max_replicas": max_replicas,  # the Ray autoscaler adds nodes to fit them
        "target_ongoing_requests": 128,  # per replica, queued + running calls (Serve's signal; here: concurrency slots)
        "upscale_delay_s": 30,  # demand must stay above the current count this long before adding replicas
        "downscale_delay_s": 300,  # ... and below it this long before removing replicas (GPU replicas are slow to start)
        "look_back_period_s": 30,  # metrics are averaged over this window (Serve's default)
        "policy": {  # scale on queued tokens as well as calls
            "policy_function": "serve_app.serve.autoscaling:TokenBacklogPolicy",
            "policy_kwargs": {"target_batches_per_replica": 4},  # tokens held per replica, in forward passes
        },
    }


class TokenBacklogPolicy:
    """Serve autoscaling policy for the encoder deployment (see the module docstring).

    Set by :func:`encoder_autoscaling_config`; in a Serve YAML that overrides it::

        autoscaling_config:
          target_ongoing_requests: 128
          policy:
            policy_function: serve_app.serve.autoscaling:TokenBacklogPolicy
            policy_kwargs: {target_batches_per_replica: 4}
    """

    def __init__(self, target_batches_per_replica: float = 4.0):
        if not target_batches_per_replica > 0:
            raise ValueError("target_batches_per_replica must be > 0")
        self.target_batches = float(target_batches_per_replica)
        self._last_logged: int | None = None
        self._capped_at: int | None = None  # the cap last logged
        self._nodes: tuple[float, list[dict[str, float]]] | None = None  # (read at, resources of each node)

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        if replicas == 0:  # nothing running reports anything; Serve's cold-start path handles 0 -> n
            return ctx.target_num_replicas, {}
        desired, state = self.desired_replicas(
            requests=float(ctx.total_num_requests or 0.0),
            queued=float(ctx.total_queued_requests or 0.0),
            backlog=float(sum((ctx.aggregated_metrics or {}).get(BACKLOG_METRIC, {}).values())),
            target_ongoing_requests=float(ctx.config.get_target_ongoing_requests()),
        )
        desired = self._cap_to_cluster(ctx.deployment_name, desired, ctx.aggregated_metrics or {})
        bounds = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        wanted = min(max(math.ceil(desired - 1e-9), bounds[0]), bounds[1])
        if wanted != self._last_logged and wanted != replicas:
            log.info(
                "autoscaling %s: %d replica(s) running, backlog %.1f batches, %.1f requests "
                "(%.1f queued) -> wants %.2f, i.e. %d within [%d, %d]",
                ctx.deployment_name,
                replicas,
                state["backlog_batches"],
                state["requests"],
                state["queued_requests"],
                desired,
                wanted,
                *bounds,
            )
        self._last_logged = wanted
        return desired, state

    def desired_replicas(
        self, requests: float, queued: float, backlog: float, target_ongoing_requests: float
    ) -> tuple[float, dict[str, float]]:
        """The number of replicas wanted (before Serve's bounds and delays); pure, for tests."""
        running = max(requests - queued, 0.0)
        if queued > 0 and running > 0:
            backlog += queued * backlog / running
        by_tokens = min(backlog / self.target_batches, requests)
        by_requests = requests / target_ongoing_requests
        desired = max(by_tokens, by_requests)
        return desired, {
            "backlog_batches": backlog,
            "requests": requests,
            "queued_requests": queued,
            "by_tokens": by_tokens,
            "by_requests": by_requests,
        }

    def _cap_to_cluster(self, deployment: str, desired: float, metrics: dict) -> float:
        per_replica = {
            resource: max(metrics[name].values())
            for name, resource in REPLICA_RESOURCE_METRICS.items()
            if metrics.get(name)
        }
        if not per_replica:  # no replica has reported yet
            return desired
        nodes = self._cluster_nodes()
        fit = replicas_that_fit(nodes, per_replica)
        if fit is None or desired <= fit:
            return desired
        if fit != self._capped_at:
            log.info(
                "autoscaling %s: wants %.2f replicas, but this one-node cluster (%s) holds at most %d "
                "(a replica takes %s); asking for %d. More replicas need more nodes or smaller replicas "
                "(encoder_num_cpus).",
                deployment,
                desired,
                _resources(nodes[0]),
                fit,
                _resources(per_replica),
                fit,
            )
            self._capped_at = fit
        return float(fit)

    def _cluster_nodes(self) -> list[dict[str, float]]:
        """Total resources of each live node (the policy runs in Serve's controller, a Ray actor)."""
        import time

        import ray

        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] > NODES_REFRESH_S:
            self._nodes = (now, [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")])
        return self._nodes[1]


def replicas_that_fit(nodes: list[dict[str, float]], per_replica: dict[str, float]) -> int | None:
    """How many replicas taking ``per_replica`` a one-node cluster can ever hold (at least 1: Serve's
    ``min_replicas`` decides below that); None for several nodes (an autoscaler may add more)."""
    wanted = {resource: amount for resource, amount in per_replica.items() if amount > 0}
    if len(nodes) != 1 or not wanted:
        return None
    return max(1, min(int(nodes[0].get(resource, 0.0) // amount) for resource, amount in wanted.items()))


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(r, 0):g} {r}" for r in REPLICA_RESOURCE_METRICS.values())
