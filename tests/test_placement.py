"""Where encoders and the ingress run (serve_app.placement), decided without a GPU: the cluster is faked."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app import placement
from serve_app.config import ServiceConfig


@pytest.fixture
def cluster(monkeypatch):
    """Pretend Ray sees nodes with these CPUs and this many GPUs in all."""

    def make(gpus: int, cpus: list[int]):
        monkeypatch.setattr(placement, "cluster_gpus", lambda: gpus)
        monkeypatch.setattr(placement, "node_cpus", lambda: cpus)

    return make


def test_an_encoder_replica_takes_a_fraction_of_a_gpu_when_asked(cluster):
    cluster(gpus=4, cpus=[64])
    assert placement.encoder_replica_resources("auto", None) == {"num_gpus": 1.0, "num_cpus": 1}
    assert placement.encoder_replica_resources("auto", None, num_gpus=0.5) == {"num_gpus": 0.5, "num_cpus": 1}
    assert placement.encoder_replica_resources("cpu", 4, num_gpus=0.5) == {"num_cpus": 4}  # device cpu: no GPU


def test_a_multi_gpu_cluster_is_used_from_the_start(cluster):
    cluster(gpus=4, cpus=[64])
    assert placement.encoder_replica_counts("auto") == (4, 8)
    assert placement.encoder_replica_counts("auto", num_gpus=0.5) == (8, 8)
    assert placement.encoder_replica_counts("auto", num_gpus=0.3) == (13, 13)  # 4 / 0.3 = 13.3
    cluster(gpus=16, cpus=[128, 128])
    assert placement.encoder_replica_counts("auto") == (16, 16)  # never capped below what is there


def test_without_gpus_one_replica_starts_and_autoscaling_adds_more(cluster):
    cluster(gpus=0, cpus=[2])
    assert placement.encoder_replica_counts("auto") == (1, placement.MAX_ENCODER_REPLICAS)
    assert placement.encoder_replica_resources("auto", None) == {"num_cpus": 2}


def test_the_ingress_reserves_tokenising_cpus_per_gpu(cluster):
    cluster(gpus=8, cpus=[96])  # one 8-GPU node: 8 encoder replicas with 1 CPU each, 88 CPUs to spare
    assert placement.ingress_options("auto") == {"num_replicas": 8, "ray_actor_options": {"num_cpus": 6}}
    cluster(gpus=1, cpus=[8, 4])  # a CPU head and one small GPU worker: 6 CPUs for 1 GPU, over 2 replicas
    assert placement.ingress_options("auto") == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 3}}


def test_the_ingress_takes_what_cpus_are_left_on_a_small_gpu_box(cluster):
    cluster(gpus=1, cpus=[4])  # 1 CPU for the encoder, 3 left: 1.5 for each ingress replica
    assert placement.ingress_options("auto") == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1.5}}
    cluster(gpus=3, cpus=[1, 1, 1, 1])  # every CPU but one taken by an encoder: nothing to reserve
    assert placement.ingress_options("auto") == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}


def test_without_gpus_the_ingress_reserves_nothing(cluster):
    cluster(gpus=0, cpus=[32])
    assert placement.ingress_options("auto") == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}
    cluster(gpus=4, cpus=[32])
    assert placement.ingress_options("cpu") == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}


@pytest.mark.parametrize("num_gpus", [0, -0.5, 1.5])
def test_encoder_num_gpus_is_a_share_of_one_gpu(num_gpus):
    with pytest.raises(ValidationError):
        ServiceConfig(model="m", encoder_num_gpus=num_gpus)
    assert ServiceConfig(model="m", encoder_num_gpus=0.25).encoder_num_gpus == 0.25


def test_corpus_encoder_actors_share_a_gpu_when_asked(cluster):
    cluster(gpus=2, cpus=[32])
    assert placement.corpus_actor_resources("auto", "auto", None, None) == ({"num_gpus": 1, "num_cpus": 1}, 2, False)
    resources, actors, _ = placement.corpus_actor_resources("auto", "auto", None, None, gpus_per_actor=0.5)
    assert resources == {"num_gpus": 0.5, "num_cpus": 1} and actors == 4
