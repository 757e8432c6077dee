#!/usr/bin/env python
"""A multi-node Ray cluster on one machine, for trying the scale-out setup without a cloud.

    python cluster/local_cluster.py start --workers 3 --model /tmp/kalm-standin
    # ... prints the RAY_ADDRESS / token to export; then, in another shell:
    #     serve run cluster/config.yaml
    python cluster/local_cluster.py remove-worker    # lose a node (the newest worker, all its processes)
    python cluster/local_cluster.py add-worker       # get one back
    python cluster/local_cluster.py kill-gcs         # with --redis: the head's GCS dies ...
    python cluster/local_cluster.py start-gcs        # ... and comes back, finding the cluster it left
    python cluster/local_cluster.py stop             # or Ctrl-C where it runs: stops every process it started

`start` runs in the foreground: a head node and N worker nodes, each its own raylet (the
same machinery Ray's own multi-node tests use), each worker declaring one GPU slot. Encoder
replicas take one GPU each, so they land one per worker; with a CPU-only torch they run on the
CPU inside ("device: auto"). The app reads KALM_MODEL where it is built, i.e. in the cluster's
environment, so pass --model (or export KALM_MODEL) here, not to `serve run`.

Every node's Serve proxy binds port 8000 (SO_REUSEPORT), so connections to 127.0.0.1:8000 are
spread over the nodes' proxies by the kernel, a little like a load balancer would. With
--worker-proxy-port the workers' proxies listen there instead and :8000 is the head's alone:
use that when removing workers, so that your client isn't talking to the proxy you remove.

With --redis the head runs with GCS fault tolerance: the script starts a private redis-server
(Debian's package, on PATH) with a password on a free loopback port, the GCS stores its tables
there, and a GCS that dies and is started again (kill-gcs, start-gcs) resumes the cluster; the
replicas keep serving while it is down. Without it a restarted GCS knows no nodes and no actors.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

#: Where a running cluster leaves its pid, address and GCS state for the other commands.
STATE = Path(os.environ.get("KALM_LOCAL_CLUSTER_STATE", Path(tempfile.gettempdir()) / "kalm-local-cluster.json"))
#: Asks the running cluster to kill its GCS, or to start it again (SIGUSR1/2 remove and add workers).
GCS_SIGNAL = signal.SIGRTMIN


def start(args: argparse.Namespace) -> int:
    if STATE.exists() and _alive(_read_state()["pid"]):
        print(f"a local cluster is already running (see {STATE}); stop it first", file=sys.stderr)
        return 1
    # Everything the nodes need must be in this environment before they start: they inherit it.
    token = secrets.token_hex(16)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    if args.model:
        os.environ["KALM_MODEL"] = str(Path(args.model).expanduser().resolve())
    if args.worker_proxy_port:
        os.environ["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(args.worker_proxy_port)

    from serve_app.testing.ray_cluster import free_port, start_cluster

    temp_dir = tempfile.mkdtemp(prefix="kalm-rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = args.port or free_port()
    requests: list[str] = []
    stop = threading.Event()

    def on_signal(signum, _frame):
        if signum == signal.SIGUSR1:
            requests.append("remove-worker")
        elif signum == signal.SIGUSR2:
            requests.append("add-worker")
        elif signum == GCS_SIGNAL:
            requests.append("toggle-gcs")
        else:
            stop.set()

    def install_handlers():  # again after each node start: Ray's node setup installs its own SIGTERM handler
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, GCS_SIGNAL):
            signal.signal(sig, on_signal)

    install_handlers()

    worker_args = {"num_cpus": args.cpus_per_worker, "num_gpus": args.gpus_per_worker}
    cluster = None
    redis = None
    try:
        head_args = {
            "num_cpus": args.head_cpus,
            "gcs_server_port": port,  # fixed: a restarted GCS comes back where the nodes look for it
            "include_dashboard": args.dashboard,
            "temp_dir": temp_dir,
            "metrics_export_port": free_port(),
            "dashboard_host": "127.0.0.1",
        }
        if args.redis:
            from serve_app.testing.redis_server import start_redis

            redis = start_redis()
            head_args.update(external_addresses=[redis.address], redis_password=redis.password)
        cluster = start_cluster(head_args)
        for _ in range(args.workers):
            cluster.add_node(**worker_args, metrics_export_port=free_port())
        cluster.wait_for_nodes()
        install_handlers()
        address = cluster.address
        state = {"pid": os.getpid(), "address": address, "temp_dir": temp_dir, "redis": redis is not None, "gcs": "up"}
        _write_state(state)
        model = os.environ.get("KALM_MODEL")
        print(
            f"""
Ray cluster up: a head ({args.head_cpus} CPU) and {args.workers} worker(s) ({args.cpus_per_worker} CPU, \
{args.gpus_per_worker} GPU slot each), GCS at {address}; logs under {temp_dir}.
GCS fault tolerance: {f"on, Redis at {redis.address}" if redis else "off (--redis turns it on)"}
Model for the app (KALM_MODEL in the cluster's environment): {model or "not set: the hub id (needs the hub)"}

Deploy onto it, from the repository root in another shell:

  export RAY_ADDRESS={address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token}
  serve run cluster/config.yaml        # Ctrl-C takes the app down; the cluster stays

  curl -s 127.0.0.1:8000/health        # any node's proxy{
                "" if not args.worker_proxy_port else f"; the workers' on :{args.worker_proxy_port}"
            }
  serve status                         # replicas and where they run (with RAY_ADDRESS set)

