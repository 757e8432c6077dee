"""The service under load while the head's GCS dies and comes back, while it is redeployed, while a node drains.

One multi-node Ray cluster on this machine for all of them (a head with 1 CPU and two workers
with 1 CPU + 1 GPU slot each), its head run with GCS fault tolerance on a real ``redis-server``
(started here, with a password, on a free loopback port). The service is deployed with
``serve run`` of cluster/config.yaml; redeploys go through the controller call ``serve deploy``
makes (the dashboard's REST handler passes the config to ``ServeControllerClient.deploy_apps``),
without running the dashboard itself on this 2-core machine.

The clients are ``loadtest.retrying_load.RetryingLoad``: a request is retried twice, 0.5 s and
1 s later, on a 5xx or a broken connection, as the openai client does; every raw attempt is
counted too. The tests run in order and share the deployment: GCS (1 encoder, then scaled to
2), in-place redeploy, replica-replacing redeploy, drain (a third worker added first).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from loadtest.retrying_load import RetryingLoad
from serve_app.testing.redis_server import start_redis
from serve_app.testing.standin import write_standin
from tests.service_harness import ServeProcess, environ, free_port, local_cluster, replicas, serve_details, wait_for
from tests.test_scale_out import DOC, fixed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (.ci/run installs it)"),
]

MODEL_NAME = "kalm-test"  # served name, the same across model revisions
QUERIES = {"model": MODEL_NAME, "input": ["what is ray serve?", "Paris is in France."]}
# 4 documents of ~500 tokens, each its own chunk (max_chunk_tokens 600): a request's chunks are
# separate calls that may go to different encoder replicas
DOCS = {"model": MODEL_NAME, "input": [f"document {i}: {DOC}" for i in range(4)]}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    import ray

    redis = start_redis()
    worker_port = free_port()
    workers = [{"num_cpus": 1, "num_gpus": 1, "metrics_export_port": free_port()} for _ in range(2)]
    try:
        with (
            environ(KALM_MODEL=str(tiny_model_dir), RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(worker_port)),
            local_cluster(
                head_cpus=1,
                workers=workers,
                gcs_server_port=free_port(),  # a restarted GCS must come back where the nodes look for it
                external_addresses=[redis.address],
                redis_password=redis.password,
            ) as c,
        ):
            c.worker_proxy_port = worker_port
            c.redis = redis
            ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
            try:
                yield c
            finally:
                ray.shutdown()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def svc(cluster, tiny_model_dir):
    from ray.serve import context

    context._set_global_client(None)
    with ServeProcess(
        tiny_model_dir,
        cluster_address=cluster.address,
        config_overrides={"served_model_name": MODEL_NAME, "max_chunk_tokens": 600},
        deployment_overrides={"KalmEncoder": {"autoscaling_config": fixed(1)}},
    ) as s:
        wait_for(lambda: len(replicas("KalmEncoder")) == 1, 60, what="1 encoder replica")
        yield s
    context._set_global_client(None)


def deploy(svc: ServeProcess, change) -> None:
    """``serve deploy`` of the service's config after ``change(config)``: the controller call the
    dashboard makes for it; the changed config becomes the service's config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(svc.config_path.read_text())
    change(config)
    svc.config_path.write_text(yaml.safe_dump(config))
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def app_args(config: dict) -> dict:
    return config["applications"][0]["args"]


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def app_running() -> bool:
    app = serve_details()["applications"]["kalm"]
    return app["status"] == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values())


def replica_ids(name: str) -> set[str]:
    return {r["replica_id"] for r in replicas(name)}


class HealthWatch:
    """GET /health every half second through the given proxy; every answer is kept."""

    def __init__(self, url: str):
        self.url, self.seen = url + "/health", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status = httpx.get(self.url, timeout=10).status_code
            except httpx.HTTPError:
                status = -1
            self.seen.append((t, status))
            self._stop.wait(0.5)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def between(self, t0: float, t1: float) -> dict[int, int]:
        out: dict[int, int] = {}
        for t, status in self.seen:
            if t0 <= t < t1:
                out[status] = out.get(status, 0) + 1
        return out


