"""Group inputs into batches under a token budget (no torch: the ingress plans chunks with it).

Two layouts (``batching.layout`` builds the tensors). **Padded**: rows of the longest
input's length; cost = padded length × rows, what the model really computes, and
sorting by length keeps padding small. **Packed**: every input end to end in one row,
no padding; cost = the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass computed; feeds metrics and benchmarks."""

    rows: int
    tokens: int  # real tokens
    padded_tokens: int  # tokens computed, padding included (= tokens when packed)
    seconds: float


def batch_cost(rows: int, longest: int, tokens: int, packed: bool) -> int:
    """Tokens the model computes for ``rows`` inputs, ``tokens`` in all, the longest ``longest``."""
    return tokens if packed else longest * rows


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, packed: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches whose cost fits ``max_batch_tokens``.

    Longest first, so each padded batch's length is its first item's length (and packed
    rows hold texts of similar length). An input longer than the budget gets a batch of
    its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and batch_cost(len(current) + 1, longest, total + lengths[i], packed) > max_batch_tokens:
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches
