"""The prepared GPU check (`python -m scripts.gpu_check`) runs end to end: here in its CPU smoke mode, on the tiny stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "environment",
    "model",
    "load",
    "attention",
    "warm_up",
    "parity",
    "throughput",
    "mixed_throughput",
    "mixed_throughput_padded",
    "long_input",
    "scheduler",
]


def test_smoke_mode_writes_every_section(tiny_model_dir, tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_check", "--smoke", "--model-dir", str(tiny_model_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    failed = {name: s.get("error") or s.get("skipped") for name, s in report["sections"].items() if not s["ok"]}
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stderr[-3000:]}"
    sections = report["sections"]
    assert list(sections) == SECTIONS and report["failed_sections"] == []
    assert sections["environment"]["torch"] and sections["environment"]["commit"]
    assert sections["model"]["random_weights"] is True
    assert sections["parity"]["pass"] and sections["parity"]["cosine_to_float64_reference"]["min"] > 0.99999  # fp32
    for length in (128, 512, 2048):
        assert sections["throughput"][f"{length}_tokens"]["tokens_per_s_median"] > 0
    assert sections["mixed_throughput"]["tokens_per_s_median"] > 0
    assert sections["mixed_throughput_padded"]["tokens_per_round"] == sections["mixed_throughput"]["tokens_per_round"]
    assert sections["long_input"]["tokens"] == 2048 and len(sections["long_input"]["runs"]) == 2
    loaded = sections["scheduler"]["under_bulk_load"]
    assert (
        loaded["queries"] > 0 and loaded["bulk_tokens_per_s"] > 0 and loaded["query_p95_ms"] >= loaded["query_p50_ms"]
    )
    assert report["layout"] == {"packed": True, "attention": "per-text SDPA"}  # the CPU's own path
