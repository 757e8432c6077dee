"""TokenBudgetBatcher: batching across callers, token budget, interactive-first with ageing."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_app.batching import plan_batches
from serve_app.encoder import BatchStats
from serve_app.errors import OverloadedError
from serve_app.scheduler import TokenBudgetBatcher


class FakeModel:
    """Embeds an input as [len, first id, 0...]; records every batch it runs."""

    def __init__(self, seconds_per_token: float = 0.0, fail_on: int | None = None):
        self.batches: list[list[list[int]]] = []
        self.seconds_per_token = seconds_per_token
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, token_ids):
        with self.lock:
            self.batches.append(token_ids)
        if self.fail_on is not None and any(self.fail_on in ids for ids in token_ids):
            raise RuntimeError("boom")
        padded = max(map(len, token_ids)) * len(token_ids)
        time.sleep(self.seconds_per_token * padded)
        out = np.zeros((len(token_ids), 4), np.float32)
        for i, ids in enumerate(token_ids):
            out[i, :2] = len(ids), ids[0]
        return out, BatchStats(len(token_ids), sum(map(len, token_ids)), padded, 0.0)


def inputs(*lengths, first=1):
    return [[first + i] * n for i, n in enumerate(lengths)]


def run(coro):
    return asyncio.run(coro)


def test_plan_batches_fits_budget_and_keeps_long_inputs_alone():
    lengths = [5, 300, 40, 41, 1000, 39, 7]
    batches = plan_batches(lengths, max_batch_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 128
    assert [4] in batches and [1] in batches


def test_concurrent_callers_share_batches_and_get_their_own_rows():
    model = FakeModel()
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=64, max_batch_wait_s=0.05)

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
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=32, max_batch_wait_s=0)
    result = run(batcher.embed(inputs(8, 8, 8, 8, 8, 8, 100, 8), "bulk"))
    assert result.vectors[:, 0].tolist() == [8, 8, 8, 8, 8, 8, 100, 8]
    assert [len(b) for b in model.batches if len(b[0]) == 100] == [1]
    assert result.batches >= 3


def test_padding_stays_under_the_limit_when_lengths_vary():
    model = FakeModel()
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=2048, max_batch_wait_s=0.01, max_padding_fraction=0.1)
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 400, size=200).tolist()
    run(batcher.embed([[1] * n for n in lengths], "bulk"))
    computed = sum(max(map(len, b)) * len(b) for b in model.batches)
    assert 1 - sum(lengths) / computed <= 0.1
    assert sum(len(b) for b in model.batches) == 200


def test_interactive_query_overtakes_queued_bulk_work():
    model = FakeModel(seconds_per_token=0.0005)  # 64-token batch ≈ 32 ms
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=64, max_batch_wait_s=0, bulk_slack_s=60)
    done: list[str] = []

    async def tagged(name, coro):
        await coro
        done.append(name)

    async def main():
        bulk = [asyncio.create_task(tagged(f"bulk{k}", batcher.embed(inputs(32, 32, first=k * 10), "bulk")))
                for k in range(10)]
        await asyncio.sleep(0.01)  # bulk is queued and running
        query = asyncio.create_task(tagged("query", batcher.embed(inputs(6, first=999), "interactive")))
        await asyncio.gather(query, *bulk)

    run(main())
    assert done.index("query") <= 2  # behind at most the batches already running or chosen


def test_bulk_work_older_than_the_slack_goes_before_new_interactive_work():
    model = FakeModel(seconds_per_token=0.001)
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=32, max_batch_wait_s=0, bulk_slack_s=0.05)
    order: list[str] = []

    async def tagged(name, coro):
        await coro
        order.append(name)

    async def main():
        old_bulk = asyncio.create_task(tagged("old-bulk", batcher.embed(inputs(32, first=1), "bulk")))
        blocker = asyncio.create_task(tagged("blocker", batcher.embed(inputs(32, first=2), "interactive")))
        await asyncio.sleep(0.1)  # old bulk is now past its slack
        queries = [asyncio.create_task(tagged(f"q{k}", batcher.embed(inputs(32, first=10 + k), "interactive")))
                   for k in range(5)]
        await asyncio.gather(old_bulk, blocker, *queries)

    run(main())
    assert order.index("old-bulk") < order.index("q0")


def test_cancelled_callers_inputs_are_not_computed():
    model = FakeModel(seconds_per_token=0.002)
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=16, max_batch_wait_s=0)

    async def main():
        first = asyncio.create_task(batcher.embed(inputs(16, first=1), "bulk"))
        doomed = asyncio.create_task(batcher.embed(inputs(16, 16, 16, first=500), "bulk"))
        await asyncio.sleep(0.005)
        doomed.cancel()
        await first
        await asyncio.sleep(0.1)
        return batcher.queued_tokens

    assert run(main()) == 0
    assert not any(b[0][0] in (501, 502) for b in model.batches)


def test_a_failing_batch_fails_its_callers_only():
    model = FakeModel(fail_on=666)
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=8, max_batch_wait_s=0)

    async def main():
        bad = batcher.embed([[666] * 8], "bulk")
        good = batcher.embed([[1] * 8], "bulk")
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = run(main())
    assert isinstance(bad, RuntimeError)
    assert good.vectors[0, 0] == 8


def test_full_queue_refuses_with_overloaded():
    model = FakeModel(seconds_per_token=0.01)
    batcher = TokenBudgetBatcher(model, 4, max_batch_tokens=10, max_batch_wait_s=0, max_queued_tokens=100)

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
    batcher = TokenBudgetBatcher(tiny_encoder.forward_batch, tiny_encoder.dimensions, max_batch_tokens=128)

    async def main():
        return await asyncio.gather(*(batcher.embed([i], "bulk") for i in ids), batcher.embed(ids, "interactive"))

    *singles, together = run(main())
    want = tiny_encoder.embed_token_ids(ids)
    np.testing.assert_allclose(np.concatenate([s.vectors for s in singles]), want, atol=1e-5)
    np.testing.assert_allclose(together.vectors, want, atol=1e-5)
