"""The transformer that turns token ids into last hidden states.

KaLM v2 is a Qwen2 decoder whose causal mask was removed for training. It is built
here from stock ``transformers`` Qwen2 modules; the repository's own modeling code is
never run. Stock Qwen2 silently builds a *causal* mask from a 2-D padding mask (and
in transformers 5.x clearing ``is_causal`` on the attention modules does not change
that mask), so :class:`BidirectionalQwen2` builds the padding-only mask itself and
hands it to the model as the prepared per-layer-type mask mapping.

Packed batches (CPU): several texts laid end to end in one row, no padding. Each
layer's attention then runs text by text over its own span (``spans``, see
:func:`span_attention`), and positions restart at 0 for every text, so a text's vector
does not depend on what it was packed with.

Any other architecture (BERT-like sentence-transformers models) is loaded with
``AutoModel``, which is already bidirectional.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..errors import MissingWeightsError, ModelLoadError
from .checkpoint import ModelFiles
from .packed_attention import PackedSpans, packed_attention

log = logging.getLogger(__name__)

#: Our attention implementation's name in transformers' registries: SDPA, text by text when packed.
SPAN_ATTENTION = "kalm_span_sdpa"


def span_attention(module, query, key, value, attention_mask, spans=None, **kwargs):
    """SDPA over a packed row one text (span of positions) at a time; plain SDPA without spans.

    A loop of small fused calls instead of one masked call over the whole row: a
    block-diagonal mask would cost (row length)² attention work, the loop Σ (text length)².
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(spans, PackedSpans):  # CUDA: the whole row in one kernel call
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, heads, tokens, dim] -> [tokens, heads, dim]
        return packed_attention(q, k, v, spans, kwargs.get("scaling")).unsqueeze(0), None
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in spans
    ]
    return torch.cat(outputs, dim=1), None


def _register_span_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SPAN_ATTENTION, span_attention)
    AttentionMaskInterface.register(SPAN_ATTENTION, sdpa_mask)  # padded batches: SDPA's own mask


@dataclass
class LayerState:
    """A forward pass between two layers: what the next layer needs."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor
    spans: list[tuple[int, int]] | None  # packed batches: each text's positions in the row
    next_layer: int = 0


class BidirectionalQwen2(nn.Module):
    """Qwen2 with full (non-causal) attention over every non-padding token.

    Runs stock Qwen2 modules layer by layer (``begin`` / ``advance`` / ``end``), so a
    forward pass can stop between layers and go on later: the scheduler uses that to
    let interactive work overtake a long bulk batch.
    """

    def __init__(self, qwen2):
        super().__init__()
        from transformers.masking_utils import create_bidirectional_mask

        if getattr(qwen2.config, "use_sliding_window", False):
            raise ModelLoadError("sliding-window Qwen2 checkpoints are not supported")
        _register_span_attention()
        qwen2.config._attn_implementation = SPAN_ATTENTION
        self.qwen2 = qwen2
        self._create_mask = create_bidirectional_mask
        # SDPA and flash attention consult the module flag when no mask is passed.
        for layer in qwen2.layers:
            layer.self_attn.is_causal = False
        self.num_layers = qwen2.config.num_hidden_layers

    @property
    def config(self):
        return self.qwen2.config

    def begin(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> LayerState:
        """Padded batch (``attention_mask`` [rows, len]) or one packed row (``spans``)."""
        hidden = self.qwen2.embed_tokens(input_ids)
        if spans is not None:
            mask = None
            position_ids = torch.cat([torch.arange(b - a, device=input_ids.device) for a, b in spans]).unsqueeze(0)
        else:
            # None when nothing is padded: SDPA then runs its fused kernel with no mask at all.
            mask = self._create_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
            # Right padding: every text's positions start at 0, whatever batch it is in.
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return LayerState(hidden, mask, self.qwen2.rotary_emb(hidden, position_ids), position_ids, spans)

    def advance(self, state: LayerState, layers: int | None = None) -> bool:
        """Run up to ``layers`` more layers (all by default); True once the last has run."""
        stop = self.num_layers if layers is None else min(self.num_layers, state.next_layer + layers)
        for layer in self.qwen2.layers[state.next_layer : stop]:
            state.hidden = layer(
                state.hidden,
                attention_mask=state.mask,
                position_ids=state.position_ids,
                position_embeddings=state.position_embeddings,
                use_cache=False,
                spans=state.spans,
            )
        state.next_layer = stop
        return stop == self.num_layers

    def end(self, state: LayerState) -> torch.Tensor:
        return self.qwen2.norm(state.hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        state = self.begin(input_ids, attention_mask, spans)
        self.advance(state)
        return self.end(state)


class AutoEncoderBackbone(nn.Module):
    """Any bidirectional encoder AutoModel knows (BERT, XLM-R, ...); runs in one piece."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_backbone(
    files: ModelFiles,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Build the model for ``files`` on ``device`` in ``dtype``, in eval mode."""
    if files.is_qwen2:
        from transformers import Qwen2Config, Qwen2Model

        cfg = {k: v for k, v in files.config.items() if k not in ("auto_map", "architectures", "model_type")}
        config = Qwen2Config(**cfg)
        config._attn_implementation = "sdpa"
        try:
            loaded = Qwen2Model.from_pretrained(
                str(files.path),
                config=config,
                dtype=dtype,
                attn_implementation="sdpa",
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load weights from {files.path}: {exc}") from exc
        # output_loading_info=True returns (model, info); transformers' annotation names the model alone
        model, info = cast("tuple[Qwen2Model, dict[str, list[str]]]", loaded)
        # Unused tensors such as lm_head are fine; a missing one would be silently random.
        if info["missing_keys"]:
            raise MissingWeightsError(list(info["missing_keys"]))
        module: nn.Module = BidirectionalQwen2(model)
    else:
        from transformers import AutoModel

        try:
            model, info = AutoModel.from_pretrained(
                str(files.path),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {files.path}: {exc}") from exc
        if info["missing_keys"]:
            raise MissingWeightsError(list(info["missing_keys"]))
        module = AutoEncoderBackbone(model)
    return module.to(device).eval()
