"""API keys, configured limits and overload answers, through `serve run` with a tuned YAML."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import openai
import pytest
from sentence_transformers.quantization import quantize_embeddings

from serve_app.core.quantization import CalibrationRanges
from tests.openai_errors import assert_openai_error
from tests.service_harness import ServeProcess

pytestmark = pytest.mark.serve

KEY = "sk-test-key-1"
# Token ids here are the model's own (vLLM's reading), so a list of ids is that many tokens.
LIMITS = {
    "max_body_bytes": 20_000,
    "max_inputs_per_request": 4,
    "max_input_tokens": 16,
    "max_request_tokens": 40,
    "token_id_inputs": "model",
}


@pytest.fixture(scope="module")
def calibration_sample() -> np.ndarray:
    """Unit vectors of the tiny model's width, standing in for a corpus sample."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((300, 64)).astype(np.float32)
    return sample / np.linalg.norm(sample, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory, calibration_sample):
    ranges = tmp_path_factory.mktemp("calibration") / "_calibration.json"
    ranges.write_bytes(CalibrationRanges.from_sample(calibration_sample, [64, 32], "tiny").to_json())
    config = {**LIMITS, "calibration_ranges": str(ranges)}
    with ServeProcess(tiny_model_dir, env={"KALM_API_KEYS": f"other-key, {KEY}"}, config_overrides=config) as svc:
        yield svc


@pytest.fixture(scope="module")
def model_id(tiny_model_dir):
    return tiny_model_dir.name


def post(service, body, key=KEY, **kwargs):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service.base_url + "/v1/embeddings", json=body, headers=headers, timeout=60, **kwargs)


def test_api_key_required_when_configured(service, model_id):
    for key in (None, "wrong"):
        assert_openai_error(
            post(service, {"model": model_id, "input": "hi"}, key=key),
            401,
            "authentication_error",
            code="invalid_api_key",
        )
    assert httpx.get(service.base_url + "/v1/models").status_code == 401
    good = openai.OpenAI(base_url=service.base_url + "/v1", api_key=KEY, max_retries=0)
    assert len(good.embeddings.create(model=model_id, input="hi").data[0].embedding) == 64
    assert good.models.list().data[0].id == model_id
    assert httpx.get(service.base_url + "/health").status_code == 200  # probes need no key


def test_body_over_the_byte_limit_is_413(service, model_id):
    resp = post(service, {"model": model_id, "input": "x" * 30_000})
    assert_openai_error(resp, 413, "invalid_request_error", says="20000 bytes")


def test_too_many_inputs(service, model_id):
    assert_openai_error(
        post(service, {"model": model_id, "input": ["a"] * 5}),
        400,
        "invalid_request_error",
        param="input",
        says="at most 4",
    )


def test_over_long_input_gives_limit_and_length_unless_truncated(service, model_id):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    err = assert_openai_error(
        post(service, {"model": model_id, "input": text}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
        param="input",
    )
    assert "limit of 16" in err["message"] and "17 tokens" in err["message"]
    ok = post(service, {"model": model_id, "input": text, "truncate": True})
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 16
    ids = list(range(100, 120))
    assert_openai_error(
        post(service, {"model": model_id, "input": ids}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
        says="20 tokens",
    )
    assert post(service, {"model": model_id, "input": ids, "truncate": True}).json()["usage"]["total_tokens"] == 16


def test_too_many_tokens_per_request(service, model_id):
    body = {"model": model_id, "input": ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"] * 4}
    assert_openai_error(post(service, body), 400, "invalid_request_error", says="at most 40")


@pytest.fixture(scope="module")
def overload_service(tiny_model_dir, service):
    # One request at a time per replica, two waiting: everything past that is refused at once.
    with ServeProcess(
        tiny_model_dir, deployment_overrides={"KalmEncoder": {"max_ongoing_requests": 1, "max_queued_requests": 2}}
    ) as svc:
        yield svc


def test_overload_gets_fast_retryable_503_and_admitted_requests_succeed(overload_service, model_id):
    body = {"model": model_id, "input": ["lorem ipsum dolor sit amet " * 100] * 16}

    def call(_):
        started = time.perf_counter()
        resp = httpx.post(overload_service.base_url + "/v1/embeddings", json=body, timeout=120)
        return resp, time.perf_counter() - started

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    overloaded = [(r, s) for r, s in results if r.status_code == 503]
    admitted = [r for r, _ in results if r.status_code == 200]
    assert overloaded and admitted
    assert all(r.status_code in (200, 503) for r, _ in results)
    for resp, _ in overloaded:
        assert_openai_error(resp, 503, "rate_limit_error", code="overloaded")
        assert int(resp.headers["retry-after"]) >= 1
    for resp in admitted:
        vectors = np.array([d["embedding"] for d in resp.json()["data"]])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    print(
        f"overload: {len(overloaded)} refused (max {max(s for _, s in overloaded) * 1e3:.0f} ms), "
        f"{len(admitted)} admitted"
    )


def test_the_cohere_client_gets_every_type_from_the_served_model(service, model_id, calibration_sample):
    """cohere.ClientV2 against `serve run` with a calibration file in the YAML: every type, each
    exactly sentence-transformers' quantize_embeddings of the float vectors with the same ranges."""
    import cohere

    texts = ["What is Ray Serve?", "东京是日本的首都。"]
    co = cohere.ClientV2(base_url=service.base_url, api_key=KEY, timeout=60)
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    answer = co.embed(
        model=model_id, texts=texts, input_type="search_document", embedding_types=types, output_dimension=32
    )
    got = np.array(answer.embeddings.float_, np.float32)
    v1 = post(service, {"model": model_id, "input": texts, "dimensions": 32, "input_type": "document"}).json()
    want = np.array([d["embedding"] for d in v1["data"]], np.float32)
    assert (np.sum(got * want, axis=1) >= 0.999999).all()  # the vectors /v1/embeddings gives
    ranges = CalibrationRanges.from_sample(calibration_sample, [32], "tiny").ranges[32]
    for t in types[1:]:
        expected = quantize_embeddings(got, precision=t, ranges=ranges)
        assert np.array(getattr(answer.embeddings, t)).astype(expected.dtype).tobytes() == expected.tobytes(), t
