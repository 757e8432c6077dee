"""The null engine and the host-path benchmark: the served path measured without the model's cost."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
import yaml

from loadtest.host_path import Phase, host_path_report
from serve_app.batching.null_engine import NullEngine
from serve_app.config import ServiceConfig
from serve_app.core.tokenization import TextTokenizer
from serve_app.serve.ingress import build_http_app
from serve_app.testing.ray_cluster import free_port
from tests.http_fakes import DIMENSIONS, make_service
from tests.service_harness import CONFIG


def test_null_engine_answers_unit_vectors_of_the_models_width_at_once():
    engine = NullEngine(DIMENSIONS)
    result = asyncio.run(engine.embed([[1, 2, 3], [4], np.array([5, 6], np.int32)]))
    assert result.vectors.shape == (3, DIMENSIONS) and result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-6)
    assert result.queue_s == result.inference_s == 0.0
    assert (engine.stats.rows, engine.stats.tokens, engine.queued_tokens) == (3, 6, 0)


def test_the_model_engine_is_the_default_and_null_is_chosen_by_name():
    assert ServiceConfig().engine == "model"
    assert ServiceConfig(engine="null").engine == "null"
    with pytest.raises(ValueError):
        ServiceConfig(engine="fast")
    assert yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]["engine"] == "model"


class NullHandle:
    """The encoder deployment's handle, answered by a NullEngine in this process."""

    def __init__(self):
        engine = NullEngine(DIMENSIONS)
        self.embed = type("M", (), {"remote": staticmethod(lambda ids, priority="bulk": _Call(engine.embed(ids)))})
        self.health = type("M", (), {"remote": staticmethod(lambda: asyncio.sleep(0, {}))})


class _Call:
    def __init__(self, coro):
        self.coro = coro

    def cancel(self) -> None:
        pass

    def __await__(self):
        return self.coro.__await__()


@pytest.fixture
def null_served_ingress(tiny_model_dir):
    """The real ingress app over a null engine, served by uvicorn on a free port."""
    service = make_service(tiny_model_dir, encoder=NullHandle())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_http_app(service), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server.started:
        time.sleep(0.05)
    assert httpx.get(url + "/health").status_code == 200
    yield url, service.config.model_id
    server.should_exit = True
    thread.join(10)


def test_host_path_reports_throughput_and_where_a_requests_time_goes(null_served_ingress, tiny_model_dir):
    url, model_id = null_served_ingress
    phases = [Phase("queries", 1, (20, 20), 4), Phase("batch32", 32, (8, 64), 2)]
    report = host_path_report(
        url, TextTokenizer.from_dir(tiny_model_dir), model_id, phases, 2, 1.0, None, distinct_requests=16
    )
    assert report["client_processes"] == 2 and list(report["phases"]) == ["queries", "batch32"]
    for phase in report["phases"].values():
        assert phase["requests"] > 0 and phase["errors"] == 0
        assert phase["requests_per_s"] > 0 and phase["tokens_per_s"] > 0
        assert set(phase["time_split_ms"]) == {
            "client_total",
            "proxy_and_transport",
            "server_total",
            "parse_and_tokenise",
            "hand_off_to_replica_and_back",
            "replica_queue",
            "replica_inference",
            "response_encoding",
        }
        assert len(phase["client_cpu_per_process"]) == 2
        assert "per_ingress_cpu" not in phase  # no --server-pid: no CPU split of the service
    assert abs(report["phases"]["queries"]["mean_tokens_per_request"] - 20) <= 1
    assert report["phases"]["batch32"]["texts_per_request"] == 32


def test_base64_answers_are_the_float_answers_bytes_written_from_the_array():
    from serve_app.api.rendering import render_embeddings

    vectors = np.random.default_rng(0).standard_normal((3, DIMENSIONS)).astype(np.float32)[:, :48]  # a Matryoshka cut
    as_base64 = orjson.loads(render_embeddings(vectors, "base64", 'model "x"', 7))
    as_float = orjson.loads(render_embeddings(vectors, "float", 'model "x"', 7))
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in as_base64["data"]]
    np.testing.assert_array_equal(np.stack(decoded), vectors)
    assert [d["index"] for d in as_base64["data"]] == [0, 1, 2]
    assert {k: v for k, v in as_base64.items() if k != "data"} == {k: v for k, v in as_float.items() if k != "data"}
