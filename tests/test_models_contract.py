"""Several models behind one ingress, and rerank / score, in-process: routing, answers and errors.

Two fake encoders stand for two models' encoder deployments (tests/http_fakes.py); the two tiny
stand-ins' tokenizers differ (one appends <|endoftext|>), so their token ids, and the fake vectors
of them, differ too. `serve run cluster/two-models.yaml` is covered in test_two_models.py.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from serve_app.config import ServiceConfig
from tests.http_fakes import FakeEncoder, client_for, fake_vector, make_service
from tests.openai_errors import assert_openai_error

pytestmark = pytest.mark.http

TOKENIZERS: dict = {}
LIMITS = {"max_inputs_per_request": 4, "max_input_tokens": 16, "max_request_tokens": 40}


def run(coro):
    return asyncio.run(coro)


def two_models(first, second, encoders=None, **config):
    """A service of ``first`` (top-level fields) and ``second`` (aliased "new")."""
    models = [{"model": str(first)}, {"model": str(second), "model_aliases": ["new"]}]
    return make_service(first, tokenizers=TOKENIZERS, encoders=encoders, models=models, **config)


def one_model(model_dir, encoder=None, **config):
    return make_service(model_dir, encoder, tokenizers=TOKENIZERS, **config)


async def request(svc, path, body=None, method="POST"):
    async with client_for(svc) as client:
        return await client.request(method, path, json=body)


def vectors_of(tokenizer, texts, prompt=""):
    return np.stack([fake_vector(t.ids) for t in tokenizer.encode_texts(texts, prompt)])


def cosines(queries, documents):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    return q @ d.T


# --- the config ----------------------------------------------------------------------------------


def test_one_model_is_a_list_of_one_and_keeps_its_deployment_name(tiny_model_dir):
    config = ServiceConfig(model=str(tiny_model_dir), dtype="float32")
    assert config.served_models() == [config]
    assert config.encoder_deployment == "KalmEncoder"


def test_models_take_unset_fields_from_the_top_level_and_read_the_environment(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("SECOND_MODEL", "/models/v2.5")
    config = ServiceConfig(
        dtype="bfloat16",
        max_input_tokens=512,
        models=[{"model": str(tiny_model_dir)}, {"model": "${SECOND_MODEL}", "dtype": "float32"}],
    )
    first, second = config.served_models()
    assert (first.model, first.dtype, first.max_input_tokens, first.encoder_deployment) == (
        str(tiny_model_dir),
        "bfloat16",
        512,
        "KalmEncoder",
    )
    assert (second.model, second.dtype, second.max_input_tokens, second.encoder_deployment) == (
        "/models/v2.5",
        "float32",
        512,
        "KalmEncoder2",
    )
    assert first.models == second.models == []


def test_the_two_model_example_config_serves_the_two_models_its_environment_names(monkeypatch, tiny_model_dir):
    import yaml

    from tests.service_harness import ROOT

    monkeypatch.setenv("KALM_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("KALM_MODEL_2", "/models/kalm-v2.5")
    app = yaml.safe_load((ROOT / "cluster" / "two-models.yaml").read_text())["applications"][0]
    served = ServiceConfig(**app["args"]).served_models()
    assert [(m.model, m.encoder_deployment) for m in served] == [
        (str(tiny_model_dir), "KalmEncoder"),
        ("/models/kalm-v2.5", "KalmEncoder2"),
    ]
    assert {d["name"] for d in app["deployments"]} == {"EmbeddingsIngress", "KalmEncoder", "KalmEncoder2"}
    monkeypatch.delenv("KALM_MODEL_2")
    with pytest.raises(ValueError, match="KALM_MODEL_2, which is not set"):
        ServiceConfig(**app["args"])


def test_two_models_may_not_answer_to_the_same_id(tiny_model_dir, tiny_model_dir_no_eos):
    with pytest.raises(ValueError, match="model id 'both'"):
        ServiceConfig(
            models=[
                {"model": str(tiny_model_dir), "model_aliases": ["both"]},
                {"model": str(tiny_model_dir_no_eos), "model_aliases": ["both"]},
            ]
        )


# --- routing -------------------------------------------------------------------------------------


def test_model_routes_each_request_to_its_own_models_replicas(tiny_model_dir, tiny_model_dir_no_eos):
    old, new = FakeEncoder(), FakeEncoder()
    svc = two_models(tiny_model_dir, tiny_model_dir_no_eos, encoders=[old, new])
    first, second = svc.models
    for name, model, encoder, other in (
        (tiny_model_dir.name, first, old, new),
        ("new", second, new, old),  # an alias
    ):
        old.calls.clear(), new.calls.clear()
        resp = run(request(svc, "/v1/embeddings", {"model": name, "input": ["hello there"]}))
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model.id
        got = np.array(resp.json()["data"][0]["embedding"], np.float32)
        np.testing.assert_allclose(got, vectors_of(model.tokenizer, ["hello there"])[0], atol=1e-6)
        assert len(encoder.calls) == 1 and not other.calls
    assert svc.metrics.models == [first.id, second.id]


def test_models_lists_every_served_model_in_config_order(tiny_model_dir, tiny_model_dir_no_eos):
    resp = run(request(two_models(tiny_model_dir, tiny_model_dir_no_eos), "/v1/models", method="GET"))
    assert [m["id"] for m in resp.json()["data"]] == [tiny_model_dir.name, tiny_model_dir_no_eos.name]


def test_an_unknown_model_is_404_naming_the_served_ones(tiny_model_dir, tiny_model_dir_no_eos):
    svc = two_models(tiny_model_dir, tiny_model_dir_no_eos)
    for path, body in (
        ("/v1/embeddings", {"model": "gpt-4", "input": "x"}),
        ("/v1/rerank", {"model": "gpt-4", "query": "q", "documents": ["d"]}),
        ("/v1/score", {"model": "gpt-4", "text_1": "q", "text_2": ["d"]}),
    ):
        err = assert_openai_error(
            run(request(svc, path, body)), 404, "invalid_request_error", "model_not_found", "model"
        )
        assert f"'{tiny_model_dir.name}', '{tiny_model_dir_no_eos.name}'" in err["message"]
    assert set(svc.metrics.models) == {"-"}


def test_health_waits_for_every_model(tiny_model_dir, tiny_model_dir_no_eos):
    svc = two_models(tiny_model_dir, tiny_model_dir_no_eos, encoders=[FakeEncoder(), FakeEncoder(healthy=False)])
    assert run(request(svc, "/health", method="GET")).status_code == 503


# --- rerank --------------------------------------------------------------------------------------

QUERY = "Which city is the capital of Japan?"
DOCUMENTS = ["Tokyo is the capital of Japan.", "Bananas are yellow.", "Kyoto was the capital until 1869.", "Ray"]


def expected_scores(model, query=QUERY, documents=DOCUMENTS, instruction=None):
    """Cosines of the model's (fake) vectors: the query with its query instruction, documents as they are."""
    tokenizer = model.tokenizer
    prompt = tokenizer.request_prompt(instruction, "query", model.config.default_query_instruction)
    return cosines(vectors_of(tokenizer, [query], prompt), vectors_of(tokenizer, documents))[0]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_ranks_documents_by_cosine_similarity_best_first(tiny_model_dir, path):
    svc = one_model(tiny_model_dir)
    resp = run(request(svc, path, {"model": tiny_model_dir.name, "query": QUERY, "documents": DOCUMENTS}))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = expected_scores(svc.models.first)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-want, kind="stable"))
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(want[result["index"]], abs=1e-6)
        assert "document" not in result
    assert body["model"] == tiny_model_dir.name and body["usage"]["total_tokens"] > 0
    assert svc.metrics.requests == [(path, 200)]


