"""The null engine: a stand-in for batcher + model that answers at once, with no model loaded.

Selected by ``ServiceConfig.engine = "null"``; never the default. Every input gets the same unit
vector of the model's width, so the whole served path (proxy → ingress → replica → back) can be
measured without the model's cost (``python -m loadtest.benchmark --scenario host-path``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scheduler import EmbedResult, SchedulerStats


class NullEngine:
    """What an encoder replica's batcher offers (``embed``, ``stats``, ``queued_tokens``), doing no work."""

    def __init__(self, dimensions: int):
        self.dimensions = dimensions
        self.vector = np.full(dimensions, dimensions**-0.5, np.float32)  # unit length
        self.stats = SchedulerStats()
        self.queued_tokens = 0

    async def embed(self, token_ids: Sequence[Sequence[int]], priority: str = "bulk") -> EmbedResult:
        self.stats.rows += len(token_ids)
        self.stats.tokens += sum(len(ids) for ids in token_ids)
        return EmbedResult(np.tile(self.vector, (len(token_ids), 1)), queue_s=0.0, inference_s=0.0, batches=0)

    def close(self) -> None:
        pass
