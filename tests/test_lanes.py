"""The lane policy on its own (``batching.lanes``): which work runs next, driven by a fake clock.

Each test queues inputs, asks ``next_step`` what to do, and tells the lanes how long a batch
ran, as the batching loop does; nothing runs a model.
"""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.batching.lanes import Batch, DecayingTotal, Lanes, Resume, Start, Wait

pytestmark = pytest.mark.unit


def make_lanes(**settings) -> Lanes[str]:
    defaults = dict(
        max_batch_tokens=256,
        interactive_batch_tokens=256,
        max_batch_wait_s=0.0,
        max_padding_fraction=0.15,
        packed=True,
        interactive_max_share=0.5,
        share_window_s=30.0,
        now=0.0,
    )
    return Lanes(**{**defaults, **settings})


def queue(lanes: Lanes[str], caller: str, *lengths: int, interactive: bool = False, now: float = 0.0) -> None:
    lanes.add(caller, [[1] * n for n in lengths], interactive, now)


def start(lanes: Lanes[str], now: float = 0.0) -> Batch[str]:
    step = lanes.next_step(now)
    assert isinstance(step, Start), step
    return step.batch


def lengths(batch: Batch[str]) -> list[int]:
    return [len(item.ids) for item in batch.inputs]


def callers(batch: Batch[str]) -> list[str]:
    return [item.caller for item in batch.inputs]


def all_batches(lanes: Lanes[str]) -> list[Batch[str]]:
    batches = []
    while isinstance(step := lanes.next_step(0.0), Start):
        batches.append(step.batch)
    return batches


# --- order: two lanes ---------------------------------------------------------------


def test_an_interactive_input_goes_before_queued_bulk_inputs():
    lanes = make_lanes(interactive_batch_tokens=64)
    for k in range(10):
        queue(lanes, f"bulk{k}", 32, 32)
    queue(lanes, "query", 6, interactive=True)
    assert callers(start(lanes)) == ["query", "bulk0"]


def test_within_a_lane_first_come_first_served():
    lanes = make_lanes(max_batch_tokens=32)
    for caller in ("first", "second", "third"):
        queue(lanes, caller, 32)
    assert [callers(batch) for batch in all_batches(lanes)] == [["first"], ["second"], ["third"]]


def test_bulk_goes_first_once_interactive_work_has_used_its_share():
    lanes = make_lanes(max_batch_tokens=32, interactive_max_share=0.5)
    queue(lanes, "query", 32, interactive=True)
    lanes.account(start(lanes), compute_s=1.0, now=1.0)  # all of the recent compute went to queries
    queue(lanes, "query", 32, interactive=True, now=1.0)
    queue(lanes, "bulk", 32, now=1.0)
    assert lanes.interactive_share() == 1.0
    assert callers(start(lanes, now=1.0)) == ["bulk"]
    assert callers(start(lanes, now=1.0)) == ["query"]


def test_interactive_work_over_its_share_still_goes_when_no_bulk_work_waits():
    lanes = make_lanes(max_batch_tokens=32)
    queue(lanes, "query", 32, interactive=True)
    lanes.account(start(lanes), compute_s=1.0, now=1.0)
    queue(lanes, "query", 32, interactive=True, now=1.0)
    assert lanes.interactive_turn()
    assert callers(start(lanes, now=1.0)) == ["query"]


def test_a_batchs_compute_is_split_between_the_lanes_by_its_tokens():
    lanes = make_lanes()
    queue(lanes, "bulk", 50)
    queue(lanes, "query", 10, interactive=True)
    batch = start(lanes)
    assert lengths(batch) == [10, 50]
    lanes.account(batch, compute_s=0.6, now=0.6)
    assert lanes.interactive_share() == pytest.approx(10 / 60)


def test_the_share_weighs_recent_compute_most():
    """Compute counts half after ``share_window_s``, a quarter after two."""
    lanes = make_lanes(max_batch_tokens=32, share_window_s=30.0)
    queue(lanes, "query", 32, interactive=True)
    lanes.account(start(lanes), compute_s=10.0, now=0.0)
    queue(lanes, "bulk", 32, now=30.0)
    lanes.account(start(lanes, now=30.0), compute_s=10.0, now=30.0)
    assert lanes.interactive_share() == pytest.approx(5 / 15)


