"""Scale-out on a real multi-node Ray cluster on this machine.

A head and three workers (separate raylets), each worker declaring one GPU slot, so every
encoder replica takes a worker of its own (on this CPU-only machine it runs on the CPU
inside). The service is deployed exactly as on a real cluster: ``serve run`` of
cluster/config.yaml against the cluster's address, with test-sized limits and delays.

Clients talk to the head node's proxy (what a load balancer in front of the proxies would
do for them); the workers' proxies listen on another port of this machine
(RAY_SERVE_WORKER_PROXY_HTTP_PORT), since all "nodes" share one IP here.

The autoscaling policy's own arithmetic, without a cluster: tests/test_autoscaling_policy.py.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import re
import signal
import statistics
import time

import httpx
import numpy as np
import orjson
import pytest

from serve_app.serve.autoscaling import encoder_autoscaling_config
from tests.openai_errors import assert_openai_error
from tests.service_harness import (
    Load,
    encoder_stats,
    environ,
    free_port,
    local_cluster,
    ray_driver,
    replicas,
    serve_details,
    serve_on_cluster,
    wait_for,
)

pytestmark = pytest.mark.slow

WORKERS = 3
DOC = "lorem ipsum dolor sit amet " * 100  # ~500 tokens with the stand-in's tokenizer


# --- the cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """Head (1 CPU) + 3 workers (1 CPU + 1 GPU slot each); this process is a driver on it."""
    worker_port = free_port()
    # The nodes inherit this environment: the app reads KALM_MODEL where it is built.
    with environ(KALM_MODEL=str(tiny_model_dir), RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(worker_port)):
        workers = [{"num_cpus": 1, "num_gpus": 1, "metrics_export_port": free_port()} for _ in range(WORKERS)]
        with local_cluster(head_cpus=1, workers=workers) as c:
            c.worker_proxy_port = worker_port
            with ray_driver(c.address, logging_level="ERROR", log_to_driver=False):
                yield c


def encoder_autoscaling(**changes) -> dict:
    """The service's encoder autoscaling_config with test-sized changes (a deployment override replaces it whole)."""
    autoscaling = encoder_autoscaling_config()
    kwargs = changes.pop("policy_kwargs", None)
    autoscaling.update(changes)
    if kwargs:
        autoscaling["policy"]["policy_kwargs"].update(kwargs)
    return autoscaling


def fixed(n: int) -> dict:
    return encoder_autoscaling(min_replicas=n, initial_replicas=n, max_replicas=n)


def docs_body(model_dir, n: int = 16) -> dict:
    return {"model": model_dir.name, "input": [DOC] * n}


# --- autoscaling ------------------------------------------------------------------------------


def test_encoder_scales_from_1_to_3_under_load_and_back_to_1(cluster, tiny_model_dir):
    encoder = {
        "autoscaling_config": encoder_autoscaling(
            min_replicas=1,
            initial_replicas=1,
            max_replicas=WORKERS,
            upscale_delay_s=1,
            downscale_delay_s=5,
            look_back_period_s=2,
            metrics_interval_s=0.5,
            policy_kwargs={"target_batches_per_replica": 2},
        )
    }
    # 16 inputs of ~500 tokens = 4 chunks of 2048 tokens = 16 forward passes of 512 tokens per request
    with serve_on_cluster(cluster.address, tiny_model_dir, {"KalmEncoder": encoder}, max_chunk_tokens=2048) as svc:
        t0 = time.monotonic()
        timeline: list[tuple[float, int, int]] = []  # (seconds, running, starting) at each change

        def sample() -> int:
            n, starting = len(replicas("KalmEncoder")), len(replicas("KalmEncoder", "STARTING"))
            if not timeline or timeline[-1][1:] != (n, starting):
                timeline.append((round(time.monotonic() - t0, 1), n, starting))
            return n

        assert sample() == 1
        with Load(svc.base_url + "/v1/embeddings", docs_body(tiny_model_dir), threads=4) as load:
            wait_for(lambda: sample() >= WORKERS, 150, what="3 running encoder replicas")
            load_stopped = time.monotonic() - t0
        wait_for(lambda: sample() == 1, 90, what="scale-down to 1 replica")
        assert load.statuses() == {200: len(load.results)}, load.failures[:3]
        print(
            f"\nautoscaling: encoder replicas over time (s, running, starting) {timeline}; load stopped at "
            f"{load_stopped:.1f}s; {len(load.results)} requests, all 200"
        )
        decisions = re.findall(r"(\d\d:\d\d:\d\d),\d+ controller \d+ -- autoscaling KalmEncoder: (.*)", svc.log())
        print("policy decisions (controller log):\n" + "\n".join(f"  {t} {d}" for t, d in decisions))
        assert max(n for _, n, _ in timeline) >= WORKERS and timeline[-1][1] == 1


