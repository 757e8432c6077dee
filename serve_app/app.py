"""The Serve application builder named in ``cluster/config.yaml``.

    import_path: serve_app.app:build_app
    args: {...any ServiceConfig field...}

Checks the model can be found before anything starts, so a deploy without the hub
and without a local copy fails at once with a message saying what to do, instead
of replicas crash-looping. Places encoder replicas on a GPU each where the cluster
has GPUs, and on reserved CPUs otherwise, so one YAML serves both.
"""

from __future__ import annotations

import logging
import os

from ray.serve import Application

from .checkpoint import read_model_files
from .config import ServiceConfig
from .ingress import EmbeddingsIngress
from .replica import KalmEncoder

log = logging.getLogger("ray.serve")

MAX_DEFAULT_CPU_THREADS = 8


def encoder_resources(config: ServiceConfig) -> dict:
    """ray_actor_options for an encoder replica on this cluster."""
    import ray

    resources = ray.cluster_resources() if ray.is_initialized() else {}
    if config.device != "cpu" and resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    if config.encoder_num_cpus is not None:
        return {"num_cpus": config.encoder_num_cpus}
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    largest = max(node_cpus, default=os.cpu_count() or 1)
    return {"num_cpus": max(1, min(MAX_DEFAULT_CPU_THREADS, int(largest)))}


def build_app(args: dict | None = None) -> Application:
    config = ServiceConfig(**(args or {}))
    files = read_model_files(config.model)  # raises ModelLoadError with the way out
    config = config.model_copy(update={"model": str(files.path)} if os.path.isdir(config.model) else {})
    options = encoder_resources(config)
    log.info("building app: model=%s model_id=%s encoder replica resources=%s", config.model, config.model_id, options)
    encoder = KalmEncoder.options(ray_actor_options=options).bind(config.model_dump())
    return EmbeddingsIngress.bind(encoder, config.model_dump())