Try losing a node: python cluster/local_cluster.py remove-worker (add-worker to get one back).
Stop everything: Ctrl-C here, or python cluster/local_cluster.py stop.
READY {address}""",
            flush=True,
        )
        while not stop.is_set():
            stop.wait(0.5)
            while requests:
                action = requests.pop(0)
                if action == "remove-worker":
                    if not cluster.worker_nodes:
                        print("no worker left to remove", flush=True)
                        continue
                    node = max(cluster.worker_nodes, key=lambda n: n.node_id)  # any one; ids are random
                    cluster.remove_node(node)
                    print(f"removed worker node {node.node_id} ({len(cluster.worker_nodes)} left)", flush=True)
                elif action == "toggle-gcs":
                    if state["gcs"] == "up":
                        cluster.head_node.kill_gcs_server()
                        state["gcs"] = "down"
                    else:
                        cluster.head_node.start_gcs_server()
                        state["gcs"] = "up"
                    _write_state(state)
                    print(f"GCS {state['gcs']}", flush=True)
                else:
                    node = cluster.add_node(**worker_args, metrics_export_port=free_port())
                    install_handlers()
                    print(f"added worker node {node.node_id} ({len(cluster.worker_nodes)} now)", flush=True)
    finally:
        print("stopping the cluster ...", flush=True)
        if cluster is not None:
            cluster.shutdown()
        if redis is not None:
            redis.stop()
        STATE.unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        print("stopped", flush=True)
    return 0


def _write_state(state: dict) -> None:
    # Whole or not at all: the other commands poll this file while the cluster rewrites it (a plain
    # write_text truncates first, and a reader in between saw an empty file).
    partial = STATE.with_name(STATE.name + ".partial")
    partial.write_text(json.dumps(state))
    os.replace(partial, STATE)


def _read_state() -> dict:
    return json.loads(STATE.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # an exited process its parent has not reaped yet (a zombie) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def toggle_gcs(want: str) -> int:
    """kill-gcs (want "down") and start-gcs (want "up"): only with --redis, only from the other state."""
    state = _read_state() if STATE.exists() else {}
    if not state.get("redis"):
        print(
            "no local cluster with --redis is running: without Redis a restarted GCS loses the cluster", file=sys.stderr
        )
        return 1
    if state.get("gcs") == want:
        print(f"the GCS is already {want}", file=sys.stderr)
        return 1
    code = signal_running(GCS_SIGNAL)
    deadline = time.monotonic() + 30
    while code == 0 and _read_state().get("gcs") != want:
        if time.monotonic() > deadline:
            print(f"the GCS is not {want} after 30 s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"GCS {want}")
    return code


def signal_running(sig: int, wait_s: float | None = None) -> int:
    if not STATE.exists():
        print("no local cluster is running", file=sys.stderr)
        return 1
    pid = _read_state()["pid"]
    if not _alive(pid):
        STATE.unlink(missing_ok=True)
        print("no local cluster is running (stale state file removed)", file=sys.stderr)
        return 1
    os.kill(pid, sig)
    if wait_s is not None:
        deadline = time.monotonic() + wait_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            print(f"cluster process {pid} still running after {wait_s:.0f}s", file=sys.stderr)
            return 1
        print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start a head and N workers; runs until Ctrl-C or `stop`")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=1, help="GPU slots each worker declares (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each worker declares (default 1)")
    p.add_argument("--head-cpus", type=float, default=1, help="CPUs the head declares (default 1)")
    p.add_argument("--model", help="model dir or hub id for the app (sets KALM_MODEL for the cluster)")
    p.add_argument("--port", type=int, help="GCS port (default: a free one)")
    p.add_argument("--worker-proxy-port", type=int, help="workers' Serve proxies listen here instead of 8000")
    p.add_argument("--dashboard", action="store_true", help="run the Ray dashboard on 127.0.0.1:8265")
    p.add_argument("--redis", action="store_true", help="GCS fault tolerance: start a redis-server for the head")
    sub.add_parser("stop", help="stop the running local cluster")
    sub.add_parser("remove-worker", help="remove a worker node with everything on it")
    sub.add_parser("add-worker", help="add a worker node")
    sub.add_parser("kill-gcs", help="kill the head's GCS (needs --redis at start)")
    sub.add_parser("start-gcs", help="start the head's GCS again after kill-gcs")
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args)
    if args.command in ("kill-gcs", "start-gcs"):
        return toggle_gcs("down" if args.command == "kill-gcs" else "up")
    if args.command == "stop":
        return signal_running(signal.SIGTERM, wait_s=120)
    return signal_running(signal.SIGUSR1 if args.command == "remove-worker" else signal.SIGUSR2)


if __name__ == "__main__":
    sys.exit(main())
