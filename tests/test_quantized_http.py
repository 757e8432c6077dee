"""Quantised embeddings over HTTP in-process: ``embedding_type`` on /v1/embeddings and Cohere's /v2/embed.

The ingress's app over httpx's ASGI transport with the fake encoder (tests/http_fakes.py): the
float vectors are the fake's, and every quantised type must be sentence-transformers'
``quantize_embeddings`` of them, bit for bit, with the ranges of the service's calibration file.
"""

from __future__ import annotations

import asyncio
import base64

import cohere
import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings
from starlette.testclient import TestClient

from serve_app.core.quantization import CalibrationRanges
from serve_app.serve.ingress import build_http_app
from tests.http_fakes import client_for, fake_vector, make_service
from tests.openai_errors import assert_openai_error

pytestmark = pytest.mark.http

KEY = "sk-test"
TEXTS = ["What is Ray Serve?", "东京是日本的首都。", "a third text"]
TOKENIZERS: dict = {}
CALIBRATED_DIMS = [64, 32, 16]


@pytest.fixture(scope="module")
def calibration_sample() -> np.ndarray:
    return np.stack([fake_vector([i, i + 1]) for i in range(300)])


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, calibration_sample):
    path = tmp_path_factory.mktemp("calibration") / "_calibration.json"
    path.write_bytes(CalibrationRanges.from_sample(calibration_sample, CALIBRATED_DIMS, "tiny").to_json())
    return str(path)


def service(model_dir, **config):
    return make_service(model_dir, tokenizers=TOKENIZERS, **config)


def post(svc, path, body, headers=None):
    async def go():
        async with client_for(svc) as client:
            return await client.post(path, json=body, headers=headers)

    return asyncio.run(go())


def floats(svc, model_dir, texts=TEXTS, dimensions=None, **fields) -> np.ndarray:
    """What /v1/embeddings answers in float: the reference every type is computed from."""
    body = {"model": model_dir.name, "input": texts, "dimensions": dimensions, **fields}
    resp = post(svc, "/v1/embeddings", body)
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], np.float32)


def reference(vectors: np.ndarray, embedding_type: str, sample: np.ndarray) -> np.ndarray:
    if embedding_type == "float":
        return vectors
    cut = CalibrationRanges.from_sample(sample, [vectors.shape[1]], "x").ranges[vectors.shape[1]]
    return quantize_embeddings(vectors, precision=embedding_type, ranges=cut)


TYPES = ["int8", "uint8", "binary", "ubinary"]


# --- /v1/embeddings: embedding_type -------------------------------------------------------


@pytest.mark.parametrize("dimensions", [None, 16])
@pytest.mark.parametrize("embedding_type", TYPES)
def test_v1_embedding_type_is_quantize_embeddings_of_the_float_vectors(
    tiny_model_dir, calibration_file, calibration_sample, embedding_type, dimensions
):
    svc = service(tiny_model_dir, calibration_ranges=calibration_file)
    want = reference(floats(svc, tiny_model_dir, dimensions=dimensions), embedding_type, calibration_sample)
    body = {"model": tiny_model_dir.name, "input": TEXTS, "dimensions": dimensions, "embedding_type": embedding_type}
    listed = post(svc, "/v1/embeddings", body).json()["data"]
    assert np.array([d["embedding"] for d in listed]).astype(want.dtype).tobytes() == want.tobytes()
    packed = post(svc, "/v1/embeddings", {**body, "encoding_format": "base64"}).json()["data"]
    raw = [base64.b64decode(d["embedding"]) for d in packed]  # the raw bytes: packed bits for binary types
    assert b"".join(raw) == want.tobytes() and len(raw[0]) == want.shape[1]


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"embedding_type": "int4"}, "embedding_type", None),
        ({"embedding_type": "binary", "dimensions": 12}, "dimensions", "multiple of 8"),
        ({"embedding_type": "int8", "dimensions": 8}, "dimensions", "for 16, 32, 64 dimensions"),
    ],
)
def test_v1_types_it_cannot_give_are_400(tiny_model_dir, calibration_file, fields, param, says):
    svc = service(tiny_model_dir, calibration_ranges=calibration_file)
    resp = post(svc, "/v1/embeddings", {"model": tiny_model_dir.name, "input": "x", **fields})
    assert_openai_error(resp, 400, "invalid_request_error", param=param, says=says)


@pytest.mark.parametrize("embedding_type", ["int8", "uint8"])
def test_int8_without_calibration_ranges_is_a_400_saying_how_to_get_them(tiny_model_dir, embedding_type):
    resp = post(
        service(tiny_model_dir),
        "/v1/embeddings",
        {"model": tiny_model_dir.name, "input": "x", "embedding_type": embedding_type},
    )
    err = assert_openai_error(resp, 400, "invalid_request_error", param="embedding_type")
    assert "corpus job" in err["message"] and "calibration_ranges" in err["message"]


