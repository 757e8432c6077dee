"""Is an answer right? The checks of every load-test answer, named by failure kind.

An answer is right only with HTTP 200, one vector per input in input order, the expected
size, finite, unit length, and a ``usage.total_tokens``; 429/503 with Retry-After is
overload, counted apart from failures.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.request_mix import PlannedRequest

_loads: Callable[[bytes], Any]
try:  # decoding a 64 x 896 float answer is ~5x faster with orjson; the stdlib works too
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

OK, OVERLOAD = "ok", "overload"
OVERLOAD_STATUSES = (429, 503)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "ok", "overload", or the failure kind (http_500, wrong_dimension, ...)
    tokens: int = 0  # usage.total_tokens of a right answer
    message: str = ""  # details of one case (varies per request)

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def label(self) -> str:
        """Stable text naming the kind, so reports group failures by kind, not by detail."""
        return f"{self.outcome}: {self.message}" if self.outcome == OVERLOAD else self.outcome


def check_answer(
    status: int,
    headers: Mapping[str, str] | None,
    content: bytes | None,
    planned: PlannedRequest,
    norm_tolerance: float = 1e-3,
    error: BaseException | None = None,
) -> Verdict:
    """Is this the right answer to ``planned``? Anything but a right answer or overload is a failure.

    ``status`` 0 means no HTTP answer; ``error`` then says why (a timeout, a refused connection).
    """
    if not status:
        if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
            return Verdict("timeout", message=f"no answer in time ({type(error).__name__})")
        return Verdict("connection_error", message=f"no HTTP answer: {type(error).__name__}: {error}"[:300])
    if status != 200:
        retry_after = headers.get("retry-after") if headers is not None else None
        if status in OVERLOAD_STATUSES and retry_after:
            return Verdict(OVERLOAD, message=f"HTTP {status}")
        return Verdict(f"http_{status}", message=f"HTTP {status}: {(content or b'')[:200]!r}")
    try:
        answer = _loads(content or b"")
        data = answer["data"]
        usage = answer["usage"]
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict("bad_json", message=f"not an embeddings answer: {type(exc).__name__}: {exc}"[:300])
    if not isinstance(data, list) or len(data) != planned.n_inputs:
        got = len(data) if isinstance(data, list) else type(data).__name__
        return Verdict("wrong_count", message=f"{got} embeddings for {planned.n_inputs} inputs")
    try:
        items = sorted(data, key=lambda d: d["index"])
        if [d["index"] for d in items] != list(range(planned.n_inputs)):
            return Verdict("wrong_index", message="indices are not 0..n-1")
        vectors = [_vector(d["embedding"], planned.encoding) for d in items]
    except (KeyError, TypeError, ValueError) as exc:
        return Verdict("bad_json", message=f"bad embedding item: {type(exc).__name__}: {exc}"[:300])
    for i, v in enumerate(vectors):
        if v.shape != (planned.dim,):
            return Verdict("wrong_dimension", message=f"item {i} has {v.size} dims, expected {planned.dim}")
        if not np.isfinite(v).all():
            return Verdict("non_finite", message=f"item {i} has NaN or inf")
        norm = float(np.sqrt(np.dot(v.astype(np.float64), v.astype(np.float64))))
        if abs(norm - 1.0) > norm_tolerance:
            return Verdict("not_unit", message=f"item {i} has norm {norm:.6f}, expected 1")
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < planned.n_inputs:
        return Verdict("bad_usage", message=f"usage.total_tokens is {tokens!r} for {planned.n_inputs} inputs")
    return Verdict(OK, tokens=tokens)


def _vector(embedding: object, encoding: str) -> np.ndarray:
    if encoding == "base64":
        if not isinstance(embedding, str):
            raise TypeError(f"base64 was asked for, got {type(embedding).__name__}")
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 payload of {len(raw)} bytes is not float32")
        return np.frombuffer(raw, dtype="<f4")
    if not isinstance(embedding, list):
        raise TypeError(f"float was asked for, got {type(embedding).__name__}")
    return np.asarray(embedding, dtype=np.float64)
