"""`serve run cluster/two-models.yaml` with two different stand-ins: one service for the module.

The two tiny stand-ins differ in weights (seeds 1 and 2) and tokenizer (one appends <|endoftext|>),
so a vector from the wrong model could not pass for the right one. Each model's answers are
compared with its own ``Encoder.encode`` in this process (fp32).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from serve_app import Encoder
from serve_app.testing.standin import write_standin
from tests.service_harness import ROOT, Load, ServeProcess, wait_for

pytestmark = pytest.mark.serve

CONFIG = ROOT / "cluster" / "two-models.yaml"
QUERY = "Which city is the capital of Japan?"
DOCUMENTS = ["Tokyo is the capital of Japan.", "Bananas are yellow.", "Kyoto was the capital until 1869."]

#: Each encoder deployment's replica stats, read by a driver on the service's Ray (printed as JSON).
STATS = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR")
out = {name: serve.get_deployment_handle(name, app_name="kalm").stats.remote().result() for name in sys.argv[2:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("tiny-second"), size="tiny", append_eos=False, seed=2)


@pytest.fixture(scope="module")
def service(tiny_model_dir, second_model_dir):
    with ServeProcess(tiny_model_dir, env={"KALM_MODEL_2": str(second_model_dir)}, config_file=CONFIG) as svc:
        yield svc


@pytest.fixture(scope="module")
def encoders(tiny_model_dir, second_model_dir):
    return {
        d.name: Encoder.from_pretrained(d, device="cpu", dtype="float32") for d in (tiny_model_dir, second_model_dir)
    }


def replica_stats(service) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-c", STATS, service.gcs_address(), "KalmEncoder", "KalmEncoder2"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_models_lists_both(service, tiny_model_dir, second_model_dir):
    models = httpx.get(service.base_url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [tiny_model_dir.name, second_model_dir.name]


def test_each_model_answers_with_its_own_vectors_on_its_own_replicas(service, encoders):
    texts = ["What is Ray Serve?", "东京是日本的首都。"]
    first, second = encoders.values()
    assert not np.allclose(first.encode(texts), second.encode(texts), atol=1e-3)  # the two models differ
    before = replica_stats(service)
    for name, encoder in encoders.items():
        resp = httpx.post(service.base_url + "/v1/embeddings", json={"model": name, "input": texts}, timeout=120)
        assert resp.status_code == 200, resp.text
        got = np.array([d["embedding"] for d in resp.json()["data"]], np.float32)
        np.testing.assert_allclose(got, encoder.encode(texts), atol=1e-6)  # only its own weights give these
    after = replica_stats(service)
    # one call on each model's replica and no other: neither request computed on the other model's replica
    assert {after[d]["model"]: after[d]["calls"] - before[d]["calls"] for d in after} == {name: 1 for name in encoders}


def expected_scores(encoder, query, documents):
    q = encoder.encode([query], prompt_name="query")
    d = encoder.encode(documents)
    return (q / np.linalg.norm(q, axis=1, keepdims=True) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T)[0]


def test_rerank_and_score_are_cosines_of_the_models_own_vectors(service, encoders):
    cohere = pytest.importorskip("cohere")
    for name, encoder in encoders.items():
        want = expected_scores(encoder, QUERY, DOCUMENTS)
        answer = cohere.ClientV2(base_url=service.base_url, api_key="unused").rerank(
            model=name, query=QUERY, documents=DOCUMENTS
        )
        assert [r.index for r in answer.results] == list(np.argsort(-want, kind="stable"))
        assert [r.relevance_score for r in answer.results] == pytest.approx(sorted(want, reverse=True), abs=1e-5)

        body = {"model": name, "text_1": QUERY, "text_2": DOCUMENTS}
        score = httpx.post(service.base_url + "/v1/score", json=body, timeout=120).json()
        assert [d["score"] for d in score["data"]] == pytest.approx(list(want), abs=1e-5)


def test_losing_one_models_replica_leaves_the_others_requests_untouched(service, tiny_model_dir):
    victim = replica_stats(service)["KalmEncoder2"]["pid"]
    url = service.base_url + "/v1/embeddings"
    with Load(url, {"model": tiny_model_dir.name, "input": ["steady traffic"] * 4}, threads=2) as load:
        wait_for(lambda: len(load.results) >= 3, 120, what="first answers")
        os.kill(victim, signal.SIGKILL)
        n = len(load.results)
        wait_for(lambda: len(load.results) >= n + 10, 120, what="answers after the kill")
    assert load.failures == [] and load.statuses() == {200: len(load.results)}
