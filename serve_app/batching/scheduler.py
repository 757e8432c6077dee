"""Dynamic batching across callers under a token budget, with interactive work first.

Every caller's inputs go into one pending pool. The loop repeatedly forms the next
batch and runs it on a single model thread while it keeps accepting work:

* **Order: two lanes.** Interactive inputs go first, in arrival order, as long as the
  interactive lane has used less than ``interactive_max_share`` of the recent compute
  (a decaying window; a batch's time is split between the lanes by their tokens in it);
  past that share bulk work goes first. So a query never waits behind a bulk backlog,
  however deep, and bulk work still gets at least ``1 - interactive_max_share`` of the
  device when queries alone could fill it: nothing starves. Within a lane, first come,
  first served.
* **Batch: the head input plus what fits.** Pending inputs are added in that order
  while the batch's cost fits the budget (packed batches: real tokens; padded ones:
  longest × rows, and padding under ``max_padding_fraction``). An input longer than the
  budget runs alone.
* **A query joins a full batch.** A batch led by interactive work is topped up with
  pending bulk inputs (in their order, those that fit), so a query is not a tiny,
  wasteful forward pass of its own: one pass over the weights costs about as much as
  ~40 tokens of work on CPU. Its budget, ``interactive_batch_tokens``, may be set below
  ``max_batch_tokens`` where a full batch takes longer than queries may wait.
* **Fill wait.** A batch below its budget waits at most ``max_batch_wait_s`` (from its
  head's arrival) for more work.
* **Preemption between layers.** A running bulk batch stops at the next layer boundary
  when interactive work arrives that may go first; it resumes from where it stopped
  once no interactive work is waiting (or the share says bulk's turn).
* **Ageing.** The oldest pending bulk input, or the oldest paused batch, goes next once
  ``MAX_PASSED_OVER`` batches have started ahead of it, and is then not preempted
  (queries still ride in its batch): under a steady stream of queries, a bulk input too
  long for a query's batch would otherwise wait for a gap that never comes.

Knows nothing of Ray or HTTP; the encoder replicas wrap it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import OverloadedError
from .planning import BatchStats, batch_cost

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """A forward pass that can stop between layers (``serve_app.core.encoder.BatchRun``)."""

    def run(self, should_yield: Callable[[], bool] | None = None) -> bool: ...
    def result(self) -> tuple[np.ndarray, BatchStats]: ...


StartBatch = Callable[[list[list[int]]], BatchRunner]

#: How many pending inputs (in lane order) are looked at when forming one batch.
SCAN_LIMIT = 4096

#: Ageing: a bulk input, or a paused bulk batch, passed over this many times for
#: interactive work goes next (queries still ride along), so nothing waits long behind
#: queries, however steady; long bulk inputs never fit a query's smaller batch otherwise.
MAX_PASSED_OVER = 2

#: Budget of a batch led by interactive work unless configured (else: max_batch_tokens).
#: CPU: ~0.9 s of KaLM in bf16 on 2 cores, so a query that arrives while one runs still
#: finishes in about 2 s; a full 512-token batch is 1.2 s. CUDA: a full batch is milliseconds.
DEFAULT_INTERACTIVE_BATCH_TOKENS = {"cpu": 384}


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
    interactive: bool
    taken: bool = False
    passed_over: int = 0  # batches started while it was the oldest pending bulk input


@dataclass(eq=False)
class _Job:
    """A formed batch: its inputs, its lane, and its forward pass."""

    inputs: list[_Input]
    interactive: bool  # holds interactive work: never preempted
    interactive_fraction: float  # share of its tokens that are interactive: its compute is split so
    runner: BatchRunner | None = None  # made on the model thread, when the job first runs
    last_run_s: float = 0.0  # compute time of its latest stretch on the model thread
    passed_over: int = 0  # while paused: batches started ahead of it

    @property
    def preemptible(self) -> bool:
        """Bulk work that has not aged: interactive work may stop it between layers."""
        return not self.interactive and self.passed_over < MAX_PASSED_OVER


@dataclass
class SchedulerStats:
    """Counters since start; read by metrics and benchmarks."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0
    longest_queue_s: float = 0.0
    preemptions: int = 0
    last_batches: deque = field(default_factory=lambda: deque(maxlen=1024))


