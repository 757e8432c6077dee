"""Metrics, request logs and timing headers of a live deployment."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.service_harness import ROOT

pytestmark = pytest.mark.serve

OPERATIONS_DOC = ROOT / "docs" / "operations.md"


def documented_metrics() -> list[str]:
    """Metric names from the documented metrics table (first column, in backticks)."""
    section = OPERATIONS_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(ray_kalm_\w+)`", section, flags=re.M)


def test_every_documented_metric_is_exported(service, tiny_model_dir):
    names = documented_metrics()
    assert len(names) >= 12
    url = service.base_url + "/v1/embeddings"
    model = tiny_model_dir.name
    httpx.post(url, json={"model": model, "input": ["hello world", "a second text"]}, timeout=60)
    httpx.post(url, json={"model": model, "input": ""}, timeout=60)  # a validation failure
    deadline, missing = time.monotonic() + 90, names
    while missing and time.monotonic() < deadline:  # Ray exports on a ~10 s cycle
        time.sleep(3)
        text = service.scrape_metrics()
        missing = [n for n in names if not re.search(rf"^{n}(_bucket|_sum|_count|_total)?{{", text, flags=re.M)]
    assert not missing, f"not exported: {missing}"
    assert re.search(r'^ray_kalm_request_failures_total\{[^}]*reason="validation"', text, flags=re.M)
    assert re.search(r'^ray_kalm_requests_total\{[^}]*status="200"', text, flags=re.M)


def test_one_structured_log_line_per_request_without_the_texts(service, tiny_model_dir):
    secret = "confidential-text-that-must-not-be-logged"
    resp = httpx.post(
        service.base_url + "/v1/embeddings",
        headers={"x-request-id": "log-check-1"},
        json={"model": tiny_model_dir.name, "input": [secret]},
        timeout=60,
    )
    assert resp.status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "log-check-1" not in service.replica_logs("EmbeddingsIngress"):
        time.sleep(1)
    logs = service.replica_logs("EmbeddingsIngress")
    lines = [line for line in logs.splitlines() if '"request_id":"log-check-1"' in line]
    assert len(lines) == 1, lines
    record = json.loads(lines[0].split("request ", 1)[1])
    assert record["status"] == 200 and record["inputs"] == 1 and record["tokens"] > 0
    assert {"total_ms", "tokenization_ms", "queue_ms", "inference_ms"} <= set(record)
    assert secret not in logs + service.replica_logs("KalmEncoder") + service.log()


def test_startup_logs_name_model_load_and_warm_up(service):
    log = service.log()
    assert re.search(r"model loaded: source=\S+ device=cpu dtype=float32", log)
    assert "warm-up done" in log
    assert "encoder replica ready" in log


def test_dashboard_queries_only_documented_or_serve_metrics():
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_kalm_\w+", e)}
    assert used and used <= set(documented_metrics())
    assert any("ray_serve_autoscaling_target_replicas" in e for e in exprs)
