"""Products with a weight matrix, and the element-wise work fused into them.

On CPU the weights are reordered once, at load, into oneDNN's blocked layout and every
product runs through ``torch.ops.mkldnn._linear_pointwise`` with its epilogue fused:
SiLU on the gate projection, × the gate on the up projection, + the residual on the
output and down projections: at least as fast as MKL's ``F.linear``, faster on small
batches, and each fused epilogue saves a pass over memory (figures:
docs/measurements/2026-11-30-engine-cpu.md).
Where oneDNN cannot take the weights (CUDA; bf16 on a CPU without AVX512 or AVX-NE-CONVERT)
the same calls run as ``F.linear`` and one eager op.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Projection:
    """``x @ weight.T (+ bias)``, with optional fused epilogues. ``weight`` [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prepacked: bool = False):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.prepacked = prepacked
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if prepacked else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(x @ W.T)."""
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish", [], "")
        return F.silu(F.linear(x, self.weight, self.bias), inplace=True)

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ W.T) * other."""
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "mul")
        return F.linear(x, self.weight, self.bias).mul_(other)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ W.T (a new tensor; ``residual`` is not changed)."""
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return torch.addmm(residual, x, self.weight.t()) if self.bias is None else residual + self(x)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN takes weights of ``dtype`` on ``device`` (tried once on a tiny matrix)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), weight, None, "none", [], "")
    except RuntimeError as exc:  # e.g. bf16 on AVX2: "bf16 path needs the cpu support avx_ne_convert or avx512bw..."
        log.info("oneDNN linear unavailable for %s (%s): plain F.linear", dtype, exc)
        return False
    return True
