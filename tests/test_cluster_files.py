"""The files for running on many machines (cluster/): they parse, validate, and agree with each other."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from serve_app import placement
from serve_app.serve.autoscaling import encoder_autoscaling_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


# --- cluster/config.yaml ------------------------------------------------------------------


def test_serve_config_scales_out_and_still_starts_one_replica_on_a_laptop():
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = load("config.yaml")
    ServeDeploySchema.model_validate(config)
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["port"] == 8000
    assert config["applications"][0]["args"]["request_timeout_s"] > 0  # nothing hangs forever
    ingress, encoder = deployment(config, "EmbeddingsIngress"), deployment(config, "KalmEncoder")
    # replica counts and resources are left to serve_app.placement, which sees the cluster
    assert not {"num_replicas", "ray_actor_options"} & set(ingress)
    assert not {"num_replicas", "ray_actor_options", "autoscaling_config"} & set(encoder)
    # what it decides on a laptop (no Ray running: no GPU)
    ingress_options = placement.ingress_options("auto")
    assert ingress_options == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}
    autoscaling = AutoscalingConfig(**encoder_autoscaling_config(*placement.encoder_replica_counts("auto")))
    assert autoscaling.min_replicas == autoscaling.initial_replicas == 1 < autoscaling.max_replicas
    # bounded queues everywhere: at the proxies (for the ingress) and at the ingress (for the encoders)
    assert 0 < ingress["max_queued_requests"] and 0 < encoder["max_queued_requests"]
    # the ingress never caps the encoders' scaling signal
    assert (
        ingress_options["num_replicas"] * ingress["max_ongoing_requests"]
        >= autoscaling.target_ongoing_requests * autoscaling.max_replicas
    )
    policy = _resolve_policy_callable(autoscaling.policy)
    assert type(policy).__name__ == "TokenBacklogPolicy" and policy.target_batches == 4


# --- KubeRay ------------------------------------------------------------------------------


def test_kuberay_serve_config_is_the_serve_config():
    manifest = load("kuberay-rayservice.yaml")
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config = load("config.yaml")
    assert served["http_options"].pop("host") == "0.0.0.0"  # the one allowed difference
    config["http_options"].pop("host")
    assert served == config, "run: python cluster/sync_kuberay.py"
    check = subprocess.run(
        [sys.executable, str(CLUSTER / "sync_kuberay.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout  # comments too: the text is config.yaml's


def test_kuberay_manifest_has_a_gpu_group_sized_for_the_encoder():
    manifest = load("kuberay-rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}-" in (CLUSTER / "Dockerfile").read_text()
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert 1 <= gpu["minReplicas"] and gpu["maxReplicas"] == placement.MAX_ENCODER_REPLICAS
    for pod in (cluster["headGroupSpec"]["template"], gpu["template"]):
        env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert {"KALM_MODEL", "KALM_API_KEYS"} <= env


# --- Ray cluster launcher (AWS) -----------------------------------------------------------


def test_aws_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("aws-gpu.yaml")
    config = prepare_config(raw)  # fills Ray's AWS defaults, as `ray up` does
    validate_config(config)  # Ray's JSON schema for cluster configs
    nodes = config["available_node_types"]
    head, gpu = nodes[config["head_node_type"]], nodes["gpu_worker"]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["min_workers"] >= 1
    assert gpu["max_workers"] == config["max_workers"] == placement.MAX_ENCODER_REPLICAS
    setup = "\n".join(config["setup_commands"])
    assert "torch==" in setup and "pip install -q -e ~/kalm-serve" in setup
    assert config["file_mounts"]["~/kalm-serve"] == "."


# --- cluster/local_cluster.py ---------------------------------------------------------------


def test_local_cluster_state_file_is_never_seen_half_written(tmp_path, monkeypatch):
    """The commands poll the state file while the cluster rewrites it (kill-gcs, start-gcs)."""
    import importlib.util
    import threading

    spec = importlib.util.spec_from_file_location("local_cluster", CLUSTER / "local_cluster.py")
    local_cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_cluster)
    monkeypatch.setattr(local_cluster, "STATE", tmp_path / "state.json")
    state = {"pid": 1, "gcs": "up", "temp_dir": "/tmp/" + "x" * 4000}
    local_cluster._write_state(state)
    done = threading.Event()

    def rewrite():
        for i in range(3000):
            local_cluster._write_state({**state, "gcs": ("up", "down")[i % 2]})
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = 0
    while not done.is_set():
        assert local_cluster._read_state()["gcs"] in ("up", "down")
        reads += 1
    writer.join()
    assert reads > 0 and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _ray_view(env: dict) -> dict:
    code = (
        "import json, ray; ray.init(logging_level='ERROR'); "
        "print(json.dumps({'gpus': ray.cluster_resources().get('GPU', 0), "
        "'alive': sum(n['Alive'] for n in ray.nodes())}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_local_cluster_script_starts_workers_with_gpu_slots_survives_its_gcs_and_stops_cleanly(
    tmp_path, tiny_model_dir
):
    import psutil

    script = str(CLUSTER / "local_cluster.py")
    env = {**os.environ, "KALM_LOCAL_CLUSTER_STATE": str(tmp_path / "state.json")}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, script, "start", "--workers", "2", "--model", str(tiny_model_dir), "--redis"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    text = ""
    try:
        deadline = time.monotonic() + 180
        while "READY" not in text:
            assert proc.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(1)
            text = (tmp_path / "out.txt").read_text()
        exports = re.search(r"export (RAY_ADDRESS=\S+) (RAY_AUTH_MODE=\S+) (RAY_AUTH_TOKEN=\S+)", text)
        assert exports and "serve run cluster/config.yaml" in text and str(tiny_model_dir) in text
        client_env = {**env, **dict(kv.split("=", 1) for kv in exports.groups())}
        assert _ray_view(client_env) == {"gpus": 2.0, "alive": 3}
        assert "GCS fault tolerance: on, Redis at 127.0.0.1:" in text
        # the GCS dies and comes back: it finds the cluster it left in Redis
        for command in ("kill-gcs", "start-gcs"):
            subprocess.run([sys.executable, script, command], env=env, check=True, timeout=60)
        assert _ray_view(client_env) == {"gpus": 2.0, "alive": 3}
        temp_dir = json.loads((tmp_path / "state.json").read_text())["temp_dir"]
        subprocess.run([sys.executable, script, "remove-worker"], env=env, check=True, timeout=30)
        deadline = time.monotonic() + 60
        while _ray_view(client_env) != {"gpus": 1.0, "alive": 2}:
            assert time.monotonic() < deadline, "worker not removed"
            time.sleep(2)
        stop = subprocess.run([sys.executable, script, "stop"], env=env, capture_output=True, text=True, timeout=150)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
    assert not (tmp_path / "state.json").exists()
    left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    assert not left, [" ".join(p.info["cmdline"])[:200] for p in left]
