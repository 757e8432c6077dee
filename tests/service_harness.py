"""Start a real Ray cluster (one or several raylets on this machine) and the real service, load it, watch it.

The service is started exactly as a user does: ``serve run cluster/config.yaml``,
with only the HTTP port changed so tests never clash with a server on 8000.
Everything started here is stopped again; no process is left behind.

Beside starting things: client threads that keep the service busy (:class:`Load`), Serve's own view
of the replicas (:func:`serve_details`, :func:`replicas`, :func:`encoder_stats`) and
:func:`wait_for`, for what a cluster does in its own time.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from serve_app.testing.ray_cluster import free_port, start_cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "config.yaml"


@contextlib.contextmanager
def environ(**values: str | None):
    """Set (or, with None, unset) environment variables for the block; restore them after."""
    saved = {k: os.environ.get(k) for k in values}

    def apply(settings):
        for k, v in settings.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(values)
    try:
        yield
    finally:
        apply(saved)


@contextlib.contextmanager
def ray_auth_env():
    """Token auth for the clusters tests start (Ray 2.60 turns it on for local clusters)."""
    # Ray's own test helper: this process caches the auth mode, so refresh it on each change.
    from ray._private.authentication_test_utils import reset_auth_token_state

    try:
        with environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_AUTH_TOKEN_PATH=None):
            reset_auth_token_state()
            yield
    finally:
        reset_auth_token_state()


@contextlib.contextmanager
def local_cluster(head_cpus: int = 2, workers: list[dict] | None = None, **head_args):
    """A Ray cluster of a head (``head_args``: more ``add_node`` args) and ``workers`` (each a dict of
    ``add_node`` args) on this machine; stopped afterwards, with every process it started."""
    with ray_auth_env():
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        cluster = start_cluster(
            {
                "num_cpus": head_cpus,
                "include_dashboard": False,
                "temp_dir": temp_dir,
                "metrics_export_port": free_port(),
                **head_args,
            }
        )
        try:
            for worker in workers or []:
                cluster.add_node(**worker)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()
            kill_processes_mentioning(temp_dir)


@contextlib.contextmanager
def ray_driver(address: str, **init_args):
    """This process as a driver on the Ray cluster at ``address`` for the block (``init_args``: more
    ``ray.init`` args); disconnected afterwards."""
    import ray

    ray.init(address=address, **init_args)
    try:
        yield
    finally:
        ray.shutdown()


class ServeProcess:
    """``serve run`` of a Serve config, as a user runs it.

    Without ``cluster_address`` serve run starts its own single-node Ray (the laptop
    case) and KALM_MODEL reaches the app through its environment. With an address it
    deploys onto that cluster, whose own environment the app then sees.
    """

    def __init__(
        self,
        model_dir: Path,
        cluster_address: str | None = None,
        env: dict | None = None,
        config_overrides: dict | None = None,
        deployment_overrides: dict | None = None,
        config_file: Path = CONFIG,
    ):
        self.port = free_port()
        config = yaml.safe_load(config_file.read_text())
        config["http_options"]["port"] = self.port
        app = config["applications"][0]
        app["args"].update(config_overrides or {})
        for dep in app["deployments"]:
            dep.update((deployment_overrides or {}).get(dep["name"], {}))
        self._tmp = tempfile.TemporaryDirectory(prefix="rs", dir="/tmp")
        self.config_path = Path(self._tmp.name) / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = Path(self._tmp.name) / "serve.log"
        self.ray_tmp = Path(self._tmp.name) / "r"  # a private Ray temp dir marks every process it starts
        self.ray_tmp.mkdir()
        self.env = {**os.environ, "KALM_MODEL": str(model_dir), "RAY_TMPDIR": str(self.ray_tmp), **(env or {})}
        if cluster_address:
            self.env["RAY_ADDRESS"] = cluster_address
        else:
            self.env.pop("RAY_ADDRESS", None)
            self.env.setdefault("RAY_AUTH_MODE", "token")
            self.env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> ServeProcess:
        # beside this Python (a venv), else on PATH (a --target install, as on the GPU machine)
        serve_bin = str(Path(sys.executable).parent / "serve")
        if not Path(serve_bin).exists():
            serve_bin = shutil.which("serve") or serve_bin
        self._log = open(self.log_path, "wb")
        # `--address local` without a cluster: its own Ray, where serve run's default ("auto") would
        # join any Ray already running on the machine.
        address = ["--address", "local"] if "RAY_ADDRESS" not in self.env else []
        self.proc = subprocess.Popen(
            [serve_bin, "run", *address, str(self.config_path)],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve run exited early:\n{self.log()[-5000:]}")
                try:
                    if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            raise TimeoutError(f"service not healthy after {timeout_s}s:\n{self.log()[-5000:]}")
        except BaseException:
            self.stop()
            raise

    def gcs_address(self) -> str:
        """This service's own Ray, for drivers a test starts next to it: never ``auto``, which joins
        whichever Ray on the machine it finds first."""
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if any(str(self.ray_tmp) in arg for arg in cmdline):
                for arg in cmdline:
                    if arg.startswith("--gcs-address="):
                        return arg.split("=", 1)[1]
        raise RuntimeError(f"no process of this service's Ray ({self.ray_tmp}) names its GCS address")

    def replica_logs(self, deployment: str) -> str:
        """What the replicas of ``deployment`` wrote to their Serve log files (what Ray streams to
        ``serve run``'s output is best effort; these files are complete)."""
        files = sorted(self.ray_tmp.glob(f"ray/session_latest/logs/serve/replica_*_{deployment}_*.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    def metrics_urls(self) -> list[str]:
        """Prometheus endpoints of the Ray nodes, from the file service discovery Ray writes."""
        import json

        sd = json.loads(next(self.ray_tmp.glob("ray/session_latest/prom_metrics_service_discovery.json")).read_text())
        return [f"http://{target}/metrics" for group in sd for target in group["targets"]]

    def scrape_metrics(self, wait_s: float = 30) -> str:
        """Every node's Prometheus text, joined. An endpoint not listening yet (Ray starts its
        exporters beside the node, later on a loaded machine) is asked again for up to ``wait_s``."""
        texts = []
        for url in self.metrics_urls():
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    texts.append(httpx.get(url, timeout=10).text)
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        return "\n".join(texts)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve run shuts the apps (and its own Ray) down on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        kill_processes_mentioning(str(self.ray_tmp))
        if getattr(self, "_log", None):
            self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serve_on_cluster(cluster_address: str, model_dir: Path, deployment_overrides: dict, **config_overrides):
    """``serve run`` of cluster/config.yaml onto a running cluster that this process is a driver of
    (``ray.init(address=...)``), so that :func:`serve_details` and handles see this run's Serve."""
    from ray import serve
    from ray.serve import context

    context._set_global_client(None)  # each `serve run` brings (and takes down) its own Serve instance
    with ServeProcess(
        model_dir,
        cluster_address=cluster_address,
        env={"RAY_DEDUP_LOGS": "0"},  # every replica's log lines, as written: tests read them
        config_overrides=config_overrides,
        deployment_overrides=deployment_overrides,
    ) as svc:
        yield svc
    # serve run's Ctrl-C asks Serve's controller to shut down but waits at most 30 s for it (Serve's
    # own timeout; stop() kills serve run after 60 s): on a loaded machine the controller can outlive
    # it, and the next run on this cluster would deploy into the old instance, which keeps its own
    # HTTP port (the new run's never answers)
    if serve_controller_alive():
        serve.shutdown()
        wait_for(lambda: not serve_controller_alive(), 60, what="Serve's controller to stop")
    context._set_global_client(None)


def serve_controller_alive() -> bool:
    """Whether a Serve instance runs on the cluster this process is a driver of."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def kill_processes_mentioning(marker: str, timeout_s: float = 30) -> None:
    """Stop what is left of a Ray instance: its daemons name their temp dir on the command line."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


# --- Serve's view, from a driver on the service's cluster ---------------------------------------


def serve_client():
    """The Serve controller's client of this driver (connected by ``ray.init`` to the service's cluster)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None, "no Serve controller client: ray.init the service's cluster first"
    return client


def serve_details() -> dict:
    """Serve's own view (what `serve status` / the dashboard show): replicas with node and pid, proxies."""
    return serve_client().get_serve_details()


def replicas(deployment: str, state: str = "RUNNING", app: str = "kalm") -> list[dict]:
    """The replicas of ``deployment`` in ``state``, each as Serve describes it (``replica_id``, ``node_id``, ...)."""
    deployments = serve_details()["applications"][app]["deployments"]
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


# --- load and waiting ----------------------------------------------------------------------------


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
    """``predicate()``'s first true value, asked every ``every_s``; fails after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
