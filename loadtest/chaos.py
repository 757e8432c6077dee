"""Chaos: N minutes of mixed load on a multi-node cluster while things break, one after another.

    python -m loadtest.chaos --model /tmp/kalm-standin --minutes 15

Starts its own Redis, a Ray cluster on this machine (a head with GCS fault tolerance and
``--workers`` workers with one GPU slot each), and the service (``serve run`` of
cluster/config.yaml, 2 encoder replicas); then clients (``loadtest.retrying_load``: retries 5xx
and connection errors twice, 0.5 s and 1 s later) send queries and documents through the head's
proxy and the workers' while, every ``--every-s`` seconds, the next of these happens:

  encoder-kill    SIGKILL an encoder replica's process
  ingress-kill    SIGKILL an ingress replica's process
  node-removal    remove a worker node holding an encoder replica (a fresh worker joins 15 s later)
  node-drain      `ray drain-node` (preemption, 60 s deadline) on such a worker; it is removed
                  once its replicas have moved (or at the deadline), and a fresh worker joins
  gcs-restart     kill the head's GCS, 20 s down, start it again
  redeploy        `serve deploy` (the controller call) of a changed max_batch_wait_ms: every replica replaced

Per event it prints what the load saw from the event to the next one: requests, failed after
retries, raw errors and 5xx, retries, the longest stall; at the end the RSS of every process
of the cluster at start and end. A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from loadtest.retrying_load import RetryingLoad
from tests.service_harness import ServeProcess, environ, free_port, local_cluster, replicas, serve_client, serve_details

MIB = 1024 * 1024
DOC = "lorem ipsum dolor sit amet " * 100  # ~500 tokens with the stand-in's tokenizer
EVENTS = ("encoder-kill", "ingress-kill", "node-removal", "node-drain", "gcs-restart", "redeploy")


def fixed_encoders(n: int) -> dict:
    from serve_app.serve.autoscaling import encoder_autoscaling_config

    return {**encoder_autoscaling_config(), "min_replicas": n, "initial_replicas": n, "max_replicas": n}


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the controller or the GCS may not answer yet
            if predicate():
                return True
        time.sleep(1)
    return False


def process_rss(roots: list[int]) -> dict[str, float]:
    """RSS (MiB) of these processes and all their descendants, by a short name."""
    out: dict[str, float] = {}
    seen: set[int] = set()
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                with contextlib.suppress(psutil.Error):
                    cmd = p.cmdline()
                    name = cmd[0].rsplit("/", 1)[-1] if cmd else p.name()
                    if name.startswith("python") and len(cmd) > 1:
                        name = " ".join(c.rsplit("/", 1)[-1] for c in cmd[1:3])
                    out[f"{name[:60]} [{p.pid}]"] = round(p.memory_info().rss / MIB, 1)
    return out


def ray_daemons(cluster) -> list[int]:
    """The cluster's Ray processes (they name its temp dir on their command line); workers are their children."""
    marker = cluster.head_node.get_temp_dir_path()
    return [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


class Chaos:
    def __init__(self, cluster, svc, worker_args: dict, every_s: float):
        self.cluster, self.svc, self.worker_args, self.every_s = cluster, svc, worker_args, every_s
        self.revision = 0

    def _worker_with_an_encoder(self):
        ingress_nodes = {r["node_id"] for r in replicas("EmbeddingsIngress")}
        nodes = [r["node_id"] for r in replicas("KalmEncoder")]
        nodes.sort(key=lambda n: n in ingress_nodes)  # one without an ingress first
        return next((w for n in nodes for w in self.cluster.worker_nodes if w.node_id == n), None)

    def _replace_worker(self, node) -> str:
        self.cluster.remove_node(node)
        time.sleep(15)
        self.cluster.add_node(**self.worker_args)
        return f"removed node {node.node_id[:8]}, added a fresh worker"

    def encoder_kill(self) -> str:
        victim = replicas("KalmEncoder")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        return f"killed encoder pid {victim['pid']}"

    def ingress_kill(self) -> str:
        victim = replicas("EmbeddingsIngress")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        return f"killed ingress pid {victim['pid']}"

    def node_removal(self) -> str:
        node = self._worker_with_an_encoder()
        return self._replace_worker(node) if node else "no worker with an encoder: skipped"

    def node_drain(self) -> str:
        node = self._worker_with_an_encoder()
        if node is None:
            return "no worker with an encoder: skipped"
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", self.cluster.address]
            + ["--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
            + ["--reason-message", "chaos", "--deadline-remaining-seconds", "60"],
            check=True,
            capture_output=True,
        )

        def moved() -> bool:
            deps = serve_details()["applications"]["kalm"]["deployments"].values()
            return not any(r["node_id"] == node.node_id for d in deps for r in d["replicas"])

        handed_over = wait_until(moved, 60)
        took = time.monotonic() - t0
        return (
            f"drained ({'moved' if handed_over else 'deadline reached'} after {took:.0f} s); "
            + self._replace_worker(node)
        )

    def gcs_restart(self) -> str:
        self.cluster.head_node.kill_gcs_server()
        time.sleep(20)
        self.cluster.head_node.start_gcs_server()
        back = wait_until(lambda: serve_details() is not None, 60)
        return f"GCS down 20 s; controller {'answering' if back else 'NOT answering after 60 s'}"

    def redeploy(self) -> str:
        from ray.serve.schema import ServeDeploySchema

        config = yaml.safe_load(self.svc.config_path.read_text())
        self.revision += 1
        config["applications"][0]["args"]["max_batch_wait_ms"] = 2 + self.revision % 2
        self.svc.config_path.write_text(yaml.safe_dump(config))
        serve_client().deploy_apps(ServeDeploySchema.model_validate(config))
        return f"serve deploy with max_batch_wait_ms {2 + self.revision % 2}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model dir (a stand-in: python -m serve_app.testing.standin)")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--every-s", type=float, default=60, help="seconds from one event to the next")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    args = parser.parse_args(argv)

    import ray
    from ray.serve import context

    from serve_app.testing.redis_server import start_redis

    model = str(Path(args.model).resolve())
    worker_port = free_port()
    worker_args = {"num_cpus": 1, "num_gpus": 1}
    redis = start_redis()
    try:
        with (
            environ(KALM_MODEL=model, RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(worker_port), RAY_ENABLE_AUTO_CONNECT="0"),
            local_cluster(
                head_cpus=1,
                workers=[dict(worker_args, metrics_export_port=free_port()) for _ in range(args.workers)],
                gcs_server_port=free_port(),
                external_addresses=[redis.address],
                redis_password=redis.password,
            ) as cluster,
        ):
            ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
            context._set_global_client(None)
            try:
                with ServeProcess(
                    Path(model),
                    cluster_address=cluster.address,
                    config_overrides={"served_model_name": "kalm", "max_chunk_tokens": 1024},
                    deployment_overrides={"KalmEncoder": {"autoscaling_config": fixed_encoders(2)}},
                ) as svc:
                    wait_until(lambda: len(replicas("KalmEncoder")) == 2, 120)
                    assert svc.proc is not None
                    roots = [os.getpid(), redis.proc.pid, svc.proc.pid]
                    rss_start = process_rss(roots + ray_daemons(cluster))
                    run(args, cluster, svc, worker_args, worker_port)
                    rss_end = process_rss(roots + ray_daemons(cluster))
                print(f"\nRSS (MiB) at start: {len(rss_start)} processes, {sum(rss_start.values()):.0f} MiB in all")
                for name, mb in sorted(rss_start.items()):
                    print(f"  {mb:8.1f}  {name}")
                print(f"RSS (MiB) at end: {len(rss_end)} processes, {sum(rss_end.values()):.0f} MiB in all")
                for name, mb in sorted(rss_end.items()):
                    print(f"  {mb:8.1f}  {name}")
            finally:
                ray.shutdown()
    finally:
        redis.stop()
    return 0


