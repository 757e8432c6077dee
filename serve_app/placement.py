"""Where encoders run on a Ray cluster: the one place replica and actor resources are decided.

The service's encoder replicas and the corpus job's encoder actors follow the same rule:
one GPU each where the cluster has GPUs, else a share of a node's CPUs (torch then runs
that many threads, :func:`reserved_cpus`). Imports Ray only inside the functions, and
never torch.
"""

from __future__ import annotations

import os

#: CPU-only clusters: an encoder replica takes a node's CPUs, at most this many (torch threads
#: scale poorly past it; more replicas use a big node better).
MAX_REPLICA_CPUS = 8
#: CPU-only clusters: the corpus job runs about this many encoder actors per node (each holds a
#: copy of the model), of 1 to MAX_REPLICA_CPUS threads each.
CORPUS_ACTORS_PER_NODE = 8


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


def encoder_replica_resources(device: str, num_cpus: float | None) -> dict:
    """``ray_actor_options`` of a service encoder replica."""
    if wants_gpu(device):
        return {"num_gpus": 1, "num_cpus": 1}
    if num_cpus is not None:
        return {"num_cpus": num_cpus}
    return {"num_cpus": max(1, min(MAX_REPLICA_CPUS, max(node_cpus(), default=1)))}


def corpus_actor_resources(
    device: str, tokenize_in: str, cpus_per_actor: int | None, max_actors: int | None
) -> tuple[dict, int, bool]:
    """Ray resources of one corpus encoder actor, how many the pool may grow to, and whether
    the actors tokenise (else CPU tasks do, in front of them)."""
    if wants_gpu(device):
        return {"num_gpus": 1, "num_cpus": 1}, max_actors or max(1, cluster_gpus()), tokenize_in == "actors"
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