def test_a_decaying_total_halves_every_half_life():
    total = DecayingTotal(half_life_s=30.0, now=100.0)
    total.add(8.0, now=100.0)
    total.add(0.0, now=160.0)
    assert total.value == 2.0
    total.add(1.0, now=160.0)
    assert total.value == 3.0


# --- the batch ----------------------------------------------------------------------


def test_a_query_batch_is_topped_up_with_bulk_inputs_that_fit():
    """A query does not run as a tiny forward pass of its own, nor wait for a long one."""
    lanes = make_lanes(max_batch_tokens=256, interactive_batch_tokens=64)
    lanes.add("bulk", [[1] * 100, [2] * 30, [3] * 60, [4] * 20, [5] * 90], False, 0.0)
    queue(lanes, "query", 10, interactive=True)
    query_batch = start(lanes)
    assert lengths(query_batch) == [10, 30, 20]  # the query, then bulk inputs in their order that fit 64 tokens
    assert query_batch.interactive and query_batch.interactive_fraction == pytest.approx(10 / 60)
    assert [lengths(batch) for batch in all_batches(lanes)] == [[100, 60, 90]]  # bulk: the full budget


def test_an_input_longer_than_the_budget_runs_alone():
    lanes = make_lanes(max_batch_tokens=32)
    queue(lanes, "bulk", 8, 8, 8, 8, 8, 8, 100, 8)
    # the last short input does not wait behind the long one: it joins the batch before
    assert [lengths(batch) for batch in all_batches(lanes)] == [[8, 8, 8, 8], [8, 8, 8], [100]]


def test_a_padded_batch_takes_no_input_that_would_make_it_too_much_padding():
    lanes = make_lanes(max_batch_tokens=2048, packed=False, max_padding_fraction=0.1)
    lane_lengths = np.random.default_rng(0).integers(100, 400, size=200).tolist()
    queue(lanes, "bulk", *lane_lengths)
    batches = [lengths(batch) for batch in all_batches(lanes)]
    assert sorted(n for batch in batches for n in batch) == sorted(lane_lengths)
    for batch in batches:
        assert max(batch) * len(batch) <= 2048 or len(batch) == 1
        assert 1 - sum(batch) / (max(batch) * len(batch)) <= 0.1


def test_a_batch_below_its_budget_waits_for_more_work_at_most_max_batch_wait_s():
    lanes = make_lanes(max_batch_tokens=64, max_batch_wait_s=0.005)
    assert lanes.next_step(0.0) == Wait(None)  # nothing queued: wait for work
    queue(lanes, "small", 8, now=1.0)
    assert lanes.next_step(1.001) == Wait(pytest.approx(0.004))
    assert lengths(start(lanes, now=1.005)) == [8]  # its head's wait is over


def test_a_batch_near_its_budget_starts_at_once():
    lanes = make_lanes(max_batch_tokens=64, max_batch_wait_s=10.0)
    queue(lanes, "big", 58)  # 58 of 64: nine tenths full
    assert lengths(start(lanes)) == [58]


def test_a_dropped_callers_inputs_leave_the_lanes():
    lanes = make_lanes(max_batch_tokens=16)
    queue(lanes, "kept", 16)
    queue(lanes, "cancelled", 16, 16, 16)
    dropped = lanes.drop("cancelled")
    assert [item.caller for item in dropped] == ["cancelled"] * 3
    assert [callers(batch) for batch in all_batches(lanes)] == [["kept"]]


# --- preemption and ageing ----------------------------------------------------------


def test_a_query_stops_a_running_bulk_batch_which_goes_on_once_no_query_waits():
    lanes = make_lanes()
    queue(lanes, "bulk", 128, 128)
    bulk = start(lanes)
    queue(lanes, "query", 5, interactive=True)
    assert lanes.preempts(bulk)
    lanes.pause(bulk)
    assert callers(start(lanes)) == ["query"]
    assert lanes.next_step(0.0) == Resume(bulk)


