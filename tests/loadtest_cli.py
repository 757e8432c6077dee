"""Run the load test as a user does (`python -m loadtest.run ...`) and read what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service_harness import ROOT


def run_loadtest(host: str, out: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", host, "--out", str(out), "--quiet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return proc.returncode, summary, output
