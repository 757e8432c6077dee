"""The requests of the load test: drawn by the mix from the corpus, each with what its answer must be."""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtest.settings import Settings
from loadtest.texts import Corpus

INSTRUCTIONS = [
    "Given a web search query, retrieve relevant passages that answer the query",
    "Given a question, retrieve Wikipedia passages that answer the question",
    "Given a user question, retrieve documentation that helps answer it",
    "Retrieve semantically similar text",
    "Given a claim, find documents that support or refute it",
]


@dataclass(frozen=True)
class PlannedRequest:
    kind: str
    body: dict
    n_inputs: int
    dim: int  # the length every returned vector must have
    encoding: str


class RequestFactory:
    """Draws requests by the mix; one per locust user, each with its own seeded RNG."""

    def __init__(self, settings: Settings, corpus: Corpus, stream: int = 0):
        if settings.model is None or settings.expected_dim is None:
            raise ValueError("settings need model and expected_dim (see loadtest.target.discover())")
        self.s = settings
        self.corpus = corpus
        self.rng = random.Random(f"{settings.seed}/{stream}")
        self.kinds = [k for k, w in settings.mix.items() if w > 0]
        self.weights = [settings.mix[k] for k in self.kinds]
        self.native: int = settings.expected_dim
        self.dims = [d for d in settings.dimensions_choices if d <= self.native] or [max(1, self.native // 2)]

    def next(self) -> PlannedRequest:
        rng, s = self.rng, self.s
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        encoding = "base64" if rng.random() < s.base64_share else "float"
        body: dict = {"model": s.model, "encoding_format": encoding}
        if kind == "query":
            body["input"] = rng.choice(self.corpus.queries)
            n = 1
            if s.extensions:
                body["instruction"] = rng.choice(INSTRUCTIONS)
        else:
            n = rng.randint(*s.batch_size)
            body["input"] = [rng.choice(self.corpus.passages) for _ in range(n)]
            if s.extensions:
                body["input_type"] = "document"
        dim = self.native
        if rng.random() < s.dimensions_share:
            dim = body["dimensions"] = rng.choice(self.dims)
        return PlannedRequest(kind, body, n, dim, encoding)
