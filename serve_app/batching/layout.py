"""Batches as tensors: padded rows, or one packed row with each input's span."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
