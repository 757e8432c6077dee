"""The locust load test (loadtest/): its answer checks, its runner, a smoke load on the real service."""

from __future__ import annotations

import base64
import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import psutil
import pytest

# The traffic and its checks are plain Python: no locust here, so no gevent patching of this process.
from loadtest.answers import check_answer
from loadtest.memory_rounds import memory_mb
from loadtest.request_mix import PlannedRequest, RequestFactory
from loadtest.settings import Settings, parse_mix, parse_range
from loadtest.texts import Corpus
from tests.loadtest_cli import run_loadtest

# --- a fake OpenAI-style server, right or wrong on purpose ------------------------------------------


class FakeEmbeddings:
    """/v1/models and /v1/embeddings on 127.0.0.1; ``mode`` picks how answers go wrong.

    Latency is ``delay_ms`` times the number of requests in flight, so it grows with users,
    plus ``batch_s`` for requests with a list of inputs.
    """

    NATIVE = 32

    def __init__(self, mode: str = "ok", delay_ms: float = 0.0, batch_s: float = 0.0):
        self.mode, self.delay_ms, self.batch_s = mode, delay_ms, batch_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.count = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the load test reuses connections
            wbufsize = 1 << 16  # one write per answer (headers and body), no Nagle/delayed-ACK stall
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.count += 1
                    n, in_flight = fake.count, fake.in_flight
                try:
                    time.sleep(
                        fake.delay_ms * in_flight / 1000 + (fake.batch_s if isinstance(body["input"], list) else 0)
                    )
                    if fake.mode == "overload" and n % 3 == 0:
                        return self._send(
                            503,
                            {
                                "error": {
                                    "message": "overloaded",
                                    "type": "rate_limit_error",
                                    "param": None,
                                    "code": "overloaded",
                                }
                            },
                            {"Retry-After": "1"},
                        )
                    self._send(200, fake.answer(body))
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _send(self, status, obj, headers=None):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                for k, v in {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(raw)),
                    **(headers or {}),
                }.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, body: dict) -> dict:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        dim = body.get("dimensions") or self.NATIVE
        rng = np.random.default_rng(len(texts))
        vecs = rng.standard_normal((len(texts), dim)).astype("<f4")
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        if self.mode == "wrong_dim":
            vecs = vecs[:, : dim - 1]
        elif self.mode == "not_unit":
            vecs = vecs * 2
        elif self.mode == "wrong_count":
            vecs = vecs[:-1] if len(vecs) > 1 else np.concatenate([vecs, vecs])
        if body.get("encoding_format") == "base64":
            data = [base64.b64encode(v.tobytes()).decode() for v in vecs]
        else:
            data = [v.tolist() for v in vecs]
        return {
            "object": "list",
            "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": 7 * len(texts), "total_tokens": 7 * len(texts)},
        }

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# --- the checks, without locust ---------------------------------------------------------------------


def planned(n=2, dim=4, encoding="float"):
    return PlannedRequest("docs", {}, n, dim, encoding)


def answer(vectors, encoding="float", tokens=10):
    vectors = np.asarray(vectors, dtype="<f4")
    data = [base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist() for v in vectors]
    return json.dumps(
        {"data": [{"index": i, "embedding": e} for i, e in enumerate(data)], "usage": {"total_tokens": tokens}}
    ).encode()


UNIT = [[1, 0, 0, 0], [0, 0.6, 0.8, 0]]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_check_answer_accepts_right_and_names_wrong(encoding):
    check = check_answer
    ok = check(200, {}, answer(UNIT, encoding), planned(encoding=encoding))
    assert ok.ok and ok.tokens == 10
    assert check(200, {}, answer(UNIT, encoding), planned(dim=3, encoding=encoding)).outcome == "wrong_dimension"
    assert check(200, {}, answer(np.array(UNIT) * 1.1, encoding), planned(encoding=encoding)).outcome == "not_unit"
    nan = check(200, {}, answer([[np.nan, 0, 0, 1], UNIT[1]], encoding), planned(encoding=encoding))
    assert nan.outcome == ("non_finite" if encoding == "base64" else "bad_json")  # NaN is not JSON
    assert check(200, {}, answer(UNIT[:1], encoding), planned(encoding=encoding)).outcome == "wrong_count"
    assert check(200, {}, answer(UNIT, encoding, tokens=0), planned(encoding=encoding)).outcome == "bad_usage"
    assert check(200, {}, b"<html>", planned(encoding=encoding)).outcome == "bad_json"
    assert check(503, {"retry-after": "1"}, b"{}", planned()).outcome == "overload"
    assert check(503, {}, b"{}", planned()).outcome == "http_503"  # no Retry-After: not an overload answer
    assert check(500, {}, b"{}", planned()).outcome == "http_500"
    assert check(0, None, None, planned(), error=TimeoutError()).outcome == "timeout"
    assert check(0, None, None, planned(), error=ConnectionRefusedError()).outcome == "connection_error"