def test_rerank_top_n_documents_as_objects_and_return_documents(tiny_model_dir):
    svc = one_model(tiny_model_dir)
    body = {
        "model": tiny_model_dir.name,
        "query": QUERY,
        "documents": [{"text": d} for d in DOCUMENTS],
        "top_n": 2,
        "return_documents": True,
    }
    results = run(request(svc, "/v1/rerank", body)).json()["results"]
    best = list(np.argsort(-expected_scores(svc.models.first), kind="stable")[:2])
    assert [r["index"] for r in results] == best
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[i] for i in best]


def test_the_request_may_give_its_own_query_instruction(tiny_model_dir):
    svc = one_model(tiny_model_dir)
    body = {"model": tiny_model_dir.name, "query": QUERY, "documents": DOCUMENTS, "instruction": "Find the city"}
    results = run(request(svc, "/v1/rerank", body)).json()["results"]
    want = expected_scores(svc.models.first, instruction="Find the city")
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(dict(enumerate(want)), abs=1e-6)


def test_rerank_is_interactive_work_in_one_call_for_the_query_and_documents(tiny_model_dir):
    encoder = FakeEncoder()
    priorities = []
    embed = encoder.embed.call
    encoder.embed.call = lambda ids, priority="bulk": priorities.append(priority) or embed(ids, priority)
    svc = one_model(tiny_model_dir, encoder)
    documents = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"] * 40
    resp = run(request(svc, "/v1/rerank", {"model": tiny_model_dir.name, "query": QUERY, "documents": documents}))
    assert resp.status_code == 200
    assert priorities == ["interactive"]  # above interactive_max_tokens, still interactive


