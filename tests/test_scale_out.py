"""Scale-out on a real multi-node Ray cluster on this machine.

A head and three workers (separate raylets), each worker declaring one GPU slot, so every
encoder replica takes a worker of its own (on this CPU-only machine it runs on the CPU
inside). The service is deployed exactly as on a real cluster: ``serve run`` of
cluster/config.yaml against the cluster's address, with test-sized limits and delays.

Clients talk to the head node's proxy (what a load balancer in front of the proxies would
do for them); the workers' proxies listen on another port of this machine
(RAY_SERVE_WORKER_PROXY_HTTP_PORT), since all "nodes" share one IP here.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import re
import signal
import statistics
import threading
import time

import httpx
import numpy as np
import orjson
import pytest

from serve_app.serve.autoscaling import TokenBacklogPolicy, encoder_autoscaling_config, replicas_that_fit
from tests.openai_errors import assert_openai_error
from tests.service_harness import ServeProcess, environ, free_port, local_cluster

WORKERS = 3
DOC = "lorem ipsum dolor sit amet " * 100  # ~500 tokens with the stand-in's tokenizer


# --- the policy's arithmetic (no cluster) ---------------------------------------------------


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
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    ctx = SimpleNamespace(
        deployment_name="KalmEncoder",
        current_num_replicas=2,
        target_num_replicas=2,
        total_num_requests=10.0,
        total_queued_requests=0.0,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        config=AutoscalingConfig(target_ongoing_requests=128, max_replicas=8),
        aggregated_metrics={"backlog_batches": {"replica-a": 14.0, "replica-b": 10.0}},
    )
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
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    said: list[str] = []
    # the module the policy's code really runs in (an earlier test may have imported a second copy)
    monkeypatch.setitem(
        TokenBacklogPolicy.__call__.__globals__, "log", SimpleNamespace(info=lambda msg, *args: said.append(msg % args))
    )
    ctx = SimpleNamespace(
        deployment_name="KalmEncoder",
        current_num_replicas=1,
        target_num_replicas=1,
        total_num_requests=8.0,
        total_queued_requests=0.0,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        config=AutoscalingConfig(target_ongoing_requests=128, max_replicas=8),
        # 8 long chunks, 40 passes of work: 8 replicas wanted; each replica holds 2 CPUs
        aggregated_metrics={"backlog_batches": {"a": 40.0}, "replica_cpus": {"a": 2.0}, "replica_gpus": {"a": 0.0}},
    )
    policy = TokenBacklogPolicy(target_batches_per_replica=4)
    policy._cluster_nodes = lambda: [{"CPU": 2.0, "memory": 8e9}]  # one machine with 2 cores
    assert [policy(ctx)[0] for _ in range(3)] == [1, 1, 1]
    capped = [line for line in said if "holds at most 1" in line]
    assert len(capped) == 1 and "2 CPU, 0 GPU" in capped[0], said
    policy._cluster_nodes = lambda: [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]  # several nodes: no cap
    assert policy(ctx)[0] == 8


# --- the cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """Head (1 CPU) + 3 workers (1 CPU + 1 GPU slot each); this process is a driver on it."""
    import ray

    worker_port = free_port()
    # The nodes inherit this environment: the app reads KALM_MODEL where it is built.
    with environ(KALM_MODEL=str(tiny_model_dir), RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(worker_port)):
        workers = [{"num_cpus": 1, "num_gpus": 1, "metrics_export_port": free_port()} for _ in range(WORKERS)]
        with local_cluster(head_cpus=1, workers=workers) as c:
            c.worker_proxy_port = worker_port
            ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
            try:
                yield c
            finally:
                ray.shutdown()


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


@contextlib.contextmanager
def service(cluster, model_dir, encoder: dict, **config_overrides):
    """`serve run` of cluster/config.yaml onto the cluster, with these encoder deployment options."""
    from ray.serve import context

    context._set_global_client(None)  # each `serve run` brings (and takes down) its own Serve instance
    with ServeProcess(
        model_dir,
        cluster_address=cluster.address,
        env={"RAY_DEDUP_LOGS": "0"},
        config_overrides=config_overrides,
        deployment_overrides={"KalmEncoder": encoder},
    ) as svc:
        yield svc
    context._set_global_client(None)


def details() -> dict:
    """Serve's own view (what `serve status` / the dashboard show): replicas with node and pid, proxies."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def replicas(deployment: str, state: str = "RUNNING") -> list[dict]:
    deployments = details()["applications"]["kalm"]["deployments"]
    return [r for r in deployments[deployment]["replicas"] if r["state"] == state]


def encoder_stats(expect: int, calls: int = 48) -> dict[str, dict]:
    """KalmEncoder.stats() of every running replica, by replica id (many concurrent calls reach them all)."""
    from ray import serve

    handle = serve.get_deployment_handle("KalmEncoder", app_name="kalm")
    seen: dict[str, dict] = {}
    try:
        for _ in range(10):
            for s in [r.result() for r in [handle.stats.remote() for _ in range(calls)]]:
                seen[s["replica"]] = s
            if len(seen) >= expect:
                break
    finally:
        handle.shutdown()  # else its router keeps pushing metrics from this process after the cluster is gone
    return seen


class Load:
    """Client threads sending the same request back to back; every answer is kept."""

    def __init__(self, url: str, body: dict, threads: int, timeout_s: float = 120):
        self.url, self.body, self.n, self.timeout_s = url, body, threads, timeout_s
        self.results: list[tuple[float, int, float]] = []  # (start, status, seconds)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    resp = client.post(self.url, json=self.body)
                    status = resp.status_code
                    if status != 200:
                        self.failures.append(f"{status}: {resp.text[:300]}")
                except httpx.HTTPError as exc:
                    status = -1
                    self.failures.append(repr(exc))
                self.results.append((t0, status, time.monotonic() - t0))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 10)

    def statuses(self) -> dict[int, int]:
        return dict(collections.Counter(status for _, status, _ in self.results))


def wait_for(predicate, timeout_s: float, every_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def docs_body(model_dir, n: int = 16) -> dict:
    return {"model": model_dir.name, "input": [DOC] * n}


# --- autoscaling ------------------------------------------------------------------------------


@pytest.mark.slow
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
    with service(cluster, tiny_model_dir, encoder, max_chunk_tokens=2048) as svc:
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


@pytest.mark.slow
def test_overload_burst_gets_fast_503_and_admitted_requests_succeed(cluster, tiny_model_dir):
    # Two replicas taking one call at a time, two calls waiting in each ingress: the rest is refused.
    encoder = {"autoscaling_config": fixed(2), "max_ongoing_requests": 1, "max_queued_requests": 2}
    with service(cluster, tiny_model_dir, encoder, max_chunk_tokens=40_000) as svc:
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
    with service(cluster, tiny_model_dir, {"autoscaling_config": fixed(WORKERS)}, max_chunk_tokens=2048) as svc:
        wait_for(lambda: len(replicas("KalmEncoder")) == WORKERS, 60, what="3 encoder replicas")
        yield svc


@pytest.mark.slow
def test_replicas_spread_over_nodes_and_each_serves_traffic(cluster, three_replicas, tiny_model_dir):
    svc = three_replicas
    info = details()
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


@pytest.mark.slow
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
