"""The priority scenario: single queries at a steady rate while closed-loop bulk clients keep the target full.

One definition for the benchmark (``python -m loadtest.benchmark --scenario priority``: the in-process
batcher and a served URL, priority scheduling on and off) and the GPU check (``scripts/gpu_check.py``:
the batcher on one GPU, idle and under load). Callers say how one request is sent; this module says
when, and what is measured.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

#: Sends the i-th request of its kind and returns its tokens.
SendRequest = Callable[[int], Awaitable[int]]


@dataclass
class QueriesUnderBulkLoad:
    """What one run measured: latencies and tokens of the requests answered within its window."""

    seconds: float = 0.0  # the window: from the first query to the last bulk answer
    query_latencies_s: list[float] = field(default_factory=list)
    bulk_latencies_s: list[float] = field(default_factory=list)
    query_tokens: int = 0
    bulk_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return (self.query_tokens + self.bulk_tokens) / self.seconds

    @property
    def bulk_tokens_per_s(self) -> float:
        return self.bulk_tokens / self.seconds


async def queries_under_bulk_load(
    send_query: SendRequest,
    send_bulk: SendRequest,
    bulk_clients: int,
    query_interval_s: float,
    duration_s: float,
    warm_up_s: float = 0.0,
) -> QueriesUnderBulkLoad:
    """``bulk_clients`` clients send bulk requests back to back; after ``warm_up_s`` (the bulk backlog
    builds up), one query every ``query_interval_s`` for ``duration_s``, none waiting for the one before.

    The bulk clients stop once every query is answered, so each query meets the full load. Bulk
    answers that arrive during the warm-up are not counted.
    """
    result = QueriesUnderBulkLoad()
    window_start = math.inf
    stop = asyncio.Event()

    async def bulk_client(first: int) -> None:
        i = first
        while not stop.is_set():
            started = time.perf_counter()
            tokens = await send_bulk(i)
            answered = time.perf_counter()
            if answered >= window_start:
                result.bulk_tokens += tokens
                result.bulk_latencies_s.append(answered - started)
            i += bulk_clients

    async def query(i: int) -> None:
        started = time.perf_counter()
        tokens = await send_query(i)  # not `+= await ...`: that reads the total before awaiting
        result.query_tokens += tokens
        result.query_latencies_s.append(time.perf_counter() - started)

    clients = [asyncio.create_task(bulk_client(k)) for k in range(bulk_clients)]
    await asyncio.sleep(warm_up_s)
    window_start = time.perf_counter()
    sent, i = [], 0
    while time.perf_counter() - window_start < duration_s:
        sent.append(asyncio.create_task(query(i)))
        i += 1
        await asyncio.sleep(query_interval_s)
    await asyncio.gather(*sent)
    stop.set()
    await asyncio.gather(*clients)
    result.seconds = time.perf_counter() - window_start
    return result