class TokenBudgetBatcher:
    """Batches token-id inputs from many concurrent callers onto one model."""

    def __init__(
        self,
        start_batch: StartBatch,
        dimensions: int,
        max_batch_tokens: int,
        max_batch_wait_s: float = 0.005,
        max_padding_fraction: float = 0.15,
        packed: bool = False,
        interactive_batch_tokens: int | None = None,
        interactive_max_share: float = 0.5,
        share_window_s: float = 30.0,
        max_queued_tokens: int = 2_000_000,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        self._start_batch = start_batch
        self.dimensions = dimensions
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait_s = max_batch_wait_s
        self.max_padding_fraction = max_padding_fraction
        self.packed = packed  # how start_batch lays out a batch; decides what a batch costs
        self.interactive_batch_tokens = min(interactive_batch_tokens or max_batch_tokens, max_batch_tokens)
        self.interactive_max_share = interactive_max_share
        self.share_window_s = share_window_s
        self._compute_s = {True: 0.0, False: 0.0}  # decaying compute seconds per lane (True: interactive)
        self._compute_at = time.monotonic()
        self.max_queued_tokens = max_queued_tokens
        self._on_batch = on_batch
        self._interactive: deque[_Input] = deque()
        self._bulk: deque[_Input] = deque()
        self.queued_tokens = 0
        self.stats = SchedulerStats()
        self._paused: list[_Job] = []
        self._running: _Job | None = None
        self._preempt = False  # read by the model thread between layers
        self._wakeup = asyncio.Event()  # one per event loop: _ensure_loop makes a new one with the loop task
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @classmethod
    def for_encoder(cls, encoder, config, on_batch: Callable[[BatchStats], None] | None = None) -> TokenBudgetBatcher:
        """The batcher the service puts in front of ``encoder`` (a ``serve_app.Encoder``), as
        ``config`` (a ``ServiceConfig``) says."""
        return cls(
            encoder.start_batch,
            dimensions=encoder.dimensions,
            max_batch_tokens=encoder.max_batch_tokens,
            max_batch_wait_s=config.max_batch_wait_ms / 1000,
            max_padding_fraction=config.max_padding_fraction,
            packed=encoder.packed,
            interactive_batch_tokens=(
                config.interactive_batch_tokens or DEFAULT_INTERACTIVE_BATCH_TOKENS.get(encoder.device.type)
            ),
            interactive_max_share=config.interactive_max_share,
            max_queued_tokens=config.max_queued_tokens_per_replica,
            on_batch=on_batch,
        )

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
        call = _Call(
            np.empty((len(token_ids), self.dimensions), np.float32),
            len(token_ids),
            asyncio.get_running_loop().create_future(),
            now,
        )
        interactive = priority == "interactive"
        lane = self._interactive if interactive else self._bulk
        for i, ids in enumerate(token_ids):
            lane.append(_Input(list(ids), call, i, interactive))
        self.queued_tokens += n_tokens
        if interactive and self._running is not None and self._running.preemptible and self._interactive_turn():
            self._preempt = True
        self._wakeup.set()
        try:
            await call.future
        except asyncio.CancelledError:
            self._drop(call)
            raise
        assert call.started is not None, "a finished call has started"
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
            job = await self._next_job()
            self._running, self._preempt = job, False
            try:
                done = await loop.run_in_executor(self._executor, self._run_job, job)
                if done:
                    assert job.runner is not None, "_run_job made it"
                    vectors, stats = job.runner.result()
            except Exception as exc:  # a failed batch fails its callers, never the loop
                log.exception("batch of %d inputs failed", len(job.inputs))
                for call in {item.call for item in job.inputs}:
                    if not call.future.done():
                        call.future.set_exception(exc)
                continue
            finally:
                self._running = None
                self._account(job)
            if not done:
                self._paused.append(job)
                self.stats.preemptions += 1
                continue
            self._record(stats)
            for item, vector in zip(job.inputs, vectors):
                call = item.call
                call.vectors[item.index] = vector
                call.remaining -= 1
                if call.remaining == 0 and not call.future.done():
                    call.future.set_result(None)
            for call in {item.call for item in job.inputs}:
                call.batches += 1

    def _run_job(self, job: _Job) -> bool:
        """On the model thread: start or resume ``job``; False if it stopped to let other work in."""
        if job.runner is None:
            job.runner = self._start_batch([item.ids for item in job.inputs])
        started = time.perf_counter()
        try:
            return job.runner.run(self._should_yield)
        finally:
            job.last_run_s = time.perf_counter() - started

    def _should_yield(self) -> bool:
        return self._preempt

    # --- the lanes ------------------------------------------------------------------

    def _account(self, job: _Job) -> None:
        """Add the job's last stretch of compute to its lane's decaying total."""
        now = time.monotonic()
        decay = 0.5 ** ((now - self._compute_at) / self.share_window_s)
        self._compute_at = now
        for lane in self._compute_s:
            self._compute_s[lane] *= decay
        self._compute_s[True] += job.last_run_s * job.interactive_fraction
        self._compute_s[False] += job.last_run_s * (1 - job.interactive_fraction)

    def interactive_share(self) -> float:
        total = self._compute_s[True] + self._compute_s[False]
        return self._compute_s[True] / total if total else 0.0

    def _interactive_turn(self) -> bool:
        """Interactive work may go first: it has used less than its share, or there is no bulk work."""
        return self.interactive_share() < self.interactive_max_share or not any(self._live(self._bulk))

    def _in_turn_order(self) -> Iterator[_Input]:
        """Live pending inputs, the lane whose turn it is first, each lane first come first served."""
        first, second = (self._interactive, self._bulk) if self._interactive_turn() else (self._bulk, self._interactive)
        return itertools.chain(self._live(first), self._live(second))

    async def _next_job(self) -> _Job:
        """A paused job when its lane is due, else a new batch."""
        while True:
            self._trim()
            head = next(self._in_turn_order(), None)
            # paused jobs are bulk, stopped for interactive work: they go on once none waits, or when aged
            if self._paused and (
                head is None or not head.interactive or self._paused[0].passed_over >= MAX_PASSED_OVER
            ):
                return self._paused.pop(0)
            if head is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, cost, budget = self._select()
            wait = batch[0].call.arrived + self.max_batch_wait_s - time.monotonic()
            if cost >= budget * 0.9 or wait <= 0:
                return self._start(batch)
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _start(self, batch: list[_Input]) -> _Job:
        now = time.monotonic()
        oldest_bulk = next(self._live(self._bulk), None)
        for item in batch:
            item.taken = True
            if item.call.started is None:
                item.call.started = now
                self.stats.longest_queue_s = max(self.stats.longest_queue_s, now - item.call.arrived)
        tokens = sum(len(item.ids) for item in batch)
        self.queued_tokens -= tokens
        if oldest_bulk is not None and not oldest_bulk.taken:
            oldest_bulk.passed_over += 1
        if self._paused:
            self._paused[0].passed_over += 1
        interactive_tokens = sum(len(item.ids) for item in batch if item.interactive)
        job = _Job(batch, interactive_tokens > 0, interactive_tokens / tokens if tokens else 0.0)
        if batch[0].passed_over >= MAX_PASSED_OVER:
            job.passed_over = batch[0].passed_over  # led by an aged input: runs to the end
        return job

    def _select(self) -> tuple[list[_Input], int, int]:
        """The head input and the inputs that fit with it, in turn order: (batch, cost, budget).

        The head is the first input in turn order, or an aged bulk input (with the full budget).
        """
        candidates: Iterator[_Input] = itertools.islice(self._in_turn_order(), SCAN_LIMIT)
        first = next(candidates)
        head = first
        oldest_bulk = next(self._live(self._bulk), None)
        if first.interactive and oldest_bulk is not None and oldest_bulk.passed_over >= MAX_PASSED_OVER:
            head, candidates = oldest_bulk, itertools.chain([first], candidates)
        budget = self.interactive_batch_tokens if head.interactive else self.max_batch_tokens
        batch, longest, real = [head], len(head.ids), len(head.ids)
        for item in candidates:
            if item is head:
                continue
            if batch_cost(len(batch) + 1, longest, real + 1, self.packed) > budget:
                break  # no input, however short, fits any more
            new_longest = max(longest, len(item.ids))
            cost = batch_cost(len(batch) + 1, new_longest, real + len(item.ids), self.packed)
            if cost > budget:
                continue
            if 1 - (real + len(item.ids)) / cost > self.max_padding_fraction:
                continue
            batch.append(item)
            longest, real = new_longest, real + len(item.ids)
        return batch, batch_cost(len(batch), longest, real, self.packed), budget

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
            try:
                self._on_batch(stats)
            except Exception:  # metrics must never stop the batching loop
                log.exception("batch observer failed")

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
