"""Dynamic batching across callers under a token budget, with interactive work first.

Every caller's inputs go into one pending pool. The loop repeatedly forms the next
batch and runs it on a single model thread while it keeps accepting work:

* **Order: earliest deadline first.** An input's deadline is its arrival time, plus
  ``bulk_slack_s`` for bulk work. Interactive inputs therefore overtake bulk ones,
  but bulk work that has waited longer than the slack goes first: nothing starves.
* **Batch: the head input plus compatible ones.** Pending inputs are added in deadline
  order while the padded cost (longest × rows) fits ``max_batch_tokens`` and padding
  stays under ``max_padding_fraction``: batches are filled with inputs of similar
  length, so a short query rides with other short inputs instead of being padded to
  a passage's length. An input longer than the budget runs alone.
* **Fill wait.** A batch below the budget waits at most ``max_batch_wait_s`` (from its
  head's arrival) for more work.

Knows nothing of Ray or HTTP; the encoder replicas wrap it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .encoder import BatchStats
from .errors import OverloadedError

log = logging.getLogger(__name__)

RunBatch = Callable[[list[list[int]]], "tuple[np.ndarray, BatchStats]"]

#: How many pending inputs (in deadline order) are looked at when forming one batch.
SCAN_LIMIT = 4096


@dataclass
class EmbedResult:
    """Vectors of one call, in input order, and where its time went."""

    vectors: np.ndarray
    queue_s: float  # arrival → first of its inputs enters a batch
    inference_s: float  # first batch start → last batch end
    batches: int


@dataclass(eq=False)
class _Call:
    vectors: np.ndarray
    remaining: int
    future: asyncio.Future
    arrived: float
    started: float | None = None
    batches: int = 0
    cancelled: bool = False


@dataclass(eq=False)
class _Input:
    ids: list[int]
    call: _Call
    index: int
    deadline: float
    taken: bool = False


@dataclass
class SchedulerStats:
    """Counters since start; read by metrics and benchmarks."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0
    longest_queue_s: float = 0.0
    last_batches: deque = field(default_factory=lambda: deque(maxlen=1024))


