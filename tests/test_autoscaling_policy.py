"""The encoder's autoscaling policy (serve_app.serve.autoscaling) on its own: its arithmetic, how it
reads Serve's autoscaling context, and its cap on a one-node cluster. No cluster: the context is
built here as Serve's controller hands it over; tests/test_scale_out.py runs the policy on one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig

from serve_app.serve.autoscaling import TokenBacklogPolicy, replicas_that_fit

pytestmark = pytest.mark.unit


def serve_context(current_replicas: int, requests: float, metrics: dict) -> SimpleNamespace:
    """What Serve's controller passes a custom policy for KalmEncoder: counts, its config (at most 8
    replicas, 128 ongoing calls each) and the replicas' custom metrics, by metric then replica."""
    return SimpleNamespace(
        deployment_name="KalmEncoder",
        current_num_replicas=current_replicas,
        target_num_replicas=current_replicas,
        total_num_requests=requests,
        total_queued_requests=0.0,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        config=AutoscalingConfig(target_ongoing_requests=128, max_replicas=8),
        aggregated_metrics=metrics,
    )


def test_policy_scales_on_tokens_for_long_work_and_on_calls_for_tiny_work():
    policy = TokenBacklogPolicy(target_batches_per_replica=4)
    # 8 long chunks holding 40 forward passes of work: 10 replicas by tokens, but no more than 8 chunks
    assert policy.desired_replicas(requests=8, queued=0, backlog=40, target_ongoing_requests=128)[0] == 8
    # 8 long chunks with 8 passes of work: 2 replicas
    assert policy.desired_replicas(requests=8, queued=0, backlog=8, target_ongoing_requests=128)[0] == 2
    # 300 tiny queries: a fraction of one pass, but 300 calls > 2 x 128 concurrency slots
    desired, state = policy.desired_replicas(requests=300, queued=0, backlog=0.5, target_ongoing_requests=128)
    assert desired == pytest.approx(300 / 128) and state["by_tokens"] < 1
    # calls waiting in the ingress count with the mean backlog of the running ones
    desired, state = policy.desired_replicas(requests=12, queued=4, backlog=16, target_ongoing_requests=128)
    assert state["backlog_batches"] == pytest.approx(24) and desired == pytest.approx(6)
    assert policy.desired_replicas(requests=0, queued=0, backlog=0, target_ongoing_requests=128)[0] == 0
    with pytest.raises(ValueError):
        TokenBacklogPolicy(target_batches_per_replica=0)


def test_policy_reads_serves_autoscaling_context():
    ctx = serve_context(2, requests=10.0, metrics={"backlog_batches": {"replica-a": 14.0, "replica-b": 10.0}})
    desired, state = TokenBacklogPolicy(target_batches_per_replica=4)(ctx)
    assert desired == pytest.approx(6) and state["backlog_batches"] == 24
    ctx.aggregated_metrics = {}  # no replica has reported yet: Serve's own signal alone
    assert TokenBacklogPolicy()(ctx)[0] == pytest.approx(10 / 128)


def test_replicas_that_fit_one_node():
    assert replicas_that_fit([{"CPU": 2.0}], {"CPU": 2.0, "GPU": 0.0}) == 1  # a 2-core laptop
    assert replicas_that_fit([{"CPU": 16.0}], {"CPU": 8.0}) == 2
    assert replicas_that_fit([{"CPU": 8.0, "GPU": 2.0}], {"CPU": 1.0, "GPU": 1.0}) == 2
    assert replicas_that_fit([{"CPU": 1.0}], {"CPU": 4.0}) == 1  # below one: min_replicas decides
    assert replicas_that_fit([{"CPU": 2.0}, {"CPU": 2.0}], {"CPU": 2.0}) is None  # nodes may be added


def test_policy_on_one_node_asks_for_no_more_replicas_than_fit_and_says_so_once(monkeypatch):
    said: list[str] = []
    # the module the policy's code really runs in (an earlier test may have imported a second copy)
    monkeypatch.setitem(
        TokenBacklogPolicy.__call__.__globals__, "log", SimpleNamespace(info=lambda msg, *args: said.append(msg % args))
    )
    # 8 long chunks, 40 passes of work: 8 replicas wanted; each replica holds 2 CPUs
    ctx = serve_context(
        1,
        requests=8.0,
        metrics={"backlog_batches": {"a": 40.0}, "replica_cpus": {"a": 2.0}, "replica_gpus": {"a": 0.0}},
    )
    policy = TokenBacklogPolicy(target_batches_per_replica=4)
    policy._cluster_nodes = lambda: [{"CPU": 2.0, "memory": 8e9}]  # one machine with 2 cores
    assert [policy(ctx)[0] for _ in range(3)] == [1, 1, 1]
    capped = [line for line in said if "holds at most 1" in line]
    assert len(capped) == 1 and "2 CPU, 0 GPU" in capped[0], said
    policy._cluster_nodes = lambda: [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]  # several nodes: no cap
    assert policy(ctx)[0] == 8
