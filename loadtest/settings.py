"""What the load test sends and how it checks it: the settings, their command-line options and LOADTEST_* variables.

The runner's argparse and ``locust -f`` take the same options (``add_traffic_arguments``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

#: The request kinds a mix weighs (``loadtest.request_mix`` builds them).
KINDS = ("query", "docs")


def parse_mix(text: str) -> dict[str, float]:
    """``"query=9,docs=1"`` -> weights; unknown kinds and negative weights are errors."""
    mix: dict[str, float] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        kind, sep, weight = part.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in mix {text!r}; kinds: {', '.join(KINDS)}")
        mix[kind] = float(weight) if sep else 1.0
        if mix[kind] < 0:
            raise ValueError(f"negative weight in mix {text!r}")
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no request kind with a positive weight")
    return mix


def parse_range(text: str) -> tuple[int, int]:
    """``"8-64"`` -> (8, 64); ``"16"`` -> (16, 16)."""
    lo, _, hi = str(text).partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"bad range {text!r}: want LO-HI with 1 <= LO <= HI")
    return lo_i, hi_i


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LOADTEST_{name}", default)


@dataclass
class Settings:
    """What to send and how to check it. Defaults come from LOADTEST_* environment variables."""

    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    expected_dim: int | None = None  # None: probed once (the length of one float answer)
    mix: dict[str, float] = field(default_factory=lambda: {"query": 9.0, "docs": 1.0})
    batch_size: tuple[int, int] = (8, 64)  # texts per document request
    query_tokens: tuple[int, int] = (5, 30)
    passage_tokens: tuple[int, int] = (100, 400)
    base64_share: float = 0.7  # the openai client asks for base64 unless told otherwise
    dimensions_share: float = 0.25
    dimensions_choices: tuple[int, ...] = (512, 256, 128, 64)
    extensions: bool = True  # send `instruction` / `input_type` (off for plain OpenAI)
    seed: int = 1234
    timeout_s: float = 120.0
    norm_tolerance: float = 1e-3

    def describe_mix(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.mix.items())


def add_traffic_arguments(parser: Any) -> None:
    """The traffic options, for the runner's argparse and for ``locust -f`` (same names).

    ``parser``: an argparse parser, or locust's (configargparse) one.
    """
    d = Settings()
    g = parser.add_argument_group("traffic (kalm load test)") if hasattr(parser, "add_argument_group") else parser
    g.add_argument(
        "--api-key",
        default=None,  # read from the environment later: never shown in --help
        help="Bearer key [LOADTEST_API_KEY, else OPENAI_API_KEY]",
    )
    g.add_argument("--model", default=_env("MODEL"), help="model id [LOADTEST_MODEL; default: from /v1/models]")
    g.add_argument(
        "--expected-dim",
        type=int,
        default=_env("EXPECTED_DIM"),
        help="native embedding size [LOADTEST_EXPECTED_DIM; default: probed once]",
    )
    g.add_argument(
        "--mix",
        default=_env("MIX", d.describe_mix()),
        help="request kinds and weights, e.g. query=9,docs=1 [LOADTEST_MIX]",
    )
    g.add_argument(
        "--batch-size",
        default=_env("BATCH_SIZE", "%d-%d" % d.batch_size),
        help="texts per document request, LO-HI [LOADTEST_BATCH_SIZE]",
    )
    g.add_argument(
        "--query-tokens",
        default=_env("QUERY_TOKENS", "%d-%d" % d.query_tokens),
        help="tokens per query, LO-HI [LOADTEST_QUERY_TOKENS]",
    )
    g.add_argument(
        "--passage-tokens",
        default=_env("PASSAGE_TOKENS", "%d-%d" % d.passage_tokens),
        help="tokens per passage, LO-HI [LOADTEST_PASSAGE_TOKENS]",
    )
    g.add_argument(
        "--base64-share",
        type=float,
        default=_env("BASE64_SHARE", str(d.base64_share)),
        help="share of requests asking for base64 [LOADTEST_BASE64_SHARE]",
    )
    g.add_argument(
        "--dimensions-share",
        type=float,
        default=_env("DIMENSIONS_SHARE", str(d.dimensions_share)),
        help="share of requests sending `dimensions` [LOADTEST_DIMENSIONS_SHARE]",
    )
    g.add_argument(
        "--dimensions-choices",
        default=_env("DIMENSIONS_CHOICES", ",".join(map(str, d.dimensions_choices))),
        help="values for `dimensions` (those above the native size are dropped) [LOADTEST_DIMENSIONS_CHOICES]",
    )
    g.add_argument(
        "--no-extensions",
        action="store_true",
        default=_env("EXTENSIONS", "1") == "0",
        help="send no `instruction`/`input_type` (plain OpenAI endpoints) [LOADTEST_EXTENSIONS=0]",
    )
    g.add_argument("--seed", type=int, default=_env("SEED", str(d.seed)), help="workload seed [LOADTEST_SEED]")
    g.add_argument(
        "--request-timeout",
        type=float,
        default=_env("REQUEST_TIMEOUT", str(d.timeout_s)),
        help="seconds before a request counts as failed [LOADTEST_REQUEST_TIMEOUT]",
    )


def settings_from_args(ns: argparse.Namespace) -> Settings:
    expected = getattr(ns, "expected_dim", None)
    return Settings(
        api_key=ns.api_key or _env("API_KEY") or os.environ.get("OPENAI_API_KEY") or None,
        model=ns.model or None,
        expected_dim=int(expected) if expected not in (None, "") else None,
        mix=parse_mix(ns.mix),
        batch_size=parse_range(ns.batch_size),
        query_tokens=parse_range(ns.query_tokens),
        passage_tokens=parse_range(ns.passage_tokens),
        base64_share=float(ns.base64_share),
        dimensions_share=float(ns.dimensions_share),
        dimensions_choices=tuple(int(x) for x in str(ns.dimensions_choices).split(",") if x.strip()),
        extensions=not ns.no_extensions,
        seed=int(ns.seed),
        timeout_s=float(ns.request_timeout),
    )