class TokenBudgetBatcher:
    """Batches token-id inputs from many concurrent callers onto one model."""

    def __init__(
        self,
        run_batch: RunBatch,
        dimensions: int,
        max_batch_tokens: int,
        max_batch_wait_s: float = 0.005,
        max_padding_fraction: float = 0.15,
        bulk_slack_s: float = 5.0,
        max_queued_tokens: int = 2_000_000,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self._run_batch = run_batch
        self.dimensions = dimensions
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait_s = max_batch_wait_s
        self.max_padding_fraction = max_padding_fraction
        self.bulk_slack_s = bulk_slack_s
        self.max_queued_tokens = max_queued_tokens
        self._on_batch = on_batch
        self._interactive: deque[_Input] = deque()
        self._bulk: deque[_Input] = deque()
        self.queued_tokens = 0
        self.stats = SchedulerStats()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    # --- callers -------------------------------------------------------------------

    async def embed(self, token_ids: Sequence[Sequence[int]], priority: str = "bulk") -> EmbedResult:
        """Embed ``token_ids`` (native size); returns when every input has run."""
        self._ensure_loop()
        n_tokens = sum(len(ids) for ids in token_ids)
        if self.queued_tokens + n_tokens > self.max_queued_tokens and self.queued_tokens > 0:
            raise OverloadedError(
                f"replica queue is full ({self.queued_tokens} tokens queued); retry shortly",
                retry_after_s=max(1.0, self.estimated_wait_s()),
            )
        now = time.monotonic()
        call = _Call(np.empty((len(token_ids), self.dimensions), np.float32), len(token_ids),
                     asyncio.get_running_loop().create_future(), now)
        interactive = priority == "interactive"
        lane = self._interactive if interactive else self._bulk
        deadline = now if interactive else now + self.bulk_slack_s
        for i, ids in enumerate(token_ids):
            lane.append(_Input(list(ids), call, i, deadline))
        self.queued_tokens += n_tokens
        self._wakeup.set()
        try:
            await call.future
        except asyncio.CancelledError:
            self._drop(call)
            raise
        return EmbedResult(call.vectors, call.started - call.arrived, time.monotonic() - call.started, call.batches)

    def estimated_wait_s(self) -> float:
        """Rough time to drain the queue at the throughput seen so far."""
        if not self.stats.busy_s or not self.stats.padded_tokens:
            return 1.0
        return self.queued_tokens / (self.stats.padded_tokens / self.stats.busy_s)

    @property
    def queued_inputs(self) -> int:
        return sum(1 for _ in self._live(self._interactive)) + sum(1 for _ in self._live(self._bulk))

    def _drop(self, call: _Call) -> None:
        """A cancelled caller's inputs are skipped, not computed."""
        call.cancelled = True
        for lane in (self._interactive, self._bulk):
            for item in lane:
                if item.call is call and not item.taken:
                    item.taken = True
                    self.queued_tokens -= len(item.ids)

    # --- the loop ------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            for item in batch:
                item.taken = True
                if item.call.started is None:
                    item.call.started = time.monotonic()
                    self.stats.longest_queue_s = max(self.stats.longest_queue_s,
                                                     item.call.started - item.call.arrived)
            self.queued_tokens -= sum(len(item.ids) for item in batch)
            try:
                vectors, stats = await loop.run_in_executor(self._executor, self._run_batch,
                                                            [item.ids for item in batch])
            except Exception as exc:  # a failed batch fails its callers, never the loop
                log.exception("batch of %d inputs failed", len(batch))
                for call in {item.call for item in batch}:
                    if not call.future.done():
                        call.future.set_exception(exc)
                continue
            self._record(stats)
            for item, vector in zip(batch, vectors):
                call = item.call
                call.vectors[item.index] = vector
                call.remaining -= 1
                if call.remaining == 0 and not call.future.done():
                    call.future.set_result(None)
            for call in {item.call for item in batch}:
                call.batches += 1

    async def _next_batch(self) -> list[_Input]:
        while True:
            self._trim()
            if not self._interactive and not self._bulk:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, cost = self._select()
            wait = batch[0].call.arrived + self.max_batch_wait_s - time.monotonic()
            if cost >= self.max_batch_tokens * 0.9 or wait <= 0:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _select(self) -> tuple[list[_Input], int]:
        """The head input (earliest deadline) and the compatible inputs that fit with it."""
        candidates = itertools.islice(self._by_deadline(), SCAN_LIMIT)
        head = next(candidates)
        batch, longest, real = [head], len(head.ids), len(head.ids)
        for item in candidates:
            if longest * (len(batch) + 1) > self.max_batch_tokens:
                break  # not even an input as short as the longest one fits any more
            new_longest = max(longest, len(item.ids))
            cost = new_longest * (len(batch) + 1)
            if cost > self.max_batch_tokens:
                continue
            if 1 - (real + len(item.ids)) / cost > self.max_padding_fraction:
                continue
            batch.append(item)
            longest, real = new_longest, real + len(item.ids)
        return batch, longest * len(batch)

    def _by_deadline(self) -> Iterator[_Input]:
        """Live pending inputs, merged from both lanes in deadline order."""
        inter, bulk = self._live(self._interactive), self._live(self._bulk)
        a, b = next(inter, None), next(bulk, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a.deadline <= b.deadline):
                yield a
                a = next(inter, None)
            else:
                yield b
                b = next(bulk, None)

    @staticmethod
    def _live(lane: deque) -> Iterator[_Input]:
        return (item for item in lane if not item.taken)

    def _trim(self) -> None:
        for lane in (self._interactive, self._bulk):
            while lane and lane[0].taken:
                lane.popleft()

    def _record(self, stats: BatchStats) -> None:
        s = self.stats
        s.batches += 1
        s.rows += stats.rows
        s.tokens += stats.tokens
        s.padded_tokens += stats.padded_tokens
        s.busy_s += stats.seconds
        s.last_batches.append(stats)
        if self._on_batch is not None:
            self._on_batch(stats)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