# --- POST /v2/embed ---------------------------------------------------------------------


def test_v2_embed_answers_every_type_asked_in_cohere_shape(tiny_model_dir, calibration_file, calibration_sample):
    svc = service(tiny_model_dir, calibration_ranges=calibration_file)
    types = ["float", *TYPES]
    body = {"model": tiny_model_dir.name, "texts": TEXTS, "input_type": "search_document", "embedding_types": types}
    resp = post(svc, "/v2/embed", body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert set(answer) == {"id", "response_type", "embeddings", "texts", "meta"}
    assert answer["texts"] == TEXTS and answer["response_type"] == "embeddings_by_type"
    assert list(answer["embeddings"]) == types
    want_float = floats(svc, tiny_model_dir, input_type="document")
    for t in types:
        want = reference(want_float, t, calibration_sample)
        got = np.array(answer["embeddings"][t]).astype(want.dtype)
        assert got.tobytes() == want.tobytes(), t
    assert int(resp.headers["x-compute-tokens"]) == answer["meta"]["billed_units"]["input_tokens"]


def test_v2_embed_defaults_to_float_and_cuts_at_output_dimension(tiny_model_dir):
    svc = service(tiny_model_dir)
    body = {"model": tiny_model_dir.name, "texts": TEXTS, "input_type": "search_query", "output_dimension": 32}
    got = np.array(post(svc, "/v2/embed", body).json()["embeddings"]["float"], np.float32)
    np.testing.assert_array_equal(got, floats(svc, tiny_model_dir, dimensions=32, input_type="query"))


@pytest.mark.parametrize(
    "input_type, openai_fields",
    [
        ("search_query", {"input_type": "query"}),  # the model's query instruction
        ("search_document", {"input_type": "document"}),  # none
        ("classification", {}),  # as documents: no instruction
        ("clustering", {}),
    ],
)
def test_each_input_type_is_the_prompt_docs_api_md_names(tiny_model_dir, input_type, openai_fields):
    svc = service(tiny_model_dir)
    body = {"model": tiny_model_dir.name, "texts": TEXTS, "input_type": input_type}
    got = np.array(post(svc, "/v2/embed", body).json()["embeddings"]["float"], np.float32)
    np.testing.assert_array_equal(got, floats(svc, tiny_model_dir, **openai_fields))
    if input_type != "search_query":
        assert not np.array_equal(got, floats(svc, tiny_model_dir, input_type="query"))


def test_truncate_end_cuts_none_refuses(tiny_model_dir):
    svc = service(tiny_model_dir, max_input_tokens=16)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    body = {"model": tiny_model_dir.name, "texts": [text], "input_type": "search_document"}
    cut = post(svc, "/v2/embed", body)  # END: Cohere's default
    assert cut.json()["meta"]["billed_units"]["input_tokens"] == 16
    ids = svc.tokenizer.encode_texts([text], truncate=True)[0].ids
    np.testing.assert_allclose(cut.json()["embeddings"]["float"][0], fake_vector(ids), atol=1e-6)
    err = assert_openai_error(
        post(svc, "/v2/embed", {**body, "truncate": "NONE"}), 400, "invalid_request_error", "context_length_exceeded"
    )
    assert err["param"] == "texts" and err["message"].startswith("texts[0] has 17 tokens")
    assert "truncate=END" in err["message"]


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"embedding_types": ["float", "int4"]}, "embedding_types", None),
        ({"embedding_types": ["base64"]}, "embedding_types", None),
        ({"embedding_types": []}, "embedding_types", "must not be empty"),
        ({"texts": []}, "texts", "texts must not be empty"),
        ({"texts": ["a", ""]}, "texts", "texts[1] is an empty string"),
        ({"texts": ["x"] * 5}, "texts", "at most 4"),
        ({"texts": "just one"}, "texts", None),
        ({"embedding_types": ["int8"]}, "embedding_types", "calibration_ranges"),
        ({"embedding_types": ["uint8"]}, "embedding_types", "corpus job"),
        ({"output_dimension": 0}, "output_dimension", "between 1 and 64"),
        ({"output_dimension": 65}, "output_dimension", "between 1 and 64"),
        ({"output_dimension": 12, "embedding_types": ["ubinary"]}, "output_dimension", "multiple of 8"),
        ({"output_dimension": 12, "embedding_types": ["binary"]}, "output_dimension", "multiple of 8"),
        ({"truncate": "MIDDLE"}, "truncate", None),
        ({"truncate": "end"}, "truncate", None),
        ({"truncate": "START"}, "truncate", "START is not offered"),
        ({"input_type": "search"}, "input_type", None),
        ({"input_type": None}, "input_type", None),
        ({"images": ["data:image/png;base64,AAAA"]}, "images", "text only"),
        ({"inputs": [{"content": []}]}, "inputs", "text only"),
        ({"max_tokens": 8}, "max_tokens", "unrecognized"),
    ],
)
def test_v2_embed_client_mistakes_are_400_naming_cohere_fields(tiny_model_dir, fields, param, says):
    svc = service(tiny_model_dir, max_inputs_per_request=4)
    body = {"model": tiny_model_dir.name, "texts": ["x"], "input_type": "search_document", **fields}
    assert_openai_error(post(svc, "/v2/embed", body), 400, "invalid_request_error", param=param, says=says)


