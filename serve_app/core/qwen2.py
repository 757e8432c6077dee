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
It runs layer by layer (``begin`` / ``advance`` / ``end``) so a forward pass can stop
between layers: the scheduler lets interactive work overtake a long bulk batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .attention import Layout, PackedLayout, PaddedLayout, bidirectional_attention
from .linear import Projection


@dataclass
class Qwen2Layer:
    """One decoder layer's weights, laid out for :meth:`BidirectionalQwen2.run_layer`."""

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


@dataclass
class LayerState:
    """A forward pass between two layers: what the next layer needs."""

    hidden: torch.Tensor  # [tokens, hidden size]
    layout: Layout
    phases: torch.Tensor
    shape: tuple[int, int]  # (rows, length) of the output
    next_layer: int = 0


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

    def run_layer(self, layer: Qwen2Layer, x: torch.Tensor, layout: Layout, phases: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h = F.rms_norm(x, x.shape[-1:], layer.input_norm, self.eps)
        qkv = layer.qkv(h)
        q = apply_rotary(qkv[:, :q_size], phases, self.head_dim)
        k = apply_rotary(qkv[:, q_size : q_size + kv_size], phases, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, self.kv_heads, self.head_dim)
        x = layer.o.plus(bidirectional_attention(q, k, v, layout), x)
        h = F.rms_norm(x, x.shape[-1:], layer.post_norm, self.eps)
        return layer.down.plus(layer.up.times(h, layer.gate.silu(h)), x)

    def begin(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> LayerState:
        """Padded batch (``attention_mask`` [rows, len]) or one packed row (``spans``)."""
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
        return LayerState(hidden, layout, self.rotary(positions), (rows, length))

    def advance(self, state: LayerState, layers: int | None = None) -> bool:
        """Run up to ``layers`` more layers (all by default); True once the last has run."""
        stop = self.num_layers if layers is None else min(self.num_layers, state.next_layer + layers)
        for layer in self.layers[state.next_layer : stop]:
            state.hidden = self.run_layer(layer, state.hidden, state.layout, state.phases)
        state.next_layer = stop
        return stop == self.num_layers

    def end(self, state: LayerState) -> torch.Tensor:
        """The last hidden states, [rows, length, hidden size]."""
        hidden = F.rms_norm(state.hidden, state.hidden.shape[-1:], self.final_norm, self.eps)
        return hidden.view(*state.shape, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        state = self.begin(input_ids, attention_mask, spans)
        self.advance(state)
        return self.end(state)
