"""The Serve application builder named in ``cluster/config.yaml``.

    import_path: serve_app.serve.app:build_app
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

from .. import placement
from ..config import ServiceConfig
from ..core.checkpoint import read_model_files
from .ingress import EmbeddingsIngress
from .replica import KalmEncoder

log = logging.getLogger("ray.serve")


def build_app(args: dict | None = None) -> Application:
    config = ServiceConfig(**(args or {}))
    files = read_model_files(config.model)  # raises ModelLoadError with the way out
    config = config.model_copy(update={"model": str(files.path)} if os.path.isdir(config.model) else {})
    options = placement.encoder_replica_resources(config.device, config.encoder_num_cpus)
    log.info("building app: model=%s model_id=%s encoder replica resources=%s", config.model, config.model_id, options)
    # @serve.deployment turns the classes into Deployments; Ray Serve's typing does not say so
    encoder = KalmEncoder.options(ray_actor_options=options).bind(config.model_dump())  # type: ignore[attr-defined]
    return EmbeddingsIngress.bind(encoder, config.model_dump())  # type: ignore[attr-defined]