def test_the_cohere_client_reranks(tiny_model_dir):
    cohere = pytest.importorskip("cohere")
    svc = one_model(tiny_model_dir)

    async def go():
        from serve_app.serve.ingress import build_http_app

        transport = httpx.ASGITransport(app=build_http_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=60) as http:
            client = cohere.AsyncClientV2(base_url="http://ingress", api_key="unused", httpx_client=http)
            return await client.rerank(model=tiny_model_dir.name, query=QUERY, documents=DOCUMENTS, top_n=3)

    answer = run(go())
    want = expected_scores(svc.models.first)
    assert [r.index for r in answer.results] == list(np.argsort(-want, kind="stable")[:3])
    assert [r.relevance_score for r in answer.results] == pytest.approx(sorted(want, reverse=True)[:3], abs=1e-6)


# --- score ---------------------------------------------------------------------------------------


def test_score_one_text_against_many_and_pair_by_pair(tiny_model_dir):
    svc = one_model(tiny_model_dir)
    model = svc.models.first
    body = {"model": tiny_model_dir.name, "text_1": QUERY, "text_2": DOCUMENTS}
    answer = run(request(svc, "/v1/score", body)).json()
    assert answer["object"] == "list" and answer["model"] == tiny_model_dir.name
    assert [d["index"] for d in answer["data"]] == [0, 1, 2, 3]
    assert [d["score"] for d in answer["data"]] == pytest.approx(list(expected_scores(model)), abs=1e-6)

    queries = ["q one", "q two"]
    body = {"model": tiny_model_dir.name, "text_1": queries, "text_2": DOCUMENTS[:2]}
    got = [d["score"] for d in run(request(svc, "/v1/score", body)).json()["data"]]
    want = [expected_scores(model, q, [d])[0] for q, d in zip(queries, DOCUMENTS[:2])]
    assert got == pytest.approx(want, abs=1e-6)


# --- their mistakes, in OpenAI's error shape -----------------------------------------------------

MISTAKES = [
    ("/v1/rerank", {"documents": ["d"]}, "query", "missing required parameter"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents", "must not be empty"),
    ("/v1/rerank", {"query": "q", "documents": ["d", ""]}, "documents", "documents[1] is an empty string"),
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 5}, "documents", "at most 4"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, "top_n", "at least 1"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "t"}]}, "documents", None),
    ("/v2/rerank", {"query": "q", "documents": ["d"], "max_tokens_per_doc": 8}, "max_tokens_per_doc", "unrecognized"),
    ("/v2/rerank", {"query": "", "documents": ["d"]}, "query", "empty string"),
    ("/v1/rerank", {"query": "q", "documents": ["word " * 30] * 2}, "input", "more than the limit of 16 tokens"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", "give one text_1, or as many"),
    ("/v1/score", {"text_1": "a", "text_2": []}, "text_2", "must not be empty"),
    ("/v1/score", {"text_1": "a", "text_2": [1, 2]}, "text_2", None),
    ("/v1/score", {"text_1": "a", "text_2": ["b"], "instruction": " "}, "instruction", "must not be empty"),
    ("/v1/score", {"text_1": "a " * 15, "text_2": ["b " * 15] * 2, "truncate": True}, "input", "at most 40"),
]


@pytest.mark.parametrize(("path", "body", "param", "says"), MISTAKES)
def test_rerank_and_score_mistakes_are_400_in_openais_shape(tiny_model_dir, path, body, param, says):
    svc = one_model(tiny_model_dir, **LIMITS)
    resp = run(request(svc, path, {"model": tiny_model_dir.name, **body}))
    assert_openai_error(resp, 400, "invalid_request_error", param=param, says=says)
    assert not svc.encoder.calls


def test_rerank_bodies_are_bounded_like_embeddings(tiny_model_dir):
    svc = one_model(tiny_model_dir, max_body_bytes=1000)
    body = {"model": tiny_model_dir.name, "query": "q", "documents": ["x" * 2000]}
    assert_openai_error(run(request(svc, "/v1/rerank", body)), 413, "invalid_request_error", "payload_too_large")
