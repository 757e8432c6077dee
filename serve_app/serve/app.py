"""The Serve application builder named in ``cluster/config.yaml``.

    import_path: serve_app.serve.app:build_app
    args: {...any ServiceConfig field...}

Checks the model can be found before anything starts, so a deploy without the hub
and without a local copy fails at once with a message saying what to do, instead
of replicas crash-looping. Sets what ``serve_app.placement`` decides for this cluster:
encoder replicas on GPUs (every GPU used from the start) where the cluster has GPUs, on
reserved CPUs otherwise, and the ingress's replicas and CPUs, so one YAML serves both.
"""

from __future__ import annotations

import logging
import os

from ray.serve import Application

from .. import placement
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from .autoscaling import encoder_autoscaling_config
from .ingress import EmbeddingsIngress
from .replica import EncoderReplica

log = logging.getLogger("ray.serve")


def build_app(args: dict | None = None) -> Application:
    config = ServiceConfig(**(args or {}))
    files = read_model_files(config.model)  # raises ModelLoadError with the way out
    config = config.model_copy(update={"model": str(files.path)} if os.path.isdir(config.model) else {})
    resources = placement.encoder_replica_resources(config.device, config.encoder_num_cpus, config.encoder_num_gpus)
    initial, most = placement.encoder_replica_counts(config.device, config.encoder_num_gpus)
    ingress = placement.ingress_options(config.device, config.encoder_num_gpus)
    log.info(
        "building app: model=%s model_id=%s encoder replicas: %d at start (at most %d), resources %s; ingress: %s",
        config.model,
        config.model_id,
        initial,
        most,
        resources,
        ingress,
    )
    # @serve.deployment turns the classes into Deployments; Ray Serve's typing does not say so
    encoder = EncoderReplica.options(  # type: ignore[attr-defined]
        ray_actor_options=resources, autoscaling_config=encoder_autoscaling_config(initial, most)
    ).bind(config.model_dump())
    return EmbeddingsIngress.options(**ingress).bind(encoder, config.model_dump())  # type: ignore[attr-defined]
