"""TokenBudgetBatcher, the loop: callers, the model thread, preemption, failures, a full queue.

Which work goes next is the lanes' policy, tested on its own in ``test_lanes.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_app.batching.planning import BatchStats
from serve_app.batching.scheduler import TokenBudgetBatcher
from serve_app.errors import OverloadedError


class FakeModel:
    """Embeds an input as [len, first id, 0...] in ``layers`` steps; records every batch it starts.

    ``model.start_batch`` is what the batcher is given, like ``Encoder.start_batch``.
    """

    def __init__(
        self,
        seconds_per_token: float = 0.0,
        fail_on: int | None = None,
        layers: int = 4,
        reported_seconds_per_token: float = 0.0,
    ):
        self.batches: list[list[list[int]]] = []
        self.seconds_per_token = seconds_per_token
        self.reported_seconds_per_token = reported_seconds_per_token  # the compute time its batches report
        self.fail_on = fail_on
        self.layers = layers
        self.lock = threading.Lock()

    def start_batch(self, token_ids):
        with self.lock:
            self.batches.append(token_ids)
        return FakeRun(self, token_ids)


class FakeRun:
    def __init__(self, model: FakeModel, token_ids):
        self.model, self.token_ids, self.done_layers, self.yields = model, token_ids, 0, 0

    def run(self, should_yield=None) -> bool:
        if self.model.fail_on is not None and any(self.model.fail_on in ids for ids in self.token_ids):
            raise RuntimeError("boom")
        padded = max(map(len, self.token_ids)) * len(self.token_ids)
        while self.done_layers < self.model.layers:
            time.sleep(self.model.seconds_per_token * padded / self.model.layers)
            self.done_layers += 1
            if self.done_layers < self.model.layers and should_yield is not None and should_yield():
                self.yields += 1
                return False
        return True

    def result(self):
        out = np.zeros((len(self.token_ids), 4), np.float32)
        for i, ids in enumerate(self.token_ids):
            out[i, :2] = len(ids), ids[0]
        padded = max(map(len, self.token_ids)) * len(self.token_ids)
        seconds = self.model.reported_seconds_per_token * padded
        return out, BatchStats(len(self.token_ids), sum(map(len, self.token_ids)), padded, seconds)


def inputs(*lengths, first=1):
    return [[first + i] * n for i, n in enumerate(lengths)]


pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(coro)


async def timed(finished: dict[str, float], name: str, coro):
    """``await coro``, noting in ``finished[name]`` when it returned."""
    result = await coro
    finished[name] = time.monotonic()
    return result


def test_concurrent_callers_share_batches_and_get_their_own_rows():
    model = FakeModel()
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=64, max_batch_wait_s=0.05)

    async def main():
        calls = [batcher.embed(inputs(3, 5, first=10 * k), "bulk") for k in range(1, 6)]
        return await asyncio.gather(*calls)

    results = run(main())
    for k, result in enumerate(results, start=1):
        np.testing.assert_array_equal(result.vectors[:, :2], [[3, 10 * k], [5, 10 * k + 1]])
    assert len(model.batches) < 5  # callers were batched together
    for batch in model.batches:
        assert max(map(len, batch)) * len(batch) <= 64


def test_big_request_is_split_and_over_budget_input_runs_alone():
    model = FakeModel()
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=32, max_batch_wait_s=0)
    result = run(batcher.embed(inputs(8, 8, 8, 8, 8, 8, 100, 8), "bulk"))
    assert result.vectors[:, 0].tolist() == [8, 8, 8, 8, 8, 8, 100, 8]
    assert [len(b) for b in model.batches if len(b[0]) == 100] == [1]
    assert result.batches >= 3


def test_interactive_query_overtakes_queued_bulk_work():
    model = FakeModel(seconds_per_token=0.0005)  # 64-token batch ≈ 32 ms
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=64, max_batch_wait_s=0)
    done: list[str] = []

    async def tagged(name, coro):
        await coro
        done.append(name)

    async def main():
        bulk = [
            asyncio.create_task(tagged(f"bulk{k}", batcher.embed(inputs(32, 32, first=k * 10), "bulk")))
            for k in range(10)
        ]
        await asyncio.sleep(0.01)  # bulk is queued and running
        query = asyncio.create_task(tagged("query", batcher.embed(inputs(6, first=999), "interactive")))
        await asyncio.gather(query, *bulk)

    run(main())
    assert done.index("query") <= 2  # behind at most the batches already running or chosen


def test_bulk_work_keeps_its_share_when_queries_could_fill_the_device():
    model = FakeModel(seconds_per_token=0.0005)
    batcher = TokenBudgetBatcher(
        model.start_batch, 4, max_batch_tokens=32, max_batch_wait_s=0, interactive_max_share=0.5
    )
    order: list[str] = []

    async def tagged(name, coro):
        await coro
        order.append(name)

    async def main():
        queries = [
            asyncio.create_task(tagged(f"q{k}", batcher.embed(inputs(32, first=10 + k), "interactive")))
            for k in range(12)
        ]
        await asyncio.sleep(0)
        bulk = asyncio.create_task(tagged("bulk", batcher.embed(inputs(32, first=1), "bulk")))
        await asyncio.gather(bulk, *queries)

    run(main())
    assert order.index("bulk") <= 2  # not behind all twelve interactive batches
    assert 0.3 < batcher.lanes.interactive_share() < 1.0


def test_cancelled_callers_inputs_are_not_computed_and_are_counted_as_dropped():
    model = FakeModel(seconds_per_token=0.002)
    dropped: list[int] = []
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=16, max_batch_wait_s=0, on_drop=dropped.append)

    async def main():
        first = asyncio.create_task(batcher.embed(inputs(16, first=1), "bulk"))
        doomed = asyncio.create_task(batcher.embed(inputs(16, 16, 16, first=500), "bulk"))
        await asyncio.sleep(0.005)
        doomed.cancel()
        await asyncio.sleep(0)
        queued_right_after_cancel = batcher.queued_tokens  # while the first call still runs
        await first
        await asyncio.sleep(0.1)
        return queued_right_after_cancel

    assert run(main()) == 0
    assert not any(b[0][0] in (501, 502) for b in model.batches)
    assert sum(dropped) == batcher.stats.dropped_inputs >= 2


def test_retry_after_estimate_follows_recent_throughput_not_the_average_since_start(monkeypatch):
    import serve_app.batching.scheduler as scheduler

    clock = [1000.0]
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: clock[0])
    batcher = TokenBudgetBatcher(FakeModel().start_batch, 4, max_batch_tokens=16384, share_window_s=30)
    for _ in range(1000):  # after a restart: tiny, slow batches ...
        batcher._record(BatchStats(rows=1, tokens=1, padded_tokens=1, seconds=0.05))
    clock[0] += 120  # ... then, two minutes later, full ones at ~33k tokens/s
    for _ in range(10):
        batcher._record(BatchStats(rows=64, tokens=16384, padded_tokens=16384, seconds=0.5))
    batcher.queued_tokens = 2_000_000
    since_start = batcher.queued_tokens / (batcher.stats.padded_tokens / batcher.stats.busy_s)
    assert since_start > 600
    assert 60 < batcher.estimated_wait_s() < 120  # the HTTP layer then clamps Retry-After to 60


def test_a_failing_batch_fails_its_callers_only():
    model = FakeModel(fail_on=666)
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=8, max_batch_wait_s=0)

    async def main():
        bad = batcher.embed([[666] * 8], "bulk")
        good = batcher.embed([[1] * 8], "bulk")
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = run(main())
    assert isinstance(bad, RuntimeError)
    assert good.vectors[0, 0] == 8


def test_full_queue_refuses_with_overloaded():
    model = FakeModel(seconds_per_token=0.01)
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=10, max_batch_wait_s=0, max_queued_tokens=100)

    async def main():
        first = asyncio.create_task(batcher.embed([[1] * 10] * 9, "bulk"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as info:
            await batcher.embed([[1] * 10] * 5, "bulk")
        assert info.value.retry_after_s >= 1
        await first

    run(main())


def test_batched_results_equal_direct_encoding(tiny_encoder):
    texts = ["short", "a somewhat longer sentence about embeddings " * 3, "中文文本", "x " * 50]
    ids = [t.ids for t in tiny_encoder.tokenizer.encode_texts(texts)]
    batcher = TokenBudgetBatcher(tiny_encoder.start_batch, tiny_encoder.dimensions, max_batch_tokens=128)

    async def main():
        return await asyncio.gather(*(batcher.embed([i], "bulk") for i in ids), batcher.embed(ids, "interactive"))

    *singles, together = run(main())
    want = tiny_encoder.embed_token_ids(ids)
    np.testing.assert_allclose(np.concatenate([s.vectors for s in singles]), want, atol=1e-5)
    np.testing.assert_allclose(together.vectors, want, atol=1e-5)


def test_long_bulk_batch_pauses_between_layers_for_a_query_and_then_resumes():
    model = FakeModel(seconds_per_token=0.002, layers=8)  # the bulk batch: 256 tokens ≈ 0.5 s
    batcher = TokenBudgetBatcher(model.start_batch, 4, max_batch_tokens=256, max_batch_wait_s=0)
    finished: dict[str, float] = {}

    async def main():
        started = time.monotonic()
        bulk = asyncio.create_task(timed(finished, "bulk", batcher.embed(inputs(128, 128, first=1), "bulk")))
        await asyncio.sleep(0.1)  # the bulk batch is a few layers in
        query = await timed(finished, "query", batcher.embed(inputs(5, first=900), "interactive"))
        bulk_result = await bulk
        return started, query, bulk_result

    started, query, bulk_result = run(main())
    assert finished["query"] < finished["bulk"]
    assert finished["query"] - started < 0.3  # did not wait for the whole bulk batch
    assert batcher.stats.preemptions == 1
    np.testing.assert_array_equal(bulk_result.vectors[:, :2], [[128, 1], [128, 2]])  # resumed, not redone
    assert [len(b) for b in model.batches] == [2, 1]


@pytest.mark.parametrize(
    "full_batch", ["short", "longer than the bulk batch"], ids=["lets-them-in", "runs-a-full-batch-first"]
)
def test_bulk_work_that_went_ahead_of_waiting_queries_runs_a_full_batchs_time_then_lets_them_in(full_batch):
    """Ageing puts a paused bulk batch ahead of queries that are already waiting: it runs for about
    a full batch's time (at the recent throughput), then stops at its next step, though nothing new
    arrives (closed-loop clients, all waiting, send nothing): one long text never holds them long."""
    reported = 0.0 if full_batch == "short" else 1.0  # 1 s a token: a full batch (256 tokens) takes minutes
    model = FakeModel(seconds_per_token=0.002, layers=8, reported_seconds_per_token=reported)
    batcher = TokenBudgetBatcher(
        model.start_batch, 4, max_batch_tokens=256, interactive_batch_tokens=8, max_batch_wait_s=0
    )
    finished: dict[str, float] = {}

    async def main():
        bulk = asyncio.create_task(timed(finished, "bulk", batcher.embed(inputs(128, 128, first=1), "bulk")))
        await asyncio.sleep(0.1)  # the bulk batch is a few layers in
        # three queries at once, one per batch (budget 8): after two, the paused bulk batch has aged
        await asyncio.gather(
            *(timed(finished, f"q{k}", batcher.embed(inputs(5, first=900 + k), "interactive")) for k in range(3))
        )
        await bulk

    run(main())
    if full_batch == "short":
        assert finished["q2"] < finished["bulk"]  # it went on for a step, then let the third query in
        assert batcher.stats.preemptions == 2
    else:
        assert finished["bulk"] < finished["q2"]  # what was left of it is less than a full batch
        assert batcher.stats.preemptions == 1


def test_stepped_forward_pass_equals_one_piece(tiny_encoder):
    ids = [t.ids for t in tiny_encoder.tokenizer.encode_texts(["first text", "a second, longer text here"])]
    runner = tiny_encoder.start_batch(ids)
    steps = 0
    while not runner.run(should_yield=lambda: True):  # stop after every layer
        steps += 1
    assert steps == tiny_encoder.model.num_layers - 1
    np.testing.assert_allclose(runner.result()[0], tiny_encoder.forward_batch(ids)[0], atol=1e-6)


def test_a_long_text_stops_within_layers_too_and_gives_the_same_vector(tiny_encoder, monkeypatch):
    """On CPU one 32k-token text takes seconds per layer: its products run in pieces of
    ``step_tokens`` rows and its attention in blocks of query rows, with a stop between pieces."""
    from serve_app.core import attention

    ids = [[100 + i % 700 for i in range(300)], [7] * 20]
    monkeypatch.setattr(tiny_encoder, "step_tokens", None)
    whole = tiny_encoder.forward_batch(ids)[0]

    monkeypatch.setattr(tiny_encoder, "step_tokens", 32)
    monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", 16)  # blocks of the 300-token text's query rows
    runner = tiny_encoder.start_batch(ids)
    stops = 0
    while not runner.run(should_yield=lambda: True):
        stops += 1
    layers = tiny_encoder.model.num_layers
    # per layer: 320 rows in 10 pieces twice (9 stops each) and attention over >= 2 blocks; between layers 1
    assert stops >= layers * (2 * 9 + 1) + layers - 1
    np.testing.assert_allclose(runner.result()[0], whole, atol=1e-6)
    np.testing.assert_allclose(tiny_encoder.forward_batch(ids)[0], whole, atol=1e-6)  # without stops, too


def test_a_failing_batch_observer_does_not_stop_the_loop():
    def broken_observer(stats):
        raise ValueError("metrics backend refused the value")

    batcher = TokenBudgetBatcher(
        FakeModel().start_batch, 4, max_batch_tokens=8, max_batch_wait_s=0, on_batch=broken_observer
    )

    async def main():
        first = await batcher.embed([[1] * 8], "bulk")
        second = await asyncio.wait_for(batcher.embed([[2] * 8], "bulk"), timeout=5)
        return first, second

    first, second = run(main())
    assert first.vectors[0, 1] == 1 and second.vectors[0, 1] == 2
