"""The HTTP contract in-process: every route and every row of the error table, no Ray, no model.

The ingress's app runs over httpx's ASGI transport with a fake encoder handle (tests/http_fakes.py);
`serve run` tests (test_service*.py) cover the real path.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
import threading
import time

import numpy as np
import orjson
import pytest
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import BackPressureError

from serve_app.api import protocol
from serve_app.errors import OverloadedError
from serve_app.serve import ingress
from tests.client_mistakes import CLIENT_MISTAKES, MALFORMED_BODIES, as_sent, over_the_limits
from tests.http_fakes import FakeEncoder, call_asgi, client_for, fake_vector, make_service
from tests.openai_errors import assert_openai_error

pytestmark = pytest.mark.http

KEY = "sk-test"
LIMITS = {"max_inputs_per_request": 4, "max_input_tokens": 16, "max_request_tokens": 40}
TOKENIZERS: dict = {}  # one tokenizer per limit for the whole module: loading one takes a second


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def service(model_dir, encoder=None, **config):
    return make_service(model_dir, encoder, tokenizers=TOKENIZERS, **config)


def run(coro):
    return asyncio.run(coro)


async def post(svc, body, headers=None, raw: bytes | None = None, path="/v1/embeddings"):
    async with client_for(svc) as client:
        if raw is not None:
            return await client.post(path, content=raw, headers=headers)
        return await client.post(path, json=body, headers=headers)


def error_of(resp, status: int, type_: str = "invalid_request_error", code=None, param=None, says=None) -> dict:
    return assert_openai_error(resp, status, type_, code, param, says)


def model_id(model_dir) -> str:
    return model_dir.name


# --- the contract --------------------------------------------------------------------------


def test_embeddings_are_the_encoders_vectors_in_input_order(model_dir):
    svc = service(model_dir)
    texts = ["What is Ray Serve?", "东京是日本的首都。", "a third text"]
    resp = run(post(svc, {"model": model_id(model_dir), "input": texts}))
    assert resp.status_code == 200
    body = resp.json()
    ids = [t.ids for t in svc.tokenizer.encode_texts(texts)]
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got, np.stack([fake_vector(x) for x in ids]), atol=1e-6)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    assert int(resp.headers["x-compute-tokens"]) == sum(map(len, ids))
    assert svc.metrics.requests == [("/v1/embeddings", 200)]


def test_base64_dimensions_and_token_ids(model_dir):
    svc = service(model_dir, token_id_inputs="model")  # ids in the model's vocabulary, as sent
    ids = [[100, 200, 300], [5, 6]]
    resp = run(post(svc, {"model": model_id(model_dir), "input": ids, "dimensions": 8, "encoding_format": "base64"}))
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in resp.json()["data"]])
    want = np.stack([fake_vector(x)[:8] for x in ids])
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)


def test_models_health_and_keys(model_dir):
    svc = make_service(model_dir, api_keys=[KEY], tokenizers=TOKENIZERS)

    async def go():
        async with client_for(svc) as client:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
                error_of(
                    await client.post("/v1/embeddings", json={"model": "x", "input": "x"}, headers=headers),
                    401,
                    "authentication_error",
                    code="invalid_api_key",
                )
                error_of(await client.get("/v1/models", headers=headers), 401, "authentication_error")
                error_of(await client.get("/nope", headers=headers), 401, "authentication_error")  # no route map
            models = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
            assert models.json()["data"][0]["id"] == model_id(model_dir)
            assert (await client.get("/health")).json() == {"status": "ok"}  # probes need no key
            assert (await client.head("/health")).status_code == 200  # nor HEAD probes
            svc.encoder.healthy = False
            assert (await client.get("/health")).status_code == 503

    run(go())


# --- every row of the error table ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param, says",
    CLIENT_MISTAKES + over_the_limits(LIMITS["max_inputs_per_request"], LIMITS["max_input_tokens"]),
)
def test_client_mistakes_are_400_with_the_field_named(model_dir, body, param, says):
    body = as_sent(body, model_id(model_dir))
    error_of(run(post(service(model_dir, **LIMITS), body)), 400, param=param, says=says)


@pytest.mark.parametrize("raw", MALFORMED_BODIES)
def test_malformed_bodies_are_400(model_dir, raw):
    error_of(run(post(service(model_dir), None, raw=raw)), 400)


def test_over_long_inputs_give_limit_and_length_unless_truncated(model_dir):
    svc = service(model_dir, token_id_inputs="model", **LIMITS)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    err = error_of(run(post(svc, {"model": model_id(model_dir), "input": text})), 400, code="context_length_exceeded")
    assert "limit of 16" in err["message"] and "17 tokens" in err["message"]
    ok = run(post(svc, {"model": model_id(model_dir), "input": text, "truncate": True}))
    assert ok.json()["usage"]["total_tokens"] == 16
    cut = svc.tokenizer.encode_texts([text], truncate=True)[0].ids
    np.testing.assert_allclose(ok.json()["data"][0]["embedding"], fake_vector(cut), atol=1e-6)
    ids = list(range(100, 120))
    error_of(run(post(svc, {"model": model_id(model_dir), "input": ids})), 400, says="20 tokens")
    assert run(post(svc, {"model": model_id(model_dir), "input": ids, "truncate": True})).json()["usage"] == {
        "prompt_tokens": 16,
        "total_tokens": 16,
    }


def test_too_many_tokens_per_request(model_dir):
    body = {"model": model_id(model_dir), "input": ["alpha beta gamma delta epsilon zeta eta theta iota kappa"] * 4}
    error_of(run(post(service(model_dir, **LIMITS), body)), 400, says="at most 40")


def test_unknown_model_is_404(model_dir):
    err = error_of(run(post(service(model_dir), {"model": "gpt-4", "input": "x"})), 404, code="model_not_found")
    assert err["param"] == "model" and "gpt-4" in err["message"]


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/embedding", 404),
        ("GET", "/openapi.json", 404),
        ("GET", "/docs", 404),
        ("GET", "/redoc", 404),
        ("GET", "/v1/embeddings", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/health", 405),
    ],
)
def test_unknown_routes_and_methods_answer_in_openai_shape(model_dir, method, path, status):
    async def go():
        async with client_for(service(model_dir)) as client:
            return await client.request(method, path)

    err = error_of(run(go()), status)
    assert path in err["message"]


def test_routes_with_a_trailing_slash_are_served_not_redirected(model_dir):
    svc = service(model_dir)
    resp = run(post(svc, {"model": model_id(model_dir), "input": "x"}, path="/v1/embeddings/"))
    assert resp.status_code == 200 and len(resp.json()["data"]) == 1

    async def models():
        async with client_for(svc) as client:
            return await client.get("/v1/models/")

    assert run(models()).json()["data"][0]["id"] == model_id(model_dir)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_body_is_415_before_it_is_read(model_dir, encoding):
    headers = {"content-encoding": encoding, "content-type": "application/json"}
    resp = run(post(service(model_dir), None, headers, raw=b"\x1f\x8b compressed bytes"))
    error_of(resp, 415, code="unsupported_content_encoding", says=encoding)


def test_body_over_the_byte_limit_is_413_declared_or_streamed(model_dir):
    svc = service(model_dir, max_body_bytes=1000)
    body = orjson.dumps({"model": model_id(model_dir), "input": "x" * 2000})
    error_of(run(post(svc, None, raw=body)), 413, code="payload_too_large", says="1000 bytes")

    async def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    async def go():
        async with client_for(svc) as client:
            return await client.post("/v1/embeddings", content=chunks())

    error_of(run(go()), 413, code="payload_too_large")


def test_headers_over_the_limit_are_431(model_dir):
    resp = run(post(service(model_dir, max_header_bytes=2000), {"input": "x"}, headers={"x-big": "a" * 3000}))
    error_of(resp, 431, code="headers_too_large", says="2000 bytes")


def test_over_long_request_id_is_replaced_and_the_answer_says_so(model_dir):
    body = {"model": model_id(model_dir), "input": "x"}
    resp = run(post(service(model_dir), body, headers={"x-request-id": "r" * 10_000}))
    assert resp.status_code == 200
    assert "longer than 128" in resp.headers["x-request-id-replaced"]
    assert len(resp.headers["x-request-id-replaced"]) < 200
    assert "x-request-id-replaced" not in run(post(service(model_dir), body, headers={"x-request-id": "ok-1"})).headers


def test_slow_upload_gets_408(model_dir):
    svc = service(model_dir, body_read_timeout_s=0.2)

    async def receive():
        if not receive.sent:
            receive.sent = True
            return {"type": "http.request", "body": b'{"model": ', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    receive.sent = False
    sent = run(call_asgi(svc, "POST", "/v1/embeddings", {"content-type": "application/json"}, receive))
    assert sent["status"] == 408
    assert orjson.loads(sent["body"])["error"]["code"] == "request_timeout"
    assert svc.metrics.requests == [("/v1/embeddings", 408)]


# How a vanished client reaches the ingress: Starlette's disconnect message, or (behind Serve's
# proxy) the proxy cancelling the call that streams the body to the replica.
@pytest.mark.parametrize("gone", [{"type": "http.disconnect"}, TaskCancelledError()], ids=["asgi", "serve-proxy"])
def test_disconnect_mid_upload_is_counted_as_cancelled_without_error_log(model_dir, caplog, gone):
    svc = service(model_dir)
    messages = iter([{"type": "http.request", "body": b'{"model": ', "more_body": True}, gone])

    async def receive():
        message = next(messages)
        if isinstance(message, Exception):
            raise message
        return message

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        run(call_asgi(svc, "POST", "/v1/embeddings", {}, receive))
    assert svc.metrics.requests == [("/v1/embeddings", 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_overload_is_503_with_retry_after_clamped_to_a_minute(model_dir):
    for failure, retry_after in [
        (OverloadedError("replica queue is full", retry_after_s=3338.0), "60"),
        (OverloadedError("replica queue is full", retry_after_s=0.01), "1"),
        (OverloadedError("replica queue is full", retry_after_s=7.2), "8"),
        (BackPressureError(num_queued_requests=512, max_queued_requests=512), "1"),
    ]:
        resp = run(post(service(model_dir, FakeEncoder(failure=failure)), {"model": model_id(model_dir), "input": "x"}))
        error_of(resp, 503, "rate_limit_error", code="overloaded")
        assert resp.headers["retry-after"] == retry_after


def test_an_overload_returned_by_a_replica_keeps_its_retry_after_across_processes():
    # replicas return OverloadedError (Ray pickles it to the ingress) rather than raise it
    back = pickle.loads(pickle.dumps(OverloadedError("replica queue is full", retry_after_s=7.2)))
    assert (back.message, back.retry_after_s) == ("replica queue is full", 7.2)


def test_request_timeout_is_504(model_dir):
    svc = service(model_dir, FakeEncoder(delay_s=5), request_timeout_s=0.2)
    error_of(run(post(svc, {"model": model_id(model_dir), "input": "x"})), 504, "server_error", code="timeout")


def test_unexpected_failure_is_500_naming_the_request_id_without_a_trace(model_dir):
    svc = service(model_dir, FakeEncoder(failure=RuntimeError("secret internals")))
    resp = run(post(svc, {"model": model_id(model_dir), "input": "x"}, headers={"x-request-id": "req-42"}))
    err = error_of(resp, 500, "server_error")
    assert "req-42" in err["message"] and "secret" not in resp.text


# --- cost bounds --------------------------------------------------------------------------------


def test_a_text_longer_than_any_limit_can_hold_is_refused_before_tokenising(model_dir, monkeypatch):
    svc = service(model_dir, **LIMITS)
    assert svc.tokenizer.max_chars_per_token == 128  # Qwen2's longest token: 128 spaces
    monkeypatch.setattr(svc.tokenizer, "tokenizer", None)  # tokenising would fail the test
    err = error_of(run(post(svc, {"model": model_id(model_dir), "input": "x" * 2049})), 400)
    assert "2049 characters" in err["message"] and "limit of 16 tokens" in err["message"]


def test_truncate_cuts_characters_first_and_tokenises_only_a_prefix(model_dir, monkeypatch):
    svc = service(model_dir, **LIMITS)
    text = "lorem ipsum dolor sit amet " * 100_000  # 2.7 M characters
    seen: list[int] = []
    encode = svc.tokenizer.tokenizer.encode
    monkeypatch.setattr(svc.tokenizer.tokenizer, "encode", lambda s, *a, **k: seen.append(len(s)) or encode(s, *a, **k))
    resp = run(post(svc, {"model": model_id(model_dir), "input": text, "truncate": True}))
    assert resp.json()["usage"]["total_tokens"] == 16
    want = svc.tokenizer.encode_texts([text[:1000]], truncate=True)[0].ids
    np.testing.assert_allclose(resp.json()["data"][0]["embedding"], fake_vector(want), atol=1e-6)
    assert max(seen) <= 16 * 128  # never more than the limit's worth of characters


def test_an_over_long_input_is_refused_after_a_prefix(model_dir, monkeypatch):
    svc = service(model_dir, **LIMITS)
    text = "lorem ipsum dolor sit amet " * 70  # under 16 x 128 characters, far over 16 tokens
    seen: list[int] = []
    encode = svc.tokenizer.tokenizer.encode
    monkeypatch.setattr(svc.tokenizer.tokenizer, "encode", lambda s, *a, **k: seen.append(len(s)) or encode(s, *a, **k))
    err = error_of(run(post(svc, {"model": model_id(model_dir), "input": text})), 400, code="context_length_exceeded")
    assert "more than 18 tokens" in err["message"]
    assert seen and max(seen) < len(text) / 4  # prefixes from 64 characters, grown by the rate seen


def test_a_request_stops_tokenising_once_over_its_token_limit(model_dir, monkeypatch):
    svc = service(model_dir, max_request_tokens=5000)
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu " * 3] * 2000  # 400 k characters
    calls: list[int] = []
    encode_batch = svc.tokenizer.tokenizer.encode_batch
    monkeypatch.setattr(
        svc.tokenizer.tokenizer, "encode_batch", lambda t, *a, **k: calls.append(len(t)) or encode_batch(t, *a, **k)
    )
    err = error_of(run(post(svc, {"model": model_id(model_dir), "input": texts})), 400, says="more than")
    assert "at most 5000" in err["message"]
    assert len(calls) == 1 and calls[0] < 2000  # stopped after the first group of texts


def test_a_request_with_more_characters_than_its_token_limit_can_hold_is_refused_untokenised(model_dir, monkeypatch):
    svc = service(model_dir, **{**LIMITS, "max_inputs_per_request": 2048})
    assert svc.tokenizer.max_chars_per_token == 128
    monkeypatch.setattr(svc.tokenizer, "tokenizer", None)  # tokenising would fail the test
    body = {"model": model_id(model_dir), "input": ["alpha beta gamma delta"] * 2000}  # 44 k characters
    err = error_of(run(post(svc, body)), 400, says="44000 characters")
    assert "at most 40 tokens" in err["message"]


def test_token_ids_are_counted_before_they_are_validated(model_dir, monkeypatch):
    svc = service(model_dir, **LIMITS)
    monkeypatch.setattr(svc.tokenizer, "check_token_ids", None)  # looking at each id would fail the test
    for input_ in ([7] * 100_000, [[7] * 50_000, [8] * 50_000]):
        err = error_of(run(post(svc, {"model": model_id(model_dir), "input": input_})), 400)
        assert "100000 tokens in total" in err["message"] and "at most 40" in err["message"]


def test_a_large_body_of_numbers_is_counted_before_it_is_parsed(model_dir, monkeypatch):
    svc = service(model_dir)
    monkeypatch.setattr(protocol.orjson, "loads", None)  # parsing would fail the test
    for input_ in (
        [101_000 + i % 9000 for i in range(400_000)],
        [[151_000] * 200_000] * 2,
        [", ".join(str(i) for i in range(400_000))],  # in a text: a digit is a token for Qwen2 (>= 400 k tokens)
    ):
        err = error_of(run(post(svc, {"model": model_id(model_dir), "input": input_})), 400)
        assert "about 400000 numbers (counted before parsing" in err["message"], err["message"]
        assert "at most 300000 tokens" in err["message"]


def test_large_requests_take_turns_while_small_ones_pass(model_dir, monkeypatch):
    svc = service(model_dir, max_concurrent_large_requests=1)
    active, most, release = [0], [0], threading.Event()
    validate_and_tokenize = svc._validate_and_tokenize

    def gated(body):
        active[0] += 1
        most[0] = max(most[0], active[0])
        if len(body) > ingress.LARGE_BODY_BYTES:
            release.wait(10)
        try:
            return validate_and_tokenize(body)
        finally:
            active[0] -= 1

    monkeypatch.setattr(svc, "_validate_and_tokenize", gated)
    big = {"model": model_id(model_dir), "input": ["word " * 1000] * 250, "truncate": True}  # ~1.25 MB

    async def go():
        async with client_for(svc) as client:
            large = [asyncio.create_task(client.post("/v1/embeddings", json=big)) for _ in range(3)]
            await asyncio.sleep(0.5)
            small = await client.post("/v1/embeddings", json={"model": model_id(model_dir), "input": "hi"})
            assert small.status_code == 200  # a small request is not held behind large ones
            release.set()
            return [r.status_code for r in await asyncio.gather(*large)]

    assert run(go()) == [200, 200, 200]
    assert most[0] <= 2  # one large request at a time (plus the small one)


def streamed(raw: bytes, read: list[int], piece: int = 64 * 1024):
    """An ASGI ``receive`` sending ``raw`` in pieces without a declared length (as curl sends a file
    with ``Transfer-Encoding: chunked``), counting in ``read[0]`` what the app has taken."""
    pieces = [raw[i : i + piece] for i in range(0, len(raw), piece)]

    async def receive():
        if pieces:
            read[0] += len(pieces[0])
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
        await asyncio.sleep(3600)

    return receive


def test_a_large_body_sent_without_a_length_waits_for_its_turn_before_more_is_read(model_dir, monkeypatch):
    svc = service(model_dir, max_concurrent_large_requests=1, body_read_timeout_s=0.5)
    release = threading.Event()
    prepare = svc._validate_and_tokenize

    def gated(body):
        if len(body) > ingress.LARGE_BODY_BYTES:
            release.wait(10)
        return prepare(body)

    monkeypatch.setattr(svc, "_validate_and_tokenize", gated)
    raw = orjson.dumps({"model": model_id(model_dir), "input": "word " * 600_000, "truncate": True})  # 3 MB
    first_read, second_read = [0], [0]
    headers = {"content-type": "application/json"}

    async def go():
        first = asyncio.create_task(call_asgi(svc, "POST", "/v1/embeddings", headers, streamed(raw, first_read)))
        await asyncio.sleep(0.5)  # the first has its turn, and is held while it is parsed
        second = asyncio.create_task(call_asgi(svc, "POST", "/v1/embeddings", headers, streamed(raw, second_read)))
        await asyncio.sleep(1.0)  # longer than body_read_timeout_s: waiting for a turn is not the client's delay
        held = second_read[0]
        release.set()
        return held, await first, await second

    held, first, second = run(go())
    assert first_read[0] == len(raw) and ingress.LARGE_BODY_BYTES < held <= ingress.LARGE_BODY_BYTES + 64 * 1024
    assert first["status"] == second["status"] == 200, second["body"]


# --- a redeploy rolling through -----------------------------------------------------------------


def test_a_request_split_over_two_model_versions_is_sent_again_and_answered_by_one(model_dir):
    # The first chunk lands on a replica of the old version, the others on the new one; from then on
    # only the new version answers (the old replicas are gone).
    encoder = FakeEncoder(revision_of_call=lambda n: "old" if n == 1 else "new")
    svc = service(model_dir, encoder, max_chunk_tokens=8)
    texts = ["one two three four five six seven"] * 3  # one chunk each

    resp = run(post(svc, {"model": model_id(model_dir), "input": texts}))
    assert resp.status_code == 200
    assert len(encoder.calls) == 6  # 3 chunks, mixed; then all 3 again, of one version


def test_a_request_that_keeps_meeting_two_model_versions_is_503_not_a_mix(model_dir):
    encoder = FakeEncoder(revision_of_call=lambda n: "old" if n % 2 else "new")
    svc = service(model_dir, encoder, max_chunk_tokens=8)

    resp = run(post(svc, {"model": model_id(model_dir), "input": ["one two three four five six seven"] * 2}))
    error_of(resp, 503, "rate_limit_error")
    assert "redeployed" in resp.json()["error"]["message"]
    assert len(encoder.calls) == 2 * 3  # MAX_MIXED_ATTEMPTS sends of both chunks


# --- cancellation ------------------------------------------------------------------------------


def test_a_failed_chunk_cancels_the_requests_other_chunks(model_dir):
    encoder = FakeEncoder(delay_s=0.5, fail_on_call=2, failure=OverloadedError("full", retry_after_s=2))
    svc = service(model_dir, encoder, max_chunk_tokens=8)
    texts = ["one two three four five six seven"] * 6  # one chunk each

    async def go():
        resp = await post(svc, {"model": model_id(model_dir), "input": texts})
        await asyncio.sleep(0)
        return resp, len(encoder.cancelled)  # by the time the answer is out, not when the loop shuts down

    resp, cancelled = run(go())
    error_of(resp, 503, "rate_limit_error")
    assert len(encoder.calls) == 6
    assert cancelled == 5  # every chunk but the failed one


def test_a_client_gone_mid_request_cancels_its_chunks_and_counts_as_499(model_dir, caplog):
    encoder = FakeEncoder(delay_s=30)
    svc = service(model_dir, encoder, max_chunk_tokens=8)
    body = orjson.dumps({"model": model_id(model_dir), "input": ["one two three four five six seven"] * 3})
    done = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive():
        return next(done, None) or await asyncio.sleep(3600)

    async def go():
        task = asyncio.create_task(call_asgi(svc, "POST", "/v1/embeddings", {}, receive))
        while len(encoder.calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()  # what Serve does when the HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        started = time.monotonic()
        run(go())
    assert time.monotonic() - started < 5
    assert len(encoder.cancelled) == 3
    assert svc.metrics.requests == [("/v1/embeddings", 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