# --- backpressure ------------------------------------------------------------------------------


def test_overload_burst_gets_fast_503_and_admitted_requests_succeed(cluster, tiny_model_dir):
    # Two replicas taking one call at a time, two calls waiting in each ingress: the rest is refused.
    encoder = {"autoscaling_config": fixed(2), "max_ongoing_requests": 1, "max_queued_requests": 2}
    with serve_on_cluster(cluster.address, tiny_model_dir, {"KalmEncoder": encoder}, max_chunk_tokens=40_000) as svc:
        wait_for(lambda: len({r["node_id"] for r in replicas("KalmEncoder")}) == 2, 60, what="2 encoder replicas")
        long = {"model": tiny_model_dir.name, "input": [DOC] * 64}  # one 32k-token call: ~0.5 s of compute
        query = {"model": tiny_model_dir.name, "input": "what is the capital of France?"}

        # one client for all threads: a new httpx client per call costs this 2-core machine ~20 ms of CPU
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64))

        def call(body):
            started = time.perf_counter()
            resp = client.post(svc.base_url + "/v1/embeddings", json=body)
            return resp, time.perf_counter() - started

        with client, cf.ThreadPoolExecutor(40) as pool:
            work = [pool.submit(call, long) for _ in range(6)]  # fills the replicas and the ingress queues
            time.sleep(1.5)
            burst = list(pool.map(call, [query] * 32))  # a burst while the queues are full
            work = [f.result() for f in work]
        # the ingress's own view of the refused queries (its request log lines, streamed by `serve run`)
        n_refused = sum(r.status_code == 503 for r, _ in burst)

        def logged_refusals():
            lines = [orjson.loads(m) for m in re.findall(r"request (\{[^\n]*\"status\":503[^\n]*\})", svc.log())]
            lines = [line for line in lines if line["inputs"] == 1]
            return lines if len(lines) >= n_refused else None

        refused_logged = wait_for(logged_refusals, 30, what="the ingress's log lines") if n_refused else []
    results = work + burst
    unexpected = [r.text[:200] for r, _ in results if r.status_code not in (200, 503)]
    assert not unexpected, unexpected
    refused = [(r, s) for r, s in burst if r.status_code == 503]
    admitted = [(r, s) for r, s in results if r.status_code == 200]
    assert refused and sum(r.status_code == 200 for r, _ in work) >= 2
    for resp, _ in refused:
        assert_openai_error(resp, 503, "rate_limit_error", code="overloaded")
        assert int(resp.headers["retry-after"]) >= 1
    for resp, _ in admitted:
        vectors = np.array([d["embedding"] for d in resp.json()["data"]])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    refused_s = sorted(s for _, s in refused)
    work_s = sorted(s for r, s in work if r.status_code == 200)
    in_ingress = sorted(r["total_ms"] for r in refused_logged)
    print(
        f"\noverload: burst of 32 queries while 6 long requests fill the queues: {len(refused)} refused (503) "
        f"in p50 {statistics.median(refused_s) * 1e3:.0f} ms / max {refused_s[-1] * 1e3:.0f} ms (client side; "
        f"in the ingress p50 {statistics.median(in_ingress):.0f} / max {in_ingress[-1]:.0f} ms), "
        f"{len(burst) - len(refused)} admitted; long requests: {len(work_s)} admitted, all 200, in "
        f"{work_s[0]:.1f}-{work_s[-1]:.1f} s, {len(work) - len(work_s)} refused"
    )
    # Refusals don't wait for the work ahead of them: in the ingress quicker than the quickest admitted
    # long request, and on the client side quicker than the queued work (no wall-clock bound: on a
    # loaded 2-core machine the client and proxy add the most).
    assert statistics.median(in_ingress) < work_s[0] * 1e3 and statistics.median(refused_s) < work_s[-1]


# --- placement, routing share, and losing a replica and a node ---------------------------------


@pytest.fixture(scope="module")
def three_replicas(cluster, tiny_model_dir):
    encoder = {"autoscaling_config": fixed(WORKERS)}
    with serve_on_cluster(cluster.address, tiny_model_dir, {"KalmEncoder": encoder}, max_chunk_tokens=2048) as svc:
        wait_for(lambda: len(replicas("KalmEncoder")) == WORKERS, 60, what="3 encoder replicas")
        yield svc


