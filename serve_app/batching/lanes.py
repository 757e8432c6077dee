"""Which pending work an encoder replica runs next: two lanes, their shares, ageing, the batch.

The policy of ``TokenBudgetBatcher`` (``batching.scheduler``) apart from its loop, as TEI keeps
its queue apart from its batching task: no asyncio, no threads, and every time comes in as an
argument, so a fake clock drives it. The rules:

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
  pending bulk inputs (in their order, those that fit): one pass over the weights costs
  as much as many tokens of work, so a query alone would waste most of its pass
  (docs/measurements/2026-11-27-priority-scheduling.md). Its budget,
  ``interactive_batch_tokens``, may be set below ``max_batch_tokens`` where a full batch
  takes longer than queries may wait.
* **Fill wait.** A batch below its budget waits at most ``max_batch_wait_s`` (from its
  head's arrival) for more work.
* **Preemption between steps.** A running bulk batch is stopped when interactive work
  arrives that may go first, at its next step (a layer, or on CPU a piece of a long
  layer); it resumes from where it stopped once no interactive work is waiting (or the
  share says bulk's turn).
* **Ageing.** The oldest pending bulk input, or the oldest paused batch, goes next once
  ``MAX_PASSED_OVER`` batches have started ahead of it (queries still ride in a new
  batch): under a steady stream of queries, a bulk input too long for a query's batch would
  otherwise wait for a gap that never comes. Bulk work that goes on ahead of waiting
  queries may be stopped again (the loop lets it run about a full batch's time first): one
  32k-token text never holds queries back for long, and always moves on.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .planning import batch_cost

#: How many pending inputs (in lane order) are looked at when forming one batch.
SCAN_LIMIT = 4096

#: Ageing: a bulk input, or a paused bulk batch, passed over this many times for
#: interactive work goes next (queries still ride along), so nothing waits long behind
#: queries, however steady; long bulk inputs never fit a query's smaller batch otherwise.
MAX_PASSED_OVER = 2

#: A batch whose cost is this close to its budget starts without waiting to fill up.
FULL_ENOUGH = 0.9

#: Whoever sent an input: the loop's record of the call. The policy only tells callers apart.
Caller = TypeVar("Caller")


class DecayingTotal:
    """A running total in which an amount counts half after ``half_life_s``, a quarter after two:
    recent work weighs most, and a restart's first few batches are soon forgotten."""

    def __init__(self, half_life_s: float, now: float):
        self.half_life_s = half_life_s
        self.value = 0.0  # as of the last add
        self._updated_at = now

    def add(self, amount: float, now: float) -> None:
        decay = 0.5 ** ((now - self._updated_at) / self.half_life_s)
        self._updated_at = now
        self.value = self.value * decay + amount


@dataclass(eq=False)
class PendingInput(Generic[Caller]):
    """One input waiting in a lane."""

    ids: list[int]
    caller: Caller
    index: int  # its position among the caller's inputs
    interactive: bool
    arrived: float
    taken: bool = False  # in a batch, or dropped: left in the lane until it reaches the front
    passed_over: int = 0  # batches started while it was the oldest pending bulk input


@dataclass(eq=False)
class Batch(Generic[Caller]):
    """A formed batch: its inputs and its lane."""

    inputs: list[PendingInput[Caller]]
    interactive: bool  # holds interactive work: never preempted
    interactive_fraction: float  # share of its tokens that are interactive: its compute is split so
    passed_over: int = 0  # while paused: batches started ahead of it


@dataclass(frozen=True)
class Start(Generic[Caller]):
    """Run this new batch; its inputs have left the lanes."""

    batch: Batch[Caller]


@dataclass(frozen=True)
class Resume(Generic[Caller]):
    """Go on with this paused batch."""

    batch: Batch[Caller]


@dataclass(frozen=True)
class Wait:
    """Nothing is due yet: wait this long for more work (``None``: until work arrives)."""

    seconds: float | None


Step = Start[Caller] | Resume[Caller] | Wait


