"""Property-based fuzzing of the in-process ingress: random bodies, headers, routes and methods.

Whatever arrives, the answer is never a 5xx, an error is always in OpenAI's shape, and a good
request still gets the right vector afterwards. Prints how many requests were tried.
"""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http_fakes import client_for, fake_vector, make_service

pytestmark = pytest.mark.http

LIMITS = {"max_inputs_per_request": 8, "max_input_tokens": 32, "max_request_tokens": 100, "max_header_bytes": 4096}

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
token_ids = st.integers(-3, 160_000)
inputs = st.one_of(
    st.text(max_size=200),
    st.lists(st.text(max_size=50), max_size=10),
    st.lists(token_ids, max_size=50),
    st.lists(st.lists(token_ids, max_size=40), max_size=10),
    json_values,
)
fields = {
    "encoding_format": st.sampled_from(["float", "base64", "int8"]) | json_scalars,
    "dimensions": st.integers(-2, 100) | json_scalars,
    "truncate": st.booleans() | json_scalars,
    "instruction": st.text(max_size=30) | json_scalars,
    "input_type": st.sampled_from(["query", "document", "passage"]) | json_scalars,
    "priority": st.sampled_from(["interactive", "bulk", "urgent"]),
    "user": st.text(max_size=10),
    "unknown_field": json_values,
}
requests = st.fixed_dictionaries(
    # "MODEL" is replaced by the served model id: many random requests are good ones
    {"model": st.just("MODEL") | st.text(max_size=20) | json_scalars, "input": inputs},
    optional=fields,
)
bodies = st.one_of(
    requests.map(lambda r: orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS) if _dumpable(r) else b"{}"),
    requests.map(lambda r: orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS) if _dumpable(r) else b"{}"),
    json_values.map(lambda v: orjson.dumps(v) if _dumpable(v) else b"[]"),
    st.binary(max_size=300),
)
header_names = st.from_regex(r"\A[a-z][a-z0-9-]{0,30}\Z")
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
headers = st.dictionaries(
    header_names | st.sampled_from(["authorization", "content-type", "x-request-id", "content-length"]),
    header_values,
    max_size=6,
)
routes = st.sampled_from(["/v1/embeddings", "/v1/models", "/health", "/openapi.json", "/docs", "/"]) | st.from_regex(
    r"\A/[a-zA-Z0-9/_.-]{0,40}\Z"
)
methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
# three requests in four go to the embeddings route, the rest anywhere
targets = st.integers(0, 3).flatmap(lambda k: st.just(("POST", "/v1/embeddings")) if k else st.tuples(methods, routes))


def _dumpable(value) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        return True
    except TypeError:  # integers beyond 64 bits
        return False


@pytest.fixture(scope="module")
def svc(tiny_model_dir):
    return make_service(tiny_model_dir, **LIMITS)


def test_random_requests_never_get_a_5xx_and_errors_keep_openai_shape(svc, tiny_model_dir):
    model = tiny_model_dir.name
    tried: list[int] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(target=targets, body=bodies, headers=headers)
    def one(target, body, headers):
        method, route = target
        headers.pop("content-length", None)  # httpx sets the true one; a false one is the proxy's business
        body = body.replace(b'"MODEL"', orjson.dumps(model))

        async def go():
            async with client_for(svc) as client:
                return await client.request(method, route, content=body, headers=headers)

        resp = asyncio.run(go())
        tried.append(resp.status_code)
        assert resp.status_code < 500, (method, route, body[:200], resp.text[:300])
        if resp.status_code >= 400:
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert isinstance(err["message"], str) and err["message"]

    one()
    statuses = {s: tried.count(s) for s in sorted(set(tried))}
    print(f"fuzz: {len(tried)} requests tried, 0 failures; statuses {statuses}")
    assert len(tried) >= 300 and 200 in statuses  # some random requests were good ones

    async def good():
        async with client_for(svc) as client:
            return await client.post("/v1/embeddings", json={"model": model, "input": "still healthy"})

    resp = asyncio.run(good())
    ids = svc.tokenizer.encode_texts(["still healthy"])[0].ids
    np.testing.assert_allclose(resp.json()["data"][0]["embedding"], fake_vector(ids), atol=1e-6)
