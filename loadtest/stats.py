"""Percentiles of measured values: one definition (numpy's linear interpolation) for every report here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation between the closest ranks); NaN when empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def latency_summary_ms(seconds: Sequence[float]) -> dict:
    """p50/p95/p99/max in milliseconds (0.1 ms) and the count, of latencies in seconds; {} when there are none."""
    if not seconds:
        return {}
    ms = [s * 1e3 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
        "n": len(seconds),
    }