def test_gcs_down_20s_under_load_loses_no_request_and_the_cluster_recovers(cluster, svc):
    worker_proxy = f"http://127.0.0.1:{cluster.worker_proxy_port}"
    controller = serve_details()["controller_info"]
    head = cluster.head_node
    with HealthWatch(worker_proxy) as health, RetryingLoad([worker_proxy], [QUERIES, DOCS], threads=3) as load:
        time.sleep(5)
        down_at = time.monotonic()
        head.kill_gcs_server()
        time.sleep(20)
        head.start_gcs_server()
        up_at = time.monotonic()
        # the controller answers again: same actor, same process (restored, not restarted)
        wait_for(lambda: _quietly(serve_details), 60, what="Serve's controller to answer after the GCS restart")
        recovered_at = time.monotonic()
        after = serve_details()["controller_info"]
        # a scale-up: 1 -> 2 encoder replicas, the second on the other worker
        deploy(svc, lambda c: deployment(c, "KalmEncoder").update(autoscaling_config=fixed(2)))
        wait_for(lambda: len(replicas("KalmEncoder")) == 2, 120, what="the scale-up to 2 encoder replicas")
        scaled_at = time.monotonic()
        time.sleep(2)
    outage = load.window(down_at, up_at)
    whole = load.window(load.attempts[0].start, time.monotonic())
    print(
        f"\nGCS down {up_at - down_at:.1f} s under load through a worker's proxy: {outage.line()}; "
        f"/health while down {health.between(down_at, up_at)}; controller answered "
        f"{recovered_at - up_at:.1f} s after the restart, scale-up to 2 replicas took {scaled_at - recovered_at:.1f} s; "
        f"whole run: {whole.line()}"
    )
    assert whole.failed == 0, load.failures[:3]
    assert outage.requests > 0 and outage.raw_error_rate <= 0.01, outage.statuses
    assert set(health.between(down_at, time.monotonic())) == {200}  # the data plane was up throughout
    assert (after["actor_id"], after["worker_id"]) == (controller["actor_id"], controller["worker_id"])


def _quietly(fn):
    try:
        return fn()
    except Exception:  # the controller or the GCS not answering yet
        return None


def test_redeploy_applied_in_place_loses_no_request(cluster, svc):
    before = replica_ids("KalmEncoder") | replica_ids("EmbeddingsIngress")
    with RetryingLoad([svc.base_url], [QUERIES, DOCS], threads=3, retries=0) as load:
        time.sleep(3)
        t0 = time.monotonic()
        # options Serve changes on running replicas: queue bounds of both deployments
        deploy(
            svc,
            lambda c: (
                deployment(c, "KalmEncoder").update(max_ongoing_requests=200, max_queued_requests=400),
                deployment(c, "EmbeddingsIngress").update(max_queued_requests=1024),
            ),
        )
        wait_for(lambda: _quietly(app_running), 60, what="the app to be RUNNING with the new config")
        applied = time.monotonic()
        time.sleep(3)
    window = load.window(t0, time.monotonic())
    print(f"\nin-place redeploy (applied in {applied - t0:.1f} s): {window.line()}")
    assert load.window(0, time.monotonic()).raw_errors == 0, load.failures[:3]
    assert replica_ids("KalmEncoder") | replica_ids("EmbeddingsIngress") == before  # no replica restarted


