"""The lean Qwen2 engine's pieces equal the plain math they replace (end-to-end parity: test_encoder.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve_app.core.attention import PackedLayout, PaddedLayout, bidirectional_attention
from serve_app.core.linear import Projection, can_prepack
from serve_app.core.qwen2 import RotaryPhases, apply_rotary, rotary_pair_order

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def dense_attention(q, k, v):
    """softmax(q kᵀ / √d) v for one text, key/value heads repeated: [len, heads, dim] → [len, heads * dim]."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())
    return out.reshape(q.shape[0], -1).float()


def random_qkv(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, HEADS, HEAD_DIM, generator=g),
        torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g),
        torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g),
    )


def test_packed_attention_is_each_texts_own_attention():
    lengths = [5, 1, 12, 7]
    q, k, v = random_qkv(sum(lengths))
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n))
        start += n
    got = bidirectional_attention(q, k, v, PackedLayout(spans))
    for a, b in spans:
        torch.testing.assert_close(got[a:b], dense_attention(q[a:b], k[a:b], v[a:b]), atol=1e-5, rtol=0)


def test_padded_attention_ignores_padding_keys():
    rows, length, lengths = 3, 9, [9, 4, 1]
    q, k, v = random_qkv(rows * length, seed=1)
    key_mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    got = bidirectional_attention(q, k, v, PaddedLayout(rows, length, key_mask))
    for row, n in enumerate(lengths):
        a = row * length
        torch.testing.assert_close(
            got[a : a + n], dense_attention(q[a : a + n], k[a : a + n], v[a : a + n]), atol=1e-5, rtol=0
        )
    unpadded = bidirectional_attention(q[:length], k[:length], v[:length], PaddedLayout(1, length, None))
    torch.testing.assert_close(unpadded, dense_attention(q[:length], k[:length], v[:length]), atol=1e-5, rtol=0)


def test_rotary_on_pair_ordered_rows_is_qwen2_rotary():
    """Qwen2 rotates x·cos + rotate_half(x)·sin; on rows in pair order that is one complex product."""
    tokens, theta = 11, 10000.0
    x = torch.randn(tokens, HEADS * HEAD_DIM)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 40])
    inv_freq = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.outer(positions.double(), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    heads = x.double().view(tokens, HEADS, HEAD_DIM)
    half = HEAD_DIM // 2
    want = heads * cos + torch.cat([-heads[..., half:], heads[..., :half]], -1) * sin

    got = apply_rotary(
        x[:, rotary_pair_order(HEADS, HEAD_DIM)], RotaryPhases(HEAD_DIM, theta, x.device)(positions), HEAD_DIM
    )
    torch.testing.assert_close(got.double(), want[..., rotary_pair_order(1, HEAD_DIM)], atol=1e-5, rtol=0)


def test_rotary_phases_grow_for_longer_positions():
    phases = RotaryPhases(HEAD_DIM, 1e6, torch.device("cpu"))
    short = phases(torch.arange(10))
    long = phases(torch.arange(5000))
    assert phases.table.shape[0] == 8192
    torch.testing.assert_close(long[:10], short)


@pytest.mark.parametrize("prepacked", [False, True], ids=["F.linear", "oneDNN"])
def test_projection_epilogues_equal_eager_math(prepacked):
    if prepacked and not can_prepack(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN linear unavailable")
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(7, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    other = torch.randn(7, 40, generator=g)
    plain = F.linear(x, weight, bias)
    with_bias, no_bias = Projection(weight, bias, prepacked=prepacked), Projection(weight, prepacked=prepacked)
    torch.testing.assert_close(with_bias(x), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_bias.silu(x), F.silu(F.linear(x, weight)), atol=1e-5, rtol=0)
    torch.testing.assert_close(no_bias.times(x, other), F.linear(x, weight) * other, atol=1e-5, rtol=0)
    residual = other.clone()
    torch.testing.assert_close(no_bias.plus(x, residual), other + F.linear(x, weight), atol=1e-5, rtol=0)
    torch.testing.assert_close(residual, other)  # the residual input is left as it was
