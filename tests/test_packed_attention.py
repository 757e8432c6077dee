"""Packed attention (core.packed_attention): one call over texts laid end to end equals attention text by text.

The CUDA-only kernel (``varlen``, FlashAttention) cannot run here; ``scripts/gpu_check.py`` compares it on a GPU.
The ``nested`` kernel runs the same code on CPU as on CUDA, so it is checked here, alone and inside the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from serve_app import Encoder
from serve_app.core.packed_attention import NESTED, PackedSpans, packed_attention, packed_kernel

LENGTHS = [1, 7, 33, 2, 64, 5]


def spans_of(lengths):
    starts = np.cumsum([0, *lengths])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def per_text_attention(q, k, v, spans):
    """SDPA one text at a time; [tokens, heads, head_dim] in and out."""
    outs = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), enable_gqa=True
        ).transpose(0, 1)
        for a, b in spans
    ]
    return torch.cat(outs)


def test_nested_kernel_equals_attention_text_by_text_with_grouped_kv_heads():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, tokens = 14, 2, 64, sum(LENGTHS)
    q = torch.randn(tokens, heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    spans = spans_of(LENGTHS)

    got = packed_attention(q, k, v, PackedSpans(spans, torch.device("cpu"), NESTED))

    want = per_text_attention(q, k, v, spans)
    assert got.shape == want.shape == (tokens, heads, head_dim)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_packed_spans_read_like_the_span_list():
    spans = spans_of(LENGTHS)
    packing = PackedSpans(spans, torch.device("cpu"), NESTED)
    assert list(packing) == spans and len(packing) == len(LENGTHS)
    assert packing.cu_seqlens.tolist() == [0, *np.cumsum(LENGTHS).tolist()]
    assert (packing.min_len, packing.max_len) == (1, 64)


def test_the_cpu_keeps_its_text_by_text_path():
    assert packed_kernel(torch.device("cpu"), torch.bfloat16) is None


def test_model_with_the_nested_kernel_gives_the_text_by_text_vectors(tiny_model_dir):
    """The CUDA wiring (PackedSpans through the backbone's attention) run on CPU: same vectors, fp32."""
    by_text = Encoder.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    packed = Encoder.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    packed.packed_kernel = NESTED  # what CUDA selects for fp32; here on CPU
    rng = np.random.default_rng(0)
    token_ids = [rng.integers(0, 151643, n).tolist() for n in (3, 40, 1, 17, 90)]

    want = by_text.embed_token_ids(token_ids)
    got = packed.embed_token_ids(token_ids)

    assert packed.packed and packed.max_batch_tokens >= sum(len(ids) for ids in token_ids)  # one packed batch
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