def test_workload_is_seeded_multilingual_and_sized(tiny_model_dir):
    from tokenizers import Tokenizer

    a = Corpus.generate(7, (5, 30), (100, 400), n_queries=300, n_passages=200)
    assert a == Corpus.generate(7, (5, 30), (100, 400), n_queries=300, n_passages=200)
    assert a != Corpus.generate(8, (5, 30), (100, 400), n_queries=300, n_passages=200)
    text = " ".join(a.queries + a.passages)
    for sample in ("the", "的", "の", "и", "في", "का", "의"):  # Latin, Han, kana, Cyrillic, Arabic, Devanagari, Hangul
        assert sample in text
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))  # the Qwen2 tokenizer
    q = [len(tok.encode(x).ids) for x in a.queries]
    p = [len(tok.encode(x).ids) for x in a.passages]
    assert 4 <= np.percentile(q, 5) and np.percentile(q, 95) <= 36, np.percentile(q, [5, 95])
    assert 80 <= np.percentile(p, 5) and np.percentile(p, 95) <= 440, np.percentile(p, [5, 95])

    s = Settings(model="m", expected_dim=896, mix={"query": 1, "docs": 1})
    factory = RequestFactory(s, a, stream=0)
    reqs = [factory.next() for _ in range(400)]
    docs = [r for r in reqs if r.kind == "docs"]
    queries = [r for r in reqs if r.kind == "query"]
    assert all(8 <= r.n_inputs <= 64 and r.body["input_type"] == "document" for r in docs)
    assert all(isinstance(r.body["input"], str) and r.body["instruction"] for r in queries)
    assert 0.6 < np.mean([r.encoding == "base64" for r in reqs]) < 0.8
    with_dims = [r for r in reqs if "dimensions" in r.body]
    assert 0.15 < len(with_dims) / len(reqs) < 0.35 and all(r.dim == r.body["dimensions"] for r in with_dims)


def test_mix_and_range_parsing():
    assert parse_mix("query=9, docs=1") == {"query": 9.0, "docs": 1.0}
    assert parse_mix("query") == {"query": 1.0}
    assert parse_range("8-64") == (8, 64) and parse_range("16") == (16, 16)
    for bad in ("images=1", "query=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError):
        parse_range("64-8")


# --- the runner against the fake server ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, kind", [("wrong_dim", "wrong_dimension"), ("not_unit", "not_unit"), ("wrong_count", "wrong_count")]
)
def test_wrong_answers_fail_the_run(tmp_path, mode, kind):
    with FakeEmbeddings(mode) as fake:
        rc, summary, output = run_loadtest(
            fake.url, tmp_path, "--users", "2", "--duration", "2", "--expected-dim", str(FakeEmbeddings.NATIVE)
        )
    assert rc == 1, output
    assert summary["total"]["ok"] == 0 and summary["total"]["failures"] > 0, output
    assert set(summary["total"]["failures_by_kind"]) == {kind}, output
    assert kind in output
    failures = list(csv.DictReader(open(tmp_path / "locust_failures.csv")))
    assert failures and all(row["Error"].startswith(kind) for row in failures), failures


def test_overload_answers_are_not_failures(tmp_path):
    with FakeEmbeddings("overload") as fake:
        rc, summary, output = run_loadtest(
            fake.url, tmp_path, "--users", "2", "--duration", "2", "--mix", "query=1,docs=1"
        )
    assert rc == 0, output
    t = summary["total"]
    assert t["overload"] > 0 and t["failures"] == 0 and t["ok"] > 0, output
    assert summary["model"] == "fake-model" and summary["expected_dim"] == FakeEmbeddings.NATIVE


def test_unreachable_target_is_exit_2(tmp_path):
    rc, _, output = run_loadtest("http://127.0.0.1:9", tmp_path, "--duration", "1")
    assert rc == 2 and "cannot use" in output, output


def test_step_mode_stops_past_the_slo(tmp_path):
    # latency = 40 ms x requests in flight: 1 user ~40 ms, 2 ~80, 3 ~120, 4 ~160 ...
    with FakeEmbeddings("ok", delay_ms=40) as fake:
        rc, summary, output = run_loadtest(
            fake.url, tmp_path, "--step", "--slo-ms", "100", "--step-time", "2", "--max-users", "8", "--mix", "query=1"
        )
    assert rc == 0, output
    steps = summary["steps"]
    assert [s["users"] for s in steps] == list(range(1, len(steps) + 1))
    assert 2 <= len(steps) <= 8, output
    assert all(s["within_slo"] for s in steps[:-1]) and not steps[-1]["within_slo"], output
    assert steps[-1]["p95_ms"] > 100
    best = summary["best"]
    assert best and best["p95_ms"] <= 100 and best["requests_per_s"] > 0, output
    assert "BEST UNDER SLO" in output
    rows = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert len(rows) == len(steps)


def test_step_mode_counts_requests_still_in_flight(tmp_path):
    # one user, each document batch takes 6 s: nothing completes in a 2 s step, yet it is far past the SLO
    with FakeEmbeddings("ok", batch_s=6) as fake:
        rc, summary, output = run_loadtest(
            fake.url, tmp_path, "--step", "--slo-ms", "500", "--step-time", "2", "--mix", "docs=1"
        )
    assert rc == 0, output
    [step] = summary["steps"]
    assert step["ok"] == 0 and step["late"] == 1 and step["p95_ms"] > 1500 and not step["within_slo"], output
    assert summary["best"] is None and "NO STEP MET THE SLO" in output


def test_memory_rounds_splits_a_processs_rss_into_its_own_pages_the_object_stores_and_files():
    mb = memory_mb({"me": psutil.Process()})["me"]
    assert mb["own"] > 0 and mb["files"] > 0 and mb["store"] >= 0
    assert abs(mb["rss"] - (mb["own"] + mb["store"] + mb["files"])) <= 0.5  # the three parts are the whole
