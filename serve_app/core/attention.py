"""Bidirectional attention over a batch's layout: the one place the attention kernel is chosen.

Two layouts (``batching.layout`` builds them):

* :class:`PackedLayout` (CPU): every text end to end in one row, no padding. Each text
  attends to its own tokens only, through one fused SDPA call per text: Σ (text length)²
  work, where one block-diagonal masked call over the row would cost (row length)².
  Measured on a 2-core AVX2 CPU (docs/measurements/2026-11-30-engine-cpu.md), all of
  attention is ~3 % of a forward pass on 256-token texts, so a varlen kernel would gain little there.
  On CUDA, packed rows carry :class:`~serve_app.core.packed_attention.PackedSpans` and run as
  one varlen (or nested-tensor) kernel call over the whole row.
* :class:`PaddedLayout`: right-padded rows, SDPA with a key-padding mask (CUDA where no
  packed kernel is usable).

Queries have ``heads`` heads and keys/values ``kv_heads`` (grouped-query attention);
SDPA's ``enable_gqa`` shares each key/value head without copying it where the kernel
supports that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packed_attention import PackedSpans, packed_attention
from .steps import Steps, run_to_end


@dataclass(frozen=True)
class PackedLayout:
    """One row of texts end to end; ``spans[k]`` = text k's token positions ``[a, b)``."""

    spans: Sequence[tuple[int, int]]


@dataclass(frozen=True)
class PaddedLayout:
    """``rows`` right-padded rows of ``length`` tokens; ``key_mask`` [rows, length] (True = a real
    token), or None when nothing is padded."""

    rows: int
    length: int
    key_mask: torch.Tensor | None


Layout = PackedLayout | PaddedLayout


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Attention of every token over the tokens of its own text.

    ``q`` [tokens, heads, head_dim], ``k`` and ``v`` [tokens, kv_heads, head_dim], tokens
    in ``layout``'s order; returns [tokens, heads * head_dim].
    """
    return run_to_end(attention_in_steps(q, k, v, layout, pairs_per_step=None))


#: Fewest query rows per attention call when a long text is split: torch's CPU flash kernel
#: works on blocks of 256 query rows from 768 rows on and on smaller, slower blocks below.
MIN_BLOCK_ROWS = 1024


def attention_in_steps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, pairs_per_step: int | None
) -> Steps[torch.Tensor]:
    """:func:`bidirectional_attention` as a generator that yields between pieces of work.

    On CPU packed rows, a text is split into blocks of query rows (each row's attention over
    all of its text's keys: the same result) so that a piece scores about ``pairs_per_step``
    query-key pairs, and the generator yields between such amounts of work: a 32k-token text
    can then let a waiting query in within a layer. ``None``: whole texts, no yield. Other
    layouts run in one call.
    """
    tokens, heads, head_dim = q.shape
    if isinstance(layout, PackedLayout) and isinstance(layout.spans, PackedSpans):  # CUDA: one kernel call
        return packed_attention(q, k, v, layout.spans).view(tokens, heads * head_dim)
    if isinstance(layout, PackedLayout):
        out = q.new_empty((tokens, heads, head_dim))
        pairs_since_yield = 0
        for a, b in layout.spans:
            keys, values = _heads_first(k[a:b]), _heads_first(v[a:b])
            rows = b - a if pairs_per_step is None else max(MIN_BLOCK_ROWS, pairs_per_step // (b - a))
            for start in range(a, b, rows):
                if pairs_per_step is not None and pairs_since_yield >= pairs_per_step:
                    pairs_since_yield = 0
                    yield
                stop = min(b, start + rows)
                per_text = F.scaled_dot_product_attention(_heads_first(q[start:stop]), keys, values, enable_gqa=True)
                out[start:stop] = per_text[0].transpose(0, 1)
                pairs_since_yield += (stop - start) * (b - a)
        return out.view(tokens, heads * head_dim)
    rows, length = layout.rows, layout.length

    def by_row(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, length, t.shape[1], head_dim).transpose(1, 2)

    q, k, v = by_row(q), by_row(k), by_row(v)
    if layout.key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        # The fused masked kernels do not all share key/value heads: repeat them (what the model did before).
        repeat = heads // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask[:, None, None, :])
    return out.transpose(1, 2).reshape(tokens, heads * head_dim)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[len, heads, head_dim] → [1, heads, len, head_dim] (a view)."""
    return t.transpose(0, 1).unsqueeze(0)
