"""The prepared served GPU check (`python -m scripts.gpu_serve_check`) runs end to end: here in its CPU smoke mode.

Two Ray starts (the service, then the corpus job) on the tiny stand-in; slow on a busy 2-core host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_mode_serves_drives_checks_and_runs_the_corpus_job(tiny_model_dir, tmp_path):
    out = tmp_path / "gpu_serve_check.json"
    run = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_serve_check", "--smoke", "--model-dir", str(tiny_model_dir)]
        + ["--out", str(out), "--budget-s", "1200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads(out.read_text())
    assert run.returncode == 0 and report["failed_sections"] == [], run.stdout[-3000:] + run.stderr[-3000:]
    sections = report["sections"]
    assert list(sections) == [
        "environment",
        "in_process",
        "served[encoder_num_gpus=1,throughput_optimized=off]",
        "corpus",
    ]
    assert sections["in_process"]["mixed"]["tokens_per_s"] > 0
    served = sections["served[encoder_num_gpus=1,throughput_optimized=off]"]
    for name in ("mixed", "512_tokens"):
        assert served[name]["tokens_per_s"] > 0 and served[name]["over_in_process"] > 0
        assert set(served[name]["service_cpu_cores"]) == {"proxy", "ingress", "encoder", "ray"}
    assert served["queries_saturation"]["requests_per_s"] > 0 and served["lone_query"]["latency"]["p50_ms"] > 0
    assert served["query_under_bulk"]["latency"]["p95_ms"] > 0
    assert served["vectors"]["pass"] and served["vectors"]["cosine_min"] >= 0.999
    corpus = sections["corpus"]["gpus_per_actor_1"]
    assert corpus["embedded"] == sections["corpus"]["texts"] and corpus["tokens_per_s"] > 0
