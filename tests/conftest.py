"""Shared fixtures: stand-in checkpoints built once per test session."""

from __future__ import annotations

import os

import pytest

from serve_app.testing.standin import write_standin

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray APIs never start or join a Ray by themselves in test processes: every test names its cluster.
# (A Serve handle's background metrics push calls ray.wait, which would otherwise ray.init() after
# its cluster is gone, onto whatever Ray the machine runs then, or a new one.)
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# fp32 everywhere (services and jobs the tests start inherit it), so paths can be compared to 1e-6;
# dtype "auto" and bf16 have their own tests.
os.environ.setdefault("KALM_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny KaLM-shaped stand-in whose tokenizer appends <|endoftext|> (like v2.5)."""
    return write_standin(tmp_path_factory.mktemp("tiny-eos"), size="tiny", append_eos=True, seed=1)


@pytest.fixture(scope="session")
def tiny_model_dir_no_eos(tmp_path_factory):
    """Same weights, tokenizer without a post-processor token (how v2 may ship)."""
    return write_standin(tmp_path_factory.mktemp("tiny-noeos"), size="tiny", append_eos=False, seed=1)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from serve_app import Encoder

    return Encoder.from_pretrained(tiny_model_dir, device="cpu")
