"""The service through the real path: `serve run cluster/config.yaml`, HTTP, the openai client."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import httpx
import numpy as np
import openai
import pytest

from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION
from tests.client_mistakes import CLIENT_MISTAKES, MALFORMED_BODIES, as_sent, over_the_limits
from tests.openai_errors import assert_openai_error

pytestmark = pytest.mark.serve

TEXTS = [
    "What is Ray Serve?",
    "Ray Serve is a scalable model serving library.",
    "东京是日本的首都。",
    "Die Katze schläft auf dem Sofa.",
]


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(tiny_model_dir):
    return tiny_model_dir.name


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def post(service, body, **kwargs) -> httpx.Response:
    return httpx.post(service.base_url + "/v1/embeddings", json=body, timeout=120, **kwargs)


def test_openai_client_default_base64_equals_encoder(client, model_id, tiny_encoder):
    response = client.embeddings.create(model=model_id, input=TEXTS)  # the client asks for base64
    got = vectors(response)
    np.testing.assert_allclose(got, tiny_encoder.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert response.model == model_id
    assert (
        response.usage.prompt_tokens
        == response.usage.total_tokens
        == sum(len(t.ids) for t in tiny_encoder.tokenizer.encode_texts(TEXTS))
    )


def test_explicit_float_equals_base64(client, model_id):
    as_float = vectors(client.embeddings.create(model=model_id, input=TEXTS, encoding_format="float"))
    as_b64 = vectors(client.embeddings.create(model=model_id, input=TEXTS))
    np.testing.assert_array_equal(as_float, as_b64)


def test_base64_is_little_endian_float32(service, model_id, tiny_encoder):
    data = post(service, {"model": model_id, "input": TEXTS[0], "encoding_format": "base64"}).json()["data"]
    raw = base64.b64decode(data[0]["embedding"])
    assert len(raw) == 4 * 64
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), tiny_encoder.encode(TEXTS[0])[0], atol=1e-6)


def test_dimensions_instruction_and_input_type(client, model_id, tiny_encoder):
    got = vectors(
        client.embeddings.create(
            model=model_id, input=TEXTS, dimensions=16, extra_body={"instruction": "Retrieve semantically similar text"}
        )
    )
    np.testing.assert_allclose(
        got, tiny_encoder.encode(TEXTS, instruction="Retrieve semantically similar text", dimensions=16), atol=1e-6
    )
    query = vectors(client.embeddings.create(model=model_id, input=TEXTS[:1], extra_body={"input_type": "query"}))
    np.testing.assert_allclose(query, tiny_encoder.encode(TEXTS[:1], instruction=KALM_QUERY_INSTRUCTION), atol=1e-6)
    doc = vectors(client.embeddings.create(model=model_id, input=TEXTS[:1], extra_body={"input_type": "document"}))
    np.testing.assert_allclose(doc, tiny_encoder.encode(TEXTS[:1]), atol=1e-6)


def test_token_id_inputs_are_openai_cl100k_ids_that_embed_like_their_text(client, model_id, tiny_encoder):
    """As OpenAI's endpoint reads them (token_id_inputs: openai); usage counts the model's tokens."""
    from serve_app.api.token_ids import cl100k_base

    ids = [cl100k_base().encode(t) for t in TEXTS[:2]]
    one = client.embeddings.create(model=model_id, input=ids[0])
    many = client.embeddings.create(model=model_id, input=ids)
    want = tiny_encoder.encode(TEXTS[:2])
    np.testing.assert_allclose(vectors(one)[0], want[0], atol=1e-6)
    np.testing.assert_allclose(vectors(many), want, atol=1e-6)
    assert many.usage.total_tokens == sum(len(t.ids) for t in tiny_encoder.tokenizer.encode_texts(TEXTS[:2]))


def test_single_string_input(client, model_id, tiny_encoder):
    got = vectors(client.embeddings.create(model=model_id, input=TEXTS[2]))
    np.testing.assert_allclose(got, tiny_encoder.encode([TEXTS[2]]), atol=1e-6)


def test_concurrent_requests_each_get_their_own_answer(client, model_id, tiny_encoder):
    cases = [
        (TEXTS[i % 4 :], [None, 8, 32, 64][i % 4], [None, "Find the answer", KALM_QUERY_INSTRUCTION][i % 3])
        for i in range(24)
    ]

    def call(case):
        texts, dims, instruction = case
        extra = {"instruction": instruction} if instruction else None
        kwargs = {"dimensions": dims} if dims else {}
        return vectors(client.embeddings.create(model=model_id, input=texts, extra_body=extra, **kwargs))

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, cases))
    for (texts, dims, instruction), got in zip(cases, results):
        np.testing.assert_allclose(got, tiny_encoder.encode(texts, instruction=instruction, dimensions=dims), atol=1e-6)


def test_over_long_input_is_cut_when_truncate_is_set(client, model_id, tiny_encoder):
    long_text = "word " * 40_000  # > 32768 tokens, the stand-in's limit
    got = vectors(client.embeddings.create(model=model_id, input=long_text, extra_body={"truncate": True}))
    np.testing.assert_allclose(got, tiny_encoder.encode(long_text, truncate=True), atol=1e-5)


# --- other routes ---------------------------------------------------------------------------


def test_models_and_health(service, client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]
    body = httpx.get(service.base_url + "/v1/models").json()
    assert body["object"] == "list" and {"id", "object", "owned_by", "created"} <= set(body["data"][0])
    assert httpx.get(service.base_url + "/health").status_code == 200


def test_request_id_and_timing_headers(service, model_id):
    resp = post(service, {"model": model_id, "input": "hi"}, headers={"x-request-id": "my-id-123"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "my-id-123"
    for header in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert float(resp.headers[header]) >= 0
    assert int(resp.headers["x-compute-tokens"]) == resp.json()["usage"]["total_tokens"]
    assert post(service, {"model": model_id, "input": ""}).headers["x-request-id"]


# --- every client mistake is a 400/404 in OpenAI's shape, never a 500 ----------------------


# the limits of cluster/config.yaml, and the stand-in's own token limit (KaLM v2's)
@pytest.mark.parametrize(
    "body, param, says", CLIENT_MISTAKES + over_the_limits(max_inputs_per_request=2048, max_input_tokens=32_768)
)
def test_client_mistakes_are_400(service, model_id, body, param, says):
    assert_openai_error(post(service, as_sent(body, model_id)), 400, "invalid_request_error", param=param, says=says)


@pytest.mark.parametrize("raw", MALFORMED_BODIES)
def test_malformed_json_and_non_object_body_are_400(service, raw):
    resp = httpx.post(
        service.base_url + "/v1/embeddings", content=raw, timeout=30, headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400, "invalid_request_error")


def test_unknown_model_is_404(service):
    err = assert_openai_error(
        post(service, {"model": "gpt-4", "input": "x"}),
        404,
        "invalid_request_error",
        code="model_not_found",
        param="model",
    )
    assert "gpt-4" in err["message"]


def test_bad_requests_do_not_disturb_good_ones(service, model_id, tiny_encoder):
    bad = [{"model": model_id, "input": [5, 10**9]}, {"model": model_id, "input": ""}, {"model": "nope", "input": "x"}]
    good = {"model": model_id, "input": TEXTS}
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, service, bad[i % 3] if i % 2 else good) for i in range(16)]
        responses = [f.result() for f in futures]
    for i, resp in enumerate(responses):
        if i % 2:
            assert resp.status_code in (400, 404)
        else:
            got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
            np.testing.assert_allclose(got, tiny_encoder.encode(TEXTS), atol=1e-6)
