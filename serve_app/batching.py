"""Group inputs into batches under a token budget, and pad them into tensors.

Cost of a batch = padded length × rows: what the model really computes. Sorting by
length before packing keeps padding small.
"""

from __future__ import annotations

from typing import Sequence

import torch


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_rows: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches whose padded cost fits ``max_batch_tokens``.

    Longest first, so each batch's padded length is its first item's length. An input
    longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        padded_len = lengths[current[0]] if current else lengths[i]
        full = max_batch_rows is not None and len(current) >= max_batch_rows
        if current and (full or padded_len * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
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


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens the model computes for one batch of these lengths."""
    return max(lengths) * len(lengths) if lengths else 0