def run(args, cluster, svc, worker_args: dict, worker_port: int) -> None:
    chaos = Chaos(cluster, svc, dict(worker_args), args.every_s)
    chaos.worker_args["metrics_export_port"] = 0
    bodies: list[dict] = [
        {"model": "kalm", "input": "what is the capital of France?"},
        {"model": "kalm", "input": [f"document {i}: {DOC}" for i in range(4)]},
        {"model": "kalm", "input": ["what is ray serve?", "Paris is in France.", "embeddings for search"]},
    ]
    urls = [svc.base_url, f"http://127.0.0.1:{worker_port}"]
    end = time.monotonic() + args.minutes * 60
    marks: list[tuple[str, float, str]] = []
    with RetryingLoad(urls, bodies, threads=args.threads) as load:
        start = time.monotonic()
        time.sleep(min(30, args.every_s / 2))  # a calm stretch first, for comparison
        marks.append(("(calm)", start, ""))
        i = 0
        while time.monotonic() + 30 < end:
            event = EVENTS[i % len(EVENTS)]
            i += 1
            t = time.monotonic()
            try:
                what = getattr(chaos, event.replace("-", "_"))()
            except Exception as exc:  # a failed event is reported, the run goes on
                what = f"FAILED: {exc!r}"[:200]
            marks.append((event, t, what))
            print(f"[{t - start:6.0f} s] {event}: {what}", flush=True)
            time.sleep(max(0.0, min(end, t + args.every_s) - time.monotonic()))
        stop = time.monotonic()
    print(f"\n{args.minutes:g} minutes, {args.threads} clients through the head's and the workers' proxies:")
    print(
        f"{'event':14} {'at s':>6} {'requests':>8} {'failed':>6} {'raw err':>7} {'5xx':>5} {'retries':>7} {'stall s':>7}"
    )
    bounds = [m[1] for m in marks[1:]] + [stop]
    for (event, t0, _), t1 in zip(marks, bounds, strict=True):
        w = load.window(t0, t1)
        print(
            f"{event:14} {t0 - start:6.0f} {w.requests:8} {w.failed:6} {w.raw_errors:7} {w.raw_5xx:5} "
            f"{w.retries:7} {w.longest_stall_s:7.1f}"
        )
    total = load.window(start, stop)
    print(
        f"{'all':14} {'':>6} {total.requests:8} {total.failed:6} {total.raw_errors:7} {total.raw_5xx:5} "
        f"{total.retries:7} {total.longest_stall_s:7.1f}"
    )
    if load.failures:
        print("failed after retries (first 5):", *load.failures[:5], sep="\n  ")


if __name__ == "__main__":
    sys.exit(main())
