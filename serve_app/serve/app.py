"""The Serve application builder named in ``cluster/config.yaml``.

    import_path: serve_app.serve.app:build_app
    args: {...any ServiceConfig field...}

Checks the model can be found before anything starts, so a deploy without the hub
and without a local copy fails at once with a message saying what to do, instead
of replicas crash-looping. One encoder deployment per served model (``ServiceConfig.models``),
all behind the one ingress. Sets what ``serve_app.placement`` decides for this cluster:
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
    served = config.served_models()
    models = []
    share = 1 / len(served)  # of the GPUs, or of a node's CPUs, each model starts on
    for model in served:
        files = read_model_files(model.model)  # raises ModelLoadError with the way out
        model = model.model_copy(update={"model": str(files.path)} if os.path.isdir(model.model) else {})
        resources = placement.encoder_replica_resources(
            model.device, model.encoder_num_cpus, model.encoder_num_gpus, share
        )
        initial, most = placement.encoder_replica_counts(model.device, model.encoder_num_gpus, share)
        log.info(
            "building app: model=%s model_id=%s deployment=%s encoder replicas: %d at start (at most %d), resources %s",
            model.model,
            model.model_id,
            model.encoder_deployment,
            initial,
            most,
            resources,
        )
        # @serve.deployment turns the classes into Deployments; Ray Serve's typing does not say so
        encoder = EncoderReplica.options(  # type: ignore[attr-defined]
            name=model.encoder_deployment,
            ray_actor_options=resources,
            autoscaling_config=encoder_autoscaling_config(initial, most),
        ).bind(model.model_dump())
        models.append((encoder, model.model_dump()))
    ingress = placement.ingress_options(config.device, config.encoder_num_gpus, len(served))
    log.info("building app: ingress %s", ingress)
    return EmbeddingsIngress.options(**ingress).bind(config.model_dump(), models)  # type: ignore[attr-defined]
