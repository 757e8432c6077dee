"""Where encoders run on a Ray cluster: the one place replica and actor resources are decided.

The service's encoder replicas and the corpus job's encoder actors follow the same rule:
GPUs each (``encoder_num_gpus``, 1 by default) where the cluster has GPUs, else a share of a
node's CPUs (torch then runs that many threads, :func:`reserved_cpus`). On GPU clusters the
service starts with every GPU in use and reserves CPUs for the ingress's tokenising; see
:func:`encoder_replica_counts` and :func:`ingress_options`. Imports Ray only inside the
functions, and never torch.
"""

from __future__ import annotations

import math
import os

#: CPU-only clusters: an encoder replica takes a node's CPUs, at most this many (torch threads
#: scale poorly past it; more replicas use a big node better).
MAX_REPLICA_CPUS = 8
#: CPU-only clusters: the corpus job runs about this many encoder actors per node (each holds a
#: copy of the model), of 1 to MAX_REPLICA_CPUS threads each.
CORPUS_ACTORS_PER_NODE = 8
#: GPU clusters: CPUs of a GPU encoder replica (its batching loop, packing, host-to-device copies).
GPU_REPLICA_CPUS = 1
#: Most encoder replicas the service scales to, unless the cluster has more GPUs at deploy time
#: (the Ray autoscaler adds nodes up to it).
MAX_ENCODER_REPLICAS = 8
#: Ingress replicas on CPU-only clusters, and the fewest anywhere: losing a node leaves one.
MIN_INGRESS_REPLICAS = 2
#: GPU clusters: CPUs the ingress reserves per GPU for tokenising, JSON and HTTP. tokenizers
#: encodes ~90k tokens/s per core (docs/gpu.md) and one H200 embeds 430-480k tokens/s with KaLM
#: in bf16 (docs/measurements/2026-11-30-gpu.md): about 5 cores of tokenising per GPU, and one more.
INGRESS_CPUS_PER_GPU = 6


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def node_cpus() -> list[int]:
    """CPUs of each live node (this machine's when Ray is not running)."""
    import ray

    if not ray.is_initialized():
        return [os.cpu_count() or 1]
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def wants_gpu(device: str) -> bool:
    """``device`` (auto | cpu | cuda) on this cluster: one GPU per encoder?"""
    return device == "cuda" or (device == "auto" and cluster_gpus() >= 1)


def encoder_replica_resources(
    device: str, num_cpus: float | None, num_gpus: float = 1.0, cpu_share: float = 1.0
) -> dict:
    """``ray_actor_options`` of a service encoder replica: ``num_gpus`` GPUs (a fraction puts
    several replicas on one GPU) on GPU clusters, else ``num_cpus`` (default: a node's, at most 8;
    ``cpu_share``: the part of a node one of several served models takes, 1/models each)."""
    if wants_gpu(device):
        return {"num_gpus": num_gpus, "num_cpus": GPU_REPLICA_CPUS}
    if num_cpus is not None:
        return {"num_cpus": num_cpus}
    return {"num_cpus": max(1, min(MAX_REPLICA_CPUS, math.floor(max(node_cpus(), default=1) * cpu_share)))}


def encoder_replica_counts(device: str, num_gpus: float = 1.0, gpu_share: float = 1.0) -> tuple[int, int]:
    """Encoder replicas at deploy time and at most: on GPU clusters every GPU there is used at
    once (GPUs / ``num_gpus`` replicas), instead of waiting for load to scale up one by one.
    ``gpu_share``: the part of the GPUs one of several served models starts on (1/models each)."""
    if not wants_gpu(device):
        return 1, MAX_ENCODER_REPLICAS
    fitting = max(1, math.floor(cluster_gpus() * gpu_share / num_gpus + 1e-9))
    return fitting, max(MAX_ENCODER_REPLICAS, fitting)


def ingress_options(device: str, num_gpus: float = 1.0, models: int = 1) -> dict:
    """``num_replicas`` and ``ray_actor_options`` of the ingress deployment.

    CPU-only clusters: two replicas reserving no CPU (the encoders own the cores; tokenising is
    light next to a CPU model). GPU clusters: one replica per GPU (at least two, each its own
    event loop) reserving INGRESS_CPUS_PER_GPU CPUs per GPU between them, as far as the cluster's
    CPUs go once every encoder replica has its own; a cluster too small to give each at least
    one CPU gets the CPU-only answer. ``models``: served models, each starting on its share of the GPUs.
    """
    unreserved = {"num_replicas": MIN_INGRESS_REPLICAS, "ray_actor_options": {"num_cpus": 0}}
    gpus = cluster_gpus() if wants_gpu(device) else 0
    if gpus == 0:
        return unreserved
    replicas = max(MIN_INGRESS_REPLICAS, gpus)
    spare = sum(node_cpus()) - models * encoder_replica_counts(device, num_gpus, 1 / models)[0] * GPU_REPLICA_CPUS
    per_replica = math.floor(2 * min(INGRESS_CPUS_PER_GPU * gpus, spare) / replicas) / 2  # half CPUs
    if per_replica < 1:
        return unreserved
    return {"num_replicas": replicas, "ray_actor_options": {"num_cpus": per_replica}}


def corpus_actor_resources(
    device: str, tokenize_in: str, cpus_per_actor: int | None, max_actors: int | None, gpus_per_actor: float = 1.0
) -> tuple[dict, int, bool]:
    """Ray resources of one corpus encoder actor, how many the pool may grow to, and whether
    the actors tokenise (else CPU tasks do, in front of them). On GPU clusters an actor takes
    ``gpus_per_actor`` GPUs: a fraction puts several on one GPU, as ``encoder_num_gpus`` does
    for the service."""
    if wants_gpu(device):
        fitting = max(1, math.floor(cluster_gpus() / gpus_per_actor + 1e-9))
        return (
            {"num_gpus": gpus_per_actor, "num_cpus": GPU_REPLICA_CPUS},
            max_actors or fitting,
            tokenize_in == "actors",
        )
    in_actors = tokenize_in != "tasks"
    cpus = node_cpus()
    if cpus_per_actor is None:
        cpus_per_actor = max(1, min(MAX_REPLICA_CPUS, max(cpus, default=1) // CORPUS_ACTORS_PER_NODE))
    spare = 0 if in_actors else 1  # tokenising tasks need a CPU of their own
    fitting = sum(max(0, c - spare) // cpus_per_actor for c in cpus)
    return {"num_cpus": cpus_per_actor}, max_actors or max(1, fitting), in_actors


def reserved_cpus() -> int:
    """CPUs Ray reserved for the calling task or actor (at least 1)."""
    return max(1, int(assigned_resources().get("CPU", 0)))


def assigned_resources() -> dict[str, float]:
    """Ray resources reserved for the calling task or actor (``{"CPU": 2.0}``, ``{"CPU": 1.0, "GPU": 1.0}``)."""
    import ray

    return dict(ray.get_runtime_context().get_assigned_resources())