def test_a_query_does_not_stop_a_batch_that_holds_interactive_work():
    lanes = make_lanes()
    queue(lanes, "query", 5, interactive=True)
    queue(lanes, "bulk", 100)
    running = start(lanes)
    assert running.interactive
    queue(lanes, "query2", 5, interactive=True)
    assert not lanes.preempts(running)
    assert not lanes.preempts(None)


def test_a_query_does_not_stop_bulk_work_when_it_is_bulks_turn():
    lanes = make_lanes(max_batch_tokens=32)
    queue(lanes, "query", 32, interactive=True)
    lanes.account(start(lanes), compute_s=1.0, now=1.0)
    queue(lanes, "bulk", 32, 32, now=1.0)
    bulk = start(lanes, now=1.0)
    queue(lanes, "query", 32, interactive=True, now=1.0)
    assert not lanes.preempts(bulk)


def test_long_bulk_texts_are_done_one_after_another_not_all_started_and_left_half_done():
    """While a batch is paused, pending bulk inputs do not age past it: each long text's request
    finishes in turn, instead of every one finishing at the end of the whole burst."""
    lanes = make_lanes(max_batch_tokens=64, interactive_batch_tokens=64)
    queue(lanes, "first", 1000)
    queue(lanes, "second", 1000)
    first = start(lanes)
    lanes.pause(first)  # stopped for a query
    resumed = 0
    for k in range(6):  # a stream of queries
        queue(lanes, f"query{k}", 40, interactive=True)
        step = lanes.next_step(0.0)
        if isinstance(step, Resume):  # aged: it goes on for a step, then the query stops it again
            assert step.batch is first
            resumed += 1
            lanes.pause(first)
            step = lanes.next_step(0.0)
        assert isinstance(step, Start) and callers(step.batch) == [f"query{k}"]  # never the second text
    assert resumed == 2  # once every two queries


def test_the_share_holds_when_the_running_batch_is_all_the_bulk_work_there_is():
    lanes = make_lanes(max_batch_tokens=32)
    queue(lanes, "query", 32, interactive=True)
    lanes.account(start(lanes), compute_s=1.0, now=1.0)
    queue(lanes, "bulk", 32, now=1.0)
    bulk = start(lanes, now=1.0)  # nothing bulk is left pending
    queue(lanes, "query", 32, interactive=True, now=1.0)
    assert not lanes.preempts(bulk)


def test_a_bulk_input_too_long_for_query_batches_leads_a_batch_once_passed_over_twice():
    """Ageing: under a stream of queries, the oldest bulk input leads the next batch (a query rides in it)."""
    lanes = make_lanes(max_batch_tokens=256, interactive_batch_tokens=64, interactive_max_share=0.9)
    queue(lanes, "long", 200)  # never fits 64 tokens
    queue(lanes, "short", *[20] * 6)  # fits beside a query
    for k in range(6):
        queue(lanes, f"query{k}", 40, interactive=True)
    batches = []
    for now in (1.0, 2.0, 3.0):
        batch = start(lanes, now)
        lanes.account(batch, compute_s=sum(lengths(batch)) / 1000, now=now)
        batches.append(lengths(batch))
    # the share cap alone would not let it in: queries use 2/3 of the compute, under 0.9
    assert lanes.interactive_share() < 0.9
    assert batches == [[40, 20], [40, 20], [200, 40]]


def test_a_paused_batch_passed_over_twice_goes_on_before_waiting_queries_then_ages_again():
    """It runs a step ahead of the queries (it always moves on), after which a query may stop it
    again (one long text never holds queries back for more than a step)."""
    lanes = make_lanes()
    queue(lanes, "bulk", 128, 128)
    bulk = start(lanes)
    lanes.pause(bulk)
    for k in range(2):
        queue(lanes, f"query{k}", 5, interactive=True)
        assert callers(start(lanes)) == [f"query{k}"]
    queue(lanes, "query2", 5, interactive=True)
    assert lanes.next_step(0.0) == Resume(bulk)
    assert lanes.preempts(bulk)
    lanes.pause(bulk)
    assert callers(start(lanes)) == ["query2"]
    queue(lanes, "query3", 5, interactive=True)
    assert callers(start(lanes)) == ["query3"]  # passed over once since it went on: not aged yet
