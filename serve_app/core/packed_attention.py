"""One attention call per layer over a packed batch on CUDA: texts end to end, no padding.

A packed row holds several texts; each text attends only to itself (block-diagonal
attention). The CPU runs that text by text (``backbone.span_attention``); on a GPU one
kernel launch per text and layer would leave it idle, so there the whole row goes to a
single variable-length kernel, given each text's start as ``cu_seqlens``:

* ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, FlashAttention-2 over
  ``cu_seqlens`` (torch 2.11 and 2.13, no extra package): fp16/bf16 on GPUs with compute
  capability 8.0 or newer; grouped-query attention without repeating KV heads.
* ``nested``: SDPA over nested jagged tensors, which dispatches to the same fused
  variable-length kernels on CUDA (the memory-efficient one for fp32) and to a plain
  loop elsewhere, so it also runs, and is tested, on CPU. KV heads are repeated for GQA.

:func:`packed_kernel` chooses, the one place that does. None of this has run on a GPU
yet (docs/gpu.md): ``scripts/gpu_check.py`` checks both kernels against per-text SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F

from .device import to_device

VARLEN = "varlen"
NESTED = "nested"


def packed_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernel a packed batch's attention runs on here; None: text by text (the CPU's own path)."""
    if device.type != "cuda":
        return None
    flash_ok = (
        dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(device) >= (8, 0)
        and torch.backends.cuda.is_flash_attention_available()
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    )
    return VARLEN if flash_ok else NESTED


class PackedSpans(Sequence):
    """Each text's ``(start, end)`` in a packed row, and what a packed kernel needs, on the device.

    A sequence of spans like the CPU path's list, so the rest of the forward pass (positions,
    pooling) reads it the same way; the backbone's attention sends it to :func:`packed_attention`.
    """

    def __init__(self, spans: Sequence[tuple[int, int]], device: torch.device, kernel: str):
        self.spans = list(spans)
        self.kernel = kernel
        lengths = [b - a for a, b in self.spans]
        self.max_len, self.min_len = max(lengths), min(lengths)
        # Built on the host (lengths are known there) and copied asynchronously: no device sync.
        self.cu_seqlens = to_device(torch.tensor([0] + [b for _, b in self.spans], dtype=torch.int32), device)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index):
        return self.spans[index]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: PackedSpans, scale: float | None = None
) -> torch.Tensor:
    """Bidirectional attention within each text of a packed row.

    ``q`` [tokens, heads, head_dim], ``k`` and ``v`` [tokens, kv_heads, head_dim], tokens in
    the row's order; returns [tokens, heads, head_dim]. ``scale``: SDPA's default, 1/√head_dim.
    """
    # Contiguous: the kernels are only sure to take that layout.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if packing.kernel == VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        cu, longest = packing.cu_seqlens, packing.max_len
        # FlashAttention shares KV heads natively; torch 2.13 asks for it explicitly, 2.11 takes no such flag.
        if _varlen_has_gqa_flag():
            out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, enable_gqa=True)
        else:
            out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)
        return cast(torch.Tensor, out)  # no return_aux asked: the output alone
    return _nested_sdpa(q, k, v, packing, scale)


@functools.cache
def _varlen_has_gqa_flag() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _nested_sdpa(q, k, v, packing: PackedSpans, scale: float | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # nested SDPA takes no enable_gqa
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def jagged(t: torch.Tensor) -> torch.Tensor:  # [texts, heads, (length), head_dim]
        # min/max given: the nested tensor would otherwise read them from the device (a sync).
        return torch.nested.nested_tensor_from_jagged(
            t, packing.cu_seqlens, min_seqlen=packing.min_len, max_seqlen=packing.max_len
        ).transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), scale=scale)
    return out.transpose(1, 2).values()
