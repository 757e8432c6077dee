"""KaLM v2's transformer: a lean bidirectional Qwen2 over the checkpoint's weights.

KaLM v2 is a Qwen2 decoder whose causal mask was removed for training. Stock
``transformers`` Qwen2 spends about 40 % of a CPU forward pass outside its GEMMs (separate
q/k/v and gate/up products, rotary through ``cat`` and ``neg``, RMSNorm in five ops,
residual adds, per-text attention outputs concatenated), so this module runs the same
math with less around the GEMMs:

* one GEMM for q, k and v (with their biases), whose q and k rows are reordered per head
  so that rotary is one complex multiply by ``cos + i·sin``: attention scores are dot
  products over the head's dimensions, unchanged when q and k share the reordering;
* RMSNorm as one fused op; SiLU, the gate product and both residual adds fused into the
  GEMMs where oneDNN runs them (``core.linear``);
* rotary phases computed once per position in float64 and cached;
* attention by ``core.attention``, the one place its kernel is chosen.

Hidden states are kept 2-D, [tokens, hidden], in the batch's layout (packed or padded);
positions restart at 0 for every text, so a text's vector does not depend on its batch.
The forward pass is a generator (:meth:`BidirectionalQwen2.forward_steps`) that yields
between layers and, given a step size, within them (token-wise products in pieces of
``step_tokens`` rows, attention of a long text in blocks of query rows of about as much
work), so that the scheduler can let interactive work overtake a long bulk batch, even a
single 32k-token text, and resume it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .attention import Layout, PackedLayout, PaddedLayout, attention_in_steps
from .linear import Projection
from .steps import Steps, run_to_end


@dataclass
class Qwen2Layer:
    """One decoder layer's weights, laid out for :meth:`BidirectionalQwen2.layer_steps`."""

    input_norm: torch.Tensor
    qkv: Projection  # q and k rows in rotary-pair order (see RotaryPhases)
    o: Projection
    post_norm: torch.Tensor
    gate: Projection
    up: Projection
    down: Projection


