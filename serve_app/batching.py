"""Group inputs into batches under a token budget, and lay them out as tensors.

Two layouts. **Padded**: rows of the longest input's length; cost = padded length ×
rows, what the model really computes, and sorting by length keeps padding small.
**Packed**: every input end to end in one row, no padding; cost = the real tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch


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


def pad_batch(token_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest input: ``(input_ids, attention_mask)``, both [rows, max_len]."""
    max_len = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), max_len), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def pack_batch(token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """All inputs end to end: ``(input_ids [1, total], spans)``, span k = input k's positions."""
    spans, start = [], 0
    for ids in token_ids:
        spans.append((start, start + len(ids)))
        start += len(ids)
    flat = torch.as_tensor([t for ids in token_ids for t in ids], dtype=torch.long).unsqueeze(0)
    return flat, spans


def unpack_hidden(hidden: torch.Tensor, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed row's states [1, total, dim] as a right-padded batch: ``(hidden, attention_mask)``."""
    longest = max(b - a for a, b in spans)
    out = hidden.new_zeros((len(spans), longest, hidden.shape[-1]))
    mask = torch.zeros((len(spans), longest), dtype=torch.long, device=hidden.device)
    for row, (a, b) in enumerate(spans):
        out[row, : b - a] = hidden[0, a:b]
        mask[row, : b - a] = 1
    return out, mask
