"""Dynamic batching across callers under a token budget, with interactive work first.

Every caller's inputs go into one pending pool, in two lanes (``batching.lanes``: which
work goes next, how a batch is formed, ageing). This loop repeatedly asks the lanes for
the next step and runs each batch on a single model thread while it keeps accepting work.
A running bulk batch stops at its next step (a layer boundary; on CPU also a piece of a long
layer) when the lanes say interactive work that just arrived goes first (**preemption**),
and goes on later from where it stopped. A full queue refuses new work with a Retry-After drawn from recent throughput.

Knows nothing of Ray or HTTP; the encoder replicas wrap it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import OverloadedError
from .lanes import Batch, DecayingTotal, Lanes, Resume, Start
from .planning import BatchStats

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """A forward pass that can stop between steps (``serve_app.core.encoder.BatchRun``)."""

    def run(self, should_yield: Callable[[], bool] | None = None) -> bool: ...
    def result(self) -> tuple[np.ndarray, BatchStats]: ...


StartBatch = Callable[[list[list[int]]], BatchRunner]

#: Budget of a batch led by interactive work unless configured (else: max_batch_tokens).
#: CPU: below a full batch, so a query that arrives while one runs still finishes within
#: about 2 s on 2 cores (batch times: docs/measurements/2026-11-27-priority-scheduling.md).
#: CUDA: a full batch takes milliseconds (docs/measurements/2026-11-30-gpu.md).
DEFAULT_INTERACTIVE_BATCH_TOKENS = {"cpu": 384}


@dataclass
class EmbedResult:
    """Vectors of one call, in input order, and where its time went."""

    vectors: np.ndarray
    queue_s: float  # arrival → first of its inputs enters a batch
    inference_s: float  # first batch start → last batch end
    batches: int
    revision: str = ""  # what made the vectors (set by the replica): chunks of one request must agree


@dataclass(eq=False)
class _Call:
    vectors: np.ndarray
    remaining: int
    future: asyncio.Future
    arrived: float
    started: float | None = None
    batches: int = 0


@dataclass(eq=False)
class _Run:
    """A batch's forward pass: made on the model thread when the batch first runs, kept while it is paused."""

    batch: Batch[_Call]
    runner: BatchRunner | None = None
    last_run_s: float = 0.0  # compute time of its latest stretch on the model thread


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
    dropped_inputs: int = 0  # queued inputs of cancelled calls, dropped uncomputed
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
        on_drop: Callable[[int], None] | None = None,
    ):
        self._start_batch = start_batch
        self.dimensions = dimensions
        self.interactive_batch_tokens = min(interactive_batch_tokens or max_batch_tokens, max_batch_tokens)
        now = time.monotonic()
        self.lanes: Lanes[_Call] = Lanes(
            max_batch_tokens,
            self.interactive_batch_tokens,
            max_batch_wait_s,
            max_padding_fraction,
            packed,  # how start_batch lays out a batch; decides what a batch costs
            interactive_max_share,
            share_window_s,
            now,
        )
        self.max_queued_tokens = max_queued_tokens
        self._on_batch = on_batch
        self._on_drop = on_drop
        # recent throughput for Retry-After: padded tokens and busy seconds, decaying like the lane shares
        self._recent_tokens = DecayingTotal(share_window_s, now)
        self._recent_busy_s = DecayingTotal(share_window_s, now)
        self.queued_tokens = 0
        self.stats = SchedulerStats()
        self._paused_runs: dict[Batch[_Call], _Run] = {}
        self._running: Batch[_Call] | None = None
        self._preempt = False  # read by the model thread between steps
        self._stoppable_from = 0.0  # monotonic time before which the running batch is not stopped
        self._wakeup = asyncio.Event()  # one per event loop: _ensure_loop makes a new one with the loop task
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @classmethod
    def for_encoder(
        cls,
        encoder,
        config,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> TokenBudgetBatcher:
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
            on_drop=on_drop,
        )

    # --- callers -------------------------------------------------------------------

    async def embed(self, token_ids: Sequence[Sequence[int]], priority: str = "bulk") -> EmbedResult:
        """Embed ``token_ids`` (native size); returns when every input has run."""
        self._ensure_loop()
        n_tokens = sum(len(ids) for ids in token_ids)
        if self.queued_tokens + n_tokens > self.max_queued_tokens and self.queued_tokens > 0:
            raise OverloadedError(
                f"replica queue is full ({self.queued_tokens} tokens queued); retry shortly",
                retry_after_s=self.estimated_wait_s(),
            )
        now = time.monotonic()
        call = _Call(
            np.empty((len(token_ids), self.dimensions), np.float32),
            len(token_ids),
            asyncio.get_running_loop().create_future(),
            now,
        )
        interactive = priority == "interactive"
        self.lanes.add(call, token_ids, interactive, now)
        self.queued_tokens += n_tokens
        if interactive and self.lanes.preempts(self._running):
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
        """Rough time to drain the queue at the recent throughput (batches of the last
        ``share_window_s`` or so weigh most); 1 s before any batch ran.

        Not the average since start: after a restart that comes from a few tiny batches and
        says hours. The HTTP layer clamps what it sends as Retry-After.
        """
        if not self._recent_busy_s.value or not self._recent_tokens.value:
            return 1.0
        return self.queued_tokens / (self._recent_tokens.value / self._recent_busy_s.value)

    def _drop(self, call: _Call) -> None:
        """A cancelled caller's queued inputs are dropped, not computed."""
        dropped = self.lanes.drop(call)
        self.queued_tokens -= sum(len(item.ids) for item in dropped)
        if dropped:
            self.stats.dropped_inputs += len(dropped)
            if self._on_drop is not None:
                try:
                    self._on_drop(len(dropped))
                except Exception:  # metrics must never break cancellation
                    log.exception("drop observer failed")

    # --- the loop ------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_forever())

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            run = await self._next_run()
            batch = run.batch
            # Bulk work that went ahead of waiting queries (aged) runs for about a full batch's time,
            # then lets them in at its next step: they are waiting already, so no new arrival would
            # stop it (closed-loop clients send none), and one long text would hold them to its end.
            self._running = batch
            went_ahead = self.lanes.interactive_waiting() and self.lanes.preempts(batch)
            self._preempt = went_ahead
            self._stoppable_from = time.monotonic() + self._full_batch_s() if went_ahead else 0.0
            try:
                done = await loop.run_in_executor(self._executor, self._run_on_model_thread, run)
                if done:
                    assert run.runner is not None, "_run_on_model_thread made it"
                    vectors, stats = run.runner.result()
            except Exception as exc:  # a failed batch fails its callers, never the loop
                log.exception("batch of %d inputs failed", len(batch.inputs))
                for call in {item.caller for item in batch.inputs}:
                    if not call.future.done():
                        call.future.set_exception(exc)
                continue
            finally:
                self._running = None
                self.lanes.account(batch, run.last_run_s, time.monotonic())
            if not done:
                self.lanes.pause(batch)
                self._paused_runs[batch] = run
                self.stats.preemptions += 1
                continue
            self._record(stats)
            for item, vector in zip(batch.inputs, vectors):
                call = item.caller
                call.vectors[item.index] = vector
                call.remaining -= 1
                if call.remaining == 0 and not call.future.done():
                    call.future.set_result(None)
            for call in {item.caller for item in batch.inputs}:
                call.batches += 1

    async def _next_run(self) -> _Run:
        """What the lanes say runs next: a paused run, or a new batch; waits while nothing is due."""
        while True:
            step = self.lanes.next_step(time.monotonic())
            if isinstance(step, Resume):
                return self._paused_runs.pop(step.batch)
            if isinstance(step, Start):
                self._starting(step.batch)
                return _Run(step.batch)
            self._wakeup.clear()
            if step.seconds is None:
                await self._wakeup.wait()
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), step.seconds)
            except asyncio.TimeoutError:
                pass

    def _starting(self, batch: Batch[_Call]) -> None:
        """Its inputs leave the queue; callers whose first input this is stop queueing."""
        now = time.monotonic()
        for item in batch.inputs:
            if item.caller.started is None:
                item.caller.started = now
                self.stats.longest_queue_s = max(self.stats.longest_queue_s, now - item.caller.arrived)
        self.queued_tokens -= sum(len(item.ids) for item in batch.inputs)

    def _run_on_model_thread(self, run: _Run) -> bool:
        """Start or resume ``run``; False if it stopped to let other work in."""
        if run.runner is None:
            run.runner = self._start_batch([item.ids for item in run.batch.inputs])
        started = time.perf_counter()
        try:
            return run.runner.run(self._should_yield)
        finally:
            run.last_run_s = time.perf_counter() - started

    def _should_yield(self) -> bool:
        return self._preempt and time.monotonic() >= self._stoppable_from

    def _full_batch_s(self) -> float:
        """A full batch's time (``max_batch_tokens``) at the recent throughput; 0 before any batch ran."""
        if not self._recent_busy_s.value or not self._recent_tokens.value:
            return 0.0
        return self.lanes.max_batch_tokens / (self._recent_tokens.value / self._recent_busy_s.value)

    def _record(self, stats: BatchStats) -> None:
        s = self.stats
        s.batches += 1
        s.rows += stats.rows
        s.tokens += stats.tokens
        s.padded_tokens += stats.padded_tokens
        s.busy_s += stats.seconds
        s.last_batches.append(stats)
        now = time.monotonic()
        self._recent_tokens.add(stats.padded_tokens, now)
        self._recent_busy_s.add(stats.seconds, now)
        if self._on_batch is not None:
            try:
                self._on_batch(stats)
            except Exception:  # metrics must never stop the batching loop
                log.exception("batch observer failed")

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