class RotaryPhases:
    """``cos θ + i·sin θ`` per position and frequency, computed in float64 and cached.

    With each head's dimensions ordered as pairs (d, d + head_dim/2), Qwen2's rotary
    (``x·cos + rotate_half(x)·sin``) is the complex product of each pair with the phase.
    """

    def __init__(self, head_dim: int, theta: float, device: torch.device):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.device = device
        self.table = torch.empty(0, head_dim // 2, dtype=torch.complex64, device=device)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """[tokens] positions → [tokens, 1, head_dim/2] complex phases."""
        longest = int(positions.max()) + 1
        if longest > self.table.shape[0]:
            size = 1 << (longest - 1).bit_length()  # grow in powers of two: few rebuilds
            angles = torch.outer(torch.arange(size, dtype=torch.float64), self.inv_freq)
            self.table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(self.device)
        return self.table[positions.to(self.device)].unsqueeze(1)


def rotary_pair_order(heads: int, head_dim: int) -> torch.Tensor:
    """Row order that puts each head's dimensions d and d + head_dim/2 side by side."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(heads)[:, None] * head_dim + within).flatten()


def apply_rotary(x: torch.Tensor, phases: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x`` [tokens, heads * head_dim] (pair order) rotated by ``phases``: [tokens, heads, head_dim]."""
    tokens = x.shape[0]
    pairs = torch.view_as_complex(x.float().view(tokens, -1, head_dim // 2, 2))
    return torch.view_as_real(pairs * phases).to(x.dtype).view(tokens, -1, head_dim)


class BidirectionalQwen2(nn.Module):
    """Qwen2 with full (non-causal) attention within each text, run layer by layer."""

    def __init__(self, qwen2, prepack: bool):
        """Take the weights of ``qwen2`` (a loaded ``transformers`` ``Qwen2Model``); ``prepack``:
        run the GEMMs through oneDNN (``core.linear``)."""
        super().__init__()
        config = qwen2.config
        if getattr(config, "use_sliding_window", False):
            raise ModelLoadError("sliding-window Qwen2 checkpoints are not supported")
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
        if rope.get("rope_type", "default") != "default":
            raise ModelLoadError(f"Qwen2 checkpoints with rope scaling {rope['rope_type']!r} are not supported")
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed_tokens = qwen2.embed_tokens.weight.detach()
        self.final_norm = qwen2.norm.weight.detach()
        self.rotary = RotaryPhases(self.head_dim, rope["rope_theta"], self.embed_tokens.device)
        q_order = rotary_pair_order(self.heads, self.head_dim)
        k_order = rotary_pair_order(self.kv_heads, self.head_dim)
        # Work per layer, to size pieces of a long text alike: a token's products, and a query-key pair's
        # scores and weighted values (multiply-adds count two).
        hidden, q_size, kv_size = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.flops_per_token = 2 * (hidden * (2 * q_size + 2 * kv_size) + 3 * hidden * config.intermediate_size)
        self.flops_per_pair = 4 * self.heads * self.head_dim
        self.layers = []
        with torch.no_grad():
            for layer in qwen2.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv_weight = torch.cat([attn.q_proj.weight[q_order], attn.k_proj.weight[k_order], attn.v_proj.weight])
                qkv_bias = torch.cat([attn.q_proj.bias[q_order], attn.k_proj.bias[k_order], attn.v_proj.bias])
                self.layers.append(
                    Qwen2Layer(
                        input_norm=layer.input_layernorm.weight.detach(),
                        qkv=Projection(qkv_weight, qkv_bias, prepacked=prepack),
                        o=Projection(attn.o_proj.weight.detach(), prepacked=prepack),
                        post_norm=layer.post_attention_layernorm.weight.detach(),
                        gate=Projection(mlp.gate_proj.weight.detach(), prepacked=prepack),
                        up=Projection(mlp.up_proj.weight.detach(), prepacked=prepack),
                        down=Projection(mlp.down_proj.weight.detach(), prepacked=prepack),
                    )
                )

    def layer_steps(
        self, layer: Qwen2Layer, x: torch.Tensor, layout: Layout, phases: torch.Tensor, step_tokens: int | None
    ) -> Steps[torch.Tensor]:
        """One layer over ``x`` [tokens, hidden]; yields between pieces when ``step_tokens`` is set."""
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        pieces = token_pieces(x.shape[0], step_tokens)
        qkv = yield from rowwise(lambda x: layer.qkv(self.norm(x, layer.input_norm)), pieces, x)
        q = apply_rotary(qkv[:, :q_size], phases, self.head_dim)
        k = apply_rotary(qkv[:, q_size : q_size + kv_size], phases, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, self.kv_heads, self.head_dim)
        pairs = None if step_tokens is None else step_tokens * self.flops_per_token // self.flops_per_pair
        attended = yield from attention_in_steps(q, k, v, layout, pairs_per_step=pairs)

        def rest(attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            x = layer.o.plus(attended, x)
            h = self.norm(x, layer.post_norm)
            return layer.down.plus(layer.up.times(h, layer.gate.silu(h)), x)

        return (yield from rowwise(rest, pieces, attended, x))

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], weight, self.eps)

    def forward_steps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
        step_tokens: int | None = None,
    ) -> Steps[torch.Tensor]:
        """The forward pass, yielding between layers and, with ``step_tokens``, between pieces
        of about that many tokens' work; returns the last hidden states [rows, length, hidden].

        A padded batch (``attention_mask`` [rows, len]) or one packed row (``spans``).
        """
        rows, length = input_ids.shape
        hidden = F.embedding(input_ids.reshape(-1), self.embed_tokens)
        layout: Layout
        if spans is not None:
            layout = PackedLayout(spans)
            positions = torch.cat([torch.arange(b - a) for a, b in spans])
        else:
            # No mask when nothing is padded: SDPA then runs its fused kernel unmasked.
            key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
            layout = PaddedLayout(rows, length, key_mask)
            # Right padding: every text's positions start at 0, whatever batch it is in.
            positions = torch.arange(length).repeat(rows)
        phases = self.rotary(positions)
        for index, layer in enumerate(self.layers):
            if index:
                yield
            hidden = yield from self.layer_steps(layer, hidden, layout, phases, step_tokens)
        return self.norm(hidden, self.final_norm).view(rows, length, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        return run_to_end(self.forward_steps(input_ids, attention_mask, spans))


def token_pieces(tokens: int, step_tokens: int | None) -> list[tuple[int, int]]:
    """``[a, b)`` row ranges of at most ``step_tokens`` rows covering ``tokens`` rows (one: all)."""
    step = tokens if step_tokens is None else step_tokens
    return [(a, min(tokens, a + step)) for a in range(0, tokens, max(1, step))]


def rowwise(
    fn: Callable[..., torch.Tensor], pieces: list[tuple[int, int]], *inputs: torch.Tensor
) -> Steps[torch.Tensor]:
    """``fn`` of row-wise ``inputs`` (each output row depends on the same input rows only),
    computed piece by piece with a yield between pieces; one piece: a plain call."""
    first = fn(*(t[: pieces[0][1]] for t in inputs))
    if len(pieces) == 1:
        return first
    out = first.new_empty((pieces[-1][1], *first.shape[1:]))
    out[: pieces[0][1]] = first
    for a, b in pieces[1:]:
        yield
        out[a:b] = fn(*(t[a:b] for t in inputs))
    return out
