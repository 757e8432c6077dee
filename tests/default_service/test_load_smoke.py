"""CI's smoke load: `python -m loadtest.run` (locust) against the service on the tiny stand-in."""

from __future__ import annotations

import csv

import pytest

from tests.loadtest_cli import run_loadtest

pytestmark = pytest.mark.serve


def test_smoke_load_against_tiny_standin(service, tiny_model_dir, tmp_path):
    rc, summary, output = run_loadtest(
        service.base_url, tmp_path, "--users", "4", "--spawn-rate", "4", "--duration", "20", timeout=180
    )
    assert rc == 0, output
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    t = summary["total"]
    assert t["requests_per_s"] > 0 and t["tokens_per_s"] > 0 and t["failures"] == 0, output
    assert summary["locust_exceptions"] == 0
    assert summary["model"] == tiny_model_dir.name and summary["expected_dim"] == 64
    assert set(summary["by_kind"]) <= {"query", "docs"} and summary["by_kind"]["query"]["ok"] > 0
    stats = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "locust_stats.csv"))}
    assert int(stats["Aggregated"]["Request Count"]) == t["requests"]
    assert int(stats["Aggregated"]["Failure Count"]) == 0
