"""The benchmark's workloads: seeded lists of requests (queries with an instruction, passages, long documents)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtest.texts import random_text
from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION


@dataclass(frozen=True)
class Request:
    kind: str  # query | passages | long
    texts: tuple[str, ...]
    instruction: str | None = None


def _query(rng: random.Random) -> Request:
    return Request("query", (random_text(rng, (5, 30), question=True),), KALM_QUERY_INSTRUCTION)


def make_side_by_side_workload(queries: int = 60, passage_requests: int = 15, seed: int = 0) -> list[Request]:
    """The side-by-side workload: ``queries`` single queries (with instruction) and ``passage_requests``
    requests of 4 passages of 100-400 tokens, in a seeded random order."""
    rng = random.Random(seed)
    kinds = ["query"] * queries + ["passages"] * passage_requests
    rng.shuffle(kinds)
    return [
        _query(rng) if kind == "query" else Request("passages", tuple(random_text(rng, (100, 400)) for _ in range(4)))
        for kind in kinds
    ]


def make_workload(n_requests: int, seed: int = 0) -> list[Request]:
    """55% single queries (with instruction), 40% 1-4 passages of 100-400 tokens, 5% (at least one) a
    2-4k-token document; in a seeded random order."""
    rng = random.Random(seed)
    n_long = max(1, round(0.05 * n_requests))
    n_passages = round(0.40 * n_requests)
    kinds = ["long"] * n_long + ["passages"] * n_passages + ["query"] * (n_requests - n_long - n_passages)
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        if kind == "query":
            out.append(_query(rng))
        elif kind == "passages":
            out.append(Request("passages", tuple(random_text(rng, (100, 400)) for _ in range(rng.randint(1, 4)))))
        else:
            out.append(Request("long", (random_text(rng, (2000, 4000)),)))
    return out