def test_replicas_spread_over_nodes_and_each_serves_traffic(cluster, three_replicas, tiny_model_dir):
    svc = three_replicas
    info = serve_details()
    workers = {n.node_id for n in cluster.worker_nodes}
    encoders = replicas("KalmEncoder")
    ingresses = replicas("EmbeddingsIngress")
    assert {r["node_id"] for r in encoders} == workers  # one per GPU node
    assert len(ingresses) == 2  # Serve spreads them over nodes, best effort (not asserted)
    proxies = info["proxies"]
    assert len(proxies) == WORKERS + 1 and all(p["status"] == "HEALTHY" for p in proxies.values())
    # every node's proxy serves (the workers' on their own port here)
    assert httpx.get(f"http://127.0.0.1:{cluster.worker_proxy_port}/health", timeout=10).status_code == 200

    before = encoder_stats(WORKERS)
    assert len(before) == WORKERS
    body = {"model": tiny_model_dir.name, "input": ["what is ray serve?", "Paris is in France."]}
    urls = [svc.base_url, f"http://127.0.0.1:{cluster.worker_proxy_port}"]
    n = 120

    def call(i):
        return httpx.post(urls[i % 2] + "/v1/embeddings", json=body, timeout=60).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(n))) == [200] * n
    after = encoder_stats(WORKERS)
    served = {rid: after[rid]["calls"] - before[rid]["calls"] for rid in before}
    ingress_nodes = {r["node_id"] for r in ingresses}
    share = {}
    for rid, calls in served.items():
        node = before[rid]["node_id"]
        share[f"{rid} (node {node[:6]}{', has an ingress' if node in ingress_nodes else ''})"] = calls
    print(
        f"\nrouting share: {n} requests (one call each) -> calls per encoder replica {share}; ingress replicas "
        f"on {len(ingress_nodes)} node(s)"
    )
    assert sum(served.values()) == n
    assert all(c >= n * 0.15 for c in served.values()), share  # an even split is 40 each


def test_killing_a_replica_then_removing_a_worker_node_loses_no_request(cluster, three_replicas, tiny_model_dir):
    svc = three_replicas
    workers = {n.node_id: n for n in cluster.worker_nodes}
    log_start = len(svc.log())
    with Load(svc.base_url + "/v1/embeddings", docs_body(tiny_model_dir), threads=4) as load:
        # 1. kill an encoder replica's process while it holds calls
        victim = wait_for(
            lambda: next((s for s in encoder_stats(WORKERS).values() if s["in_flight"] > 0), None),
            30,
            every_s=0.1,
            what="a busy encoder replica",
        )
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = len(load.results)

        def replaced() -> bool:
            running = {r["replica_id"] for r in replicas("KalmEncoder")}
            return len(running) == WORKERS and victim["replica"] not in running

        wait_for(replaced, 120, what="Serve to replace the killed replica")
        replaced_at = len(load.results)
        time.sleep(2)
        # 2. remove a worker node (raylet and every process on it) that runs an encoder replica
        #    but no ingress replica (the proxy it hits is the head's)
        ingress_nodes = {r["node_id"] for r in replicas("EmbeddingsIngress")}
        node_id = next(r["node_id"] for r in replicas("KalmEncoder") if r["node_id"] not in ingress_nodes)
        busy = wait_for(
            lambda: any(s["in_flight"] > 0 and s["node_id"] == node_id for s in encoder_stats(WORKERS).values()),
            30,
            every_s=0.1,
            what="the replica on the node to remove to be busy",
        )
        assert busy
        cluster.remove_node(workers[node_id])
        removed_at = len(load.results)
        time.sleep(10)  # the remaining two replicas carry the load
    failed = [status for _, status, _ in load.results if status != 200]
    log = svc.log()[log_start:]
    retries = collections.Counter(re.findall(r"encoder replica lost \((\w+)\); retrying chunk", log))
    print(
        f"\nfault tolerance: {len(load.results)} requests under steady load (4 clients): replica killed after "
        f"{killed_at}, replaced after {replaced_at}, node removed after {removed_at}; failed: {len(failed)}; "
        f"chunk retries in the ingress: {dict(retries)}"
    )
    assert not failed, load.failures[:3]
    assert sum(retries.values()) >= 2  # in-flight work was really lost, once per failure, and retried
    assert len(replicas("KalmEncoder")) == WORKERS - 1  # the third has no GPU node left to go to