def test_v2_embed_checks_keys_and_model_as_v1_does(tiny_model_dir):
    svc = make_service(tiny_model_dir, api_keys=[KEY], tokenizers=TOKENIZERS)
    body = {"model": tiny_model_dir.name, "texts": ["x"], "input_type": "search_document"}
    assert_openai_error(post(svc, "/v2/embed", body), 401, "authentication_error", "invalid_api_key")
    auth = {"authorization": f"Bearer {KEY}"}
    assert_openai_error(
        post(svc, "/v2/embed", {**body, "model": "nope"}, auth), 404, "invalid_request_error", "model_not_found"
    )
    assert post(svc, "/v2/embed", body, auth).status_code == 200
    assert [status for route, status in svc.metrics.requests if route == "/v2/embed"] == [401, 404, 200]


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument with the TestClient")
def test_the_cohere_client_gets_every_type(tiny_model_dir, calibration_file, calibration_sample):
    """cohere.ClientV2, unchanged, through an httpx client that calls the app in-process."""
    svc = make_service(tiny_model_dir, api_keys=[KEY], tokenizers=TOKENIZERS, calibration_ranges=calibration_file)
    with TestClient(build_http_app(svc)) as http:
        co = cohere.ClientV2(base_url="http://testserver", api_key=KEY, httpx_client=http)
        types = ["float", *TYPES]
        answer = co.embed(
            model=tiny_model_dir.name,
            texts=TEXTS,
            input_type="search_query",
            embedding_types=types,
            output_dimension=32,
        )
    got_float = np.array(answer.embeddings.float_, np.float32)
    want_float = floats(service(tiny_model_dir), tiny_model_dir, dimensions=32, input_type="query")
    np.testing.assert_array_equal(got_float, want_float)  # the same vectors /v1/embeddings gives
    for t in TYPES:
        want = reference(got_float, t, calibration_sample)
        assert np.array(getattr(answer.embeddings, t)).astype(want.dtype).tobytes() == want.tobytes(), t
    assert answer.texts == TEXTS and answer.meta.billed_units.input_tokens > 0
    with pytest.raises(cohere.BadRequestError):
        co.embed(model=tiny_model_dir.name, texts=[], input_type="search_query")


def test_random_cohere_requests_never_get_a_5xx(tiny_model_dir, calibration_file):
    """Hypothesis over /v2/embed's fields (and /v1/embeddings' embedding_type): errors are 400s in the API's shape."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    svc = service(tiny_model_dir, calibration_ranges=calibration_file, max_inputs_per_request=4, max_input_tokens=16)
    scalars = st.none() | st.booleans() | st.integers(-3, 100) | st.text(max_size=8)
    types = st.sampled_from(["float", "int8", "uint8", "binary", "ubinary", "base64", "int4"])
    cohere_bodies = st.fixed_dictionaries(
        {
            "model": st.just(tiny_model_dir.name) | scalars,
            "texts": st.lists(st.text(max_size=60), max_size=6) | scalars,
        },
        optional={
            "input_type": st.sampled_from(["search_query", "search_document", "classification", "clustering"])
            | scalars,
            "embedding_types": st.lists(types, max_size=4) | scalars,
            "output_dimension": st.integers(-1, 70) | scalars,
            "truncate": st.sampled_from(["NONE", "END", "START", "end"]) | scalars,
            "images": scalars,
        },
    )
    openai_bodies = st.fixed_dictionaries(
        {"model": st.just(tiny_model_dir.name), "input": st.lists(st.text(max_size=40), max_size=5)},
        optional={"embedding_type": types | scalars, "dimensions": st.integers(-1, 70), "encoding_format": scalars},
    )
    statuses: list[int] = []

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    @given(target=st.sampled_from(["/v2/embed", "/v2/embed", "/v1/embeddings"]), data=st.data())
    def one(target, data):
        body = data.draw(cohere_bodies if target == "/v2/embed" else openai_bodies)
        resp = post(svc, target, body)
        statuses.append(resp.status_code)
        assert resp.status_code < 500, (target, body, resp.text[:300])
        if resp.status_code != 200:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

    one()
    assert 200 in statuses and 400 in statuses