class Lanes(Generic[Caller]):
    """The pending inputs and paused batches of one replica, and what runs next."""

    def __init__(
        self,
        max_batch_tokens: int,
        interactive_batch_tokens: int,
        max_batch_wait_s: float,
        max_padding_fraction: float,
        packed: bool,
        interactive_max_share: float,
        share_window_s: float,
        now: float,
    ):
        self.max_batch_tokens = max_batch_tokens
        self.interactive_batch_tokens = interactive_batch_tokens
        self.max_batch_wait_s = max_batch_wait_s
        self.max_padding_fraction = max_padding_fraction
        self.packed = packed  # how batches are laid out; decides what a batch costs
        self.interactive_max_share = interactive_max_share
        self._compute_s = {True: DecayingTotal(share_window_s, now), False: DecayingTotal(share_window_s, now)}
        self._interactive: deque[PendingInput[Caller]] = deque()
        self._bulk: deque[PendingInput[Caller]] = deque()
        self._paused: list[Batch[Caller]] = []

    # --- what comes in --------------------------------------------------------------

    def add(self, caller: Caller, token_ids: Sequence[Sequence[int]], interactive: bool, now: float) -> None:
        """Queue a caller's inputs at the back of their lane."""
        lane = self._interactive if interactive else self._bulk
        for i, ids in enumerate(token_ids):
            lane.append(PendingInput(list(ids), caller, i, interactive, now))

    def drop(self, caller: Caller) -> list[PendingInput[Caller]]:
        """Take a caller's pending inputs out of the lanes; returns them."""
        dropped = []
        for lane in (self._interactive, self._bulk):
            for item in lane:
                if item.caller is caller and not item.taken:
                    item.taken = True
                    dropped.append(item)
        # let go of their token ids now, not when they would have reached the head of the queue
        self._interactive = deque(_live(self._interactive))
        self._bulk = deque(_live(self._bulk))
        return dropped

    def interactive_waiting(self) -> bool:
        """Whether interactive work waits in its lane."""
        return any(_live(self._interactive))

    def preempts(self, running: Batch[Caller] | None) -> bool:
        """Whether interactive work should stop ``running`` at its next step: bulk work, while the
        interactive lane is under its share (``running`` is bulk work, whatever the lanes hold)."""
        return running is not None and not running.interactive and self.interactive_share() < self.interactive_max_share

    # --- what runs next -------------------------------------------------------------

    def next_step(self, now: float) -> Step[Caller]:
        """A paused batch when its lane is due, else a new batch once it is full enough or has
        waited long enough, else how long to wait."""
        self._trim()
        head = next(self._in_turn_order(), None)
        # paused batches are bulk, stopped for interactive work: they go on once none waits, or when aged
        if self._paused and (head is None or not head.interactive or self._paused[0].passed_over >= MAX_PASSED_OVER):
            paused = self._paused.pop(0)
            paused.passed_over = 0  # ages again from here: a query may stop it after its next step
            return Resume(paused)
        if head is None:
            return Wait(None)
        inputs, cost, budget = self._select()
        wait = inputs[0].arrived + self.max_batch_wait_s - now
        if cost >= budget * FULL_ENOUGH or wait <= 0:
            return Start(self._start(inputs))
        return Wait(wait)

    def pause(self, batch: Batch[Caller]) -> None:
        """``batch`` stopped for interactive work; it waits for its turn to go on."""
        self._paused.append(batch)

    def account(self, batch: Batch[Caller], compute_s: float, now: float) -> None:
        """Add a stretch of ``batch``'s compute to its lanes' decaying totals, split by its tokens."""
        self._compute_s[True].add(compute_s * batch.interactive_fraction, now)
        self._compute_s[False].add(compute_s * (1 - batch.interactive_fraction), now)

    def interactive_share(self) -> float:
        """The interactive lane's share of the recent compute."""
        interactive, bulk = self._compute_s[True].value, self._compute_s[False].value
        total = interactive + bulk
        return interactive / total if total else 0.0

    def interactive_turn(self) -> bool:
        """Interactive work may go first: it has used less than its share, or there is no bulk work."""
        return self.interactive_share() < self.interactive_max_share or not any(_live(self._bulk))

    # --- how a batch is formed ------------------------------------------------------

    def _in_turn_order(self) -> Iterator[PendingInput[Caller]]:
        """Live pending inputs, the lane whose turn it is first, each lane first come first served."""
        first, second = (self._interactive, self._bulk) if self.interactive_turn() else (self._bulk, self._interactive)
        return itertools.chain(_live(first), _live(second))

    def _select(self) -> tuple[list[PendingInput[Caller]], int, int]:
        """The head input and the inputs that fit with it, in turn order: (inputs, cost, budget).

        The head is the first input in turn order, or an aged bulk input (with the full budget).
        """
        candidates: Iterator[PendingInput[Caller]] = itertools.islice(self._in_turn_order(), SCAN_LIMIT)
        first = next(candidates)
        head = first
        oldest_bulk = next(_live(self._bulk), None)
        if first.interactive and oldest_bulk is not None and oldest_bulk.passed_over >= MAX_PASSED_OVER:
            head, candidates = oldest_bulk, itertools.chain([first], candidates)
        budget = self.interactive_batch_tokens if head.interactive else self.max_batch_tokens
        inputs, longest, real = [head], len(head.ids), len(head.ids)
        for item in candidates:
            if item is head:
                continue
            if batch_cost(len(inputs) + 1, longest, real + 1, self.packed) > budget:
                break  # no input, however short, fits any more
            new_longest = max(longest, len(item.ids))
            cost = batch_cost(len(inputs) + 1, new_longest, real + len(item.ids), self.packed)
            if cost > budget:
                continue
            if 1 - (real + len(item.ids)) / cost > self.max_padding_fraction:
                continue
            inputs.append(item)
            longest, real = new_longest, real + len(item.ids)
        return inputs, batch_cost(len(inputs), longest, real, self.packed), budget

    def _start(self, inputs: list[PendingInput[Caller]]) -> Batch[Caller]:
        """Take ``inputs`` out of the lanes as a batch; what it passes over ages."""
        oldest_bulk = next(_live(self._bulk), None)
        for item in inputs:
            item.taken = True
        # Bulk work is done in order: while a batch is paused, it is what ages (and goes on first);
        # pending bulk inputs age once none is, so long texts are not started, and all left half-done.
        if self._paused:
            self._paused[0].passed_over += 1
        elif oldest_bulk is not None and not oldest_bulk.taken:
            oldest_bulk.passed_over += 1
        tokens = sum(len(item.ids) for item in inputs)
        interactive_tokens = sum(len(item.ids) for item in inputs if item.interactive)
        return Batch(inputs, interactive_tokens > 0, interactive_tokens / tokens if tokens else 0.0)

    def _trim(self) -> None:
        for lane in (self._interactive, self._bulk):
            while lane and lane[0].taken:
                lane.popleft()


def _live(lane: Iterable[PendingInput[Caller]]) -> Iterator[PendingInput[Caller]]:
    return (item for item in lane if not item.taken)