def test_redeploy_of_another_model_revision_replaces_replicas_and_loses_no_request(cluster, svc, tmp_path):
    old = httpx.post(svc.base_url + "/v1/embeddings", json=DOCS, timeout=60).json()
    revision = write_standin(tmp_path / "rev2", size="tiny", append_eos=True, seed=2)
    before = replica_ids("KalmEncoder") | replica_ids("EmbeddingsIngress")
    with RetryingLoad([svc.base_url], [DOCS], threads=3, retries=0, keep_answers=True) as load:
        time.sleep(3)
        t0 = time.monotonic()
        deploy(svc, lambda c: app_args(c).update(model=str(revision)))
        wait_for(
            lambda: (
                _quietly(app_running) and not (before & (replica_ids("KalmEncoder") | replica_ids("EmbeddingsIngress")))
            ),
            180,
            what="every replica replaced by one of the new revision",
        )
        replaced = time.monotonic()
        time.sleep(3)
    new = httpx.post(svc.base_url + "/v1/embeddings", json=DOCS, timeout=60).json()
    refs = {"old": _vectors(old), "new": _vectors(new)}
    assert not np.allclose(refs["old"], refs["new"], atol=1e-3)
    kinds = [_revision_of(r.answer, refs) for r in load.requests if r.answer is not None]
    window = load.window(t0, time.monotonic())
    print(
        f"\nreplica-replacing redeploy (another model revision; all replicas new after {replaced - t0:.1f} s): "
        f"{window.line()}; answers by revision in arrival order: {_runs(kinds)}"
    )
    assert load.window(0, time.monotonic()).raw_errors == 0, load.failures[:3]
    # every answer is one revision's, never both (a request's chunks are separate calls); old first, new last
    assert set(kinds) == {"old", "new"}, _runs(kinds)
    assert kinds[0] == "old" and kinds[-1] == "new"


def _vectors(answer: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in answer["data"]])


def _revision_of(answer: dict, refs: dict[str, np.ndarray]) -> str:
    vectors = _vectors(answer)
    per_input = []
    for i, v in enumerate(vectors):
        names = [name for name, ref in refs.items() if np.allclose(v, ref[i], atol=1e-4)]
        per_input.append(names[0] if len(names) == 1 else "unknown")
    kinds = set(per_input)
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _runs(kinds: list[str]) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for k in kinds:
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def test_drained_node_hands_its_replicas_over_before_it_goes_and_loses_no_request(cluster, svc):
    cluster.add_node(num_cpus=1, num_gpus=1, metrics_export_port=free_port())  # room for the replacement
    cluster.wait_for_nodes()
    ingress_nodes = {r["node_id"] for r in replicas("EmbeddingsIngress")}
    encoders = replicas("KalmEncoder")
    n_encoders = len(encoders)
    # drain a worker that holds an encoder replica (preferably no ingress); the load goes through the head's proxy
    target = min(encoders, key=lambda r: r["node_id"] in ingress_nodes)["node_id"]
    node = next(n for n in cluster.worker_nodes if n.node_id == target)
    timeline: list[tuple[float, dict]] = []
    with RetryingLoad([svc.base_url], [QUERIES, DOCS], threads=3, retries=0) as load:
        time.sleep(3)
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address]
            + ["--node-id", target, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot notice"]
            + ["--deadline-remaining-seconds", "90"],
            check=True,
            capture_output=True,
        )

        def handed_over() -> bool:
            deps = serve_details()["applications"]["kalm"]["deployments"]
            states = {
                name: sorted(
                    (getattr(r["state"], "value", r["state"]), r.get("node_id") == target) for r in d["replicas"]
                )
                for name, d in deps.items()
            }
            if not timeline or timeline[-1][1] != states:
                timeline.append((round(time.monotonic() - t0, 1), states))
            on_target = [r for d in deps.values() for r in d["replicas"] if r.get("node_id") == target]
            running = [r for r in deps["KalmEncoder"]["replicas"] if r["state"] == "RUNNING"]
            return not on_target and len(running) == n_encoders

        try:
            wait_for(handed_over, 120, what="the drained node's replicas to move")
        finally:
            print("\nreplica states over time (s, deployment: [(state, on the drained node)]):")
            for t, states in timeline:
                print(f"  {t}: {states}")
        moved = time.monotonic()
        cluster.remove_node(node)  # the deadline: the machine goes
        time.sleep(5)
    window = load.window(t0, time.monotonic())
    print(
        f"\ndrain with a 90 s deadline: replicas moved off in {moved - t0:.1f} s, then the node was removed: "
        f"{window.line()}"
    )
    assert load.window(0, time.monotonic()).raw_errors == 0, load.failures[:3]
    assert target not in {r["node_id"] for r in replicas("KalmEncoder")}
    # never fewer encoder replicas serving than before: the replacement ran before the old one stopped
    for _, states in timeline:
        serving = [s for s in states["KalmEncoder"] if s[0] in ("RUNNING", "PENDING_MIGRATION")]
        assert len(serving) >= n_encoders, timeline
