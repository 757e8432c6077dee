"""The transformer that turns token ids into last hidden states.

KaLM's Qwen2 checkpoints (any architecture name: the repository's own modeling code is
never run) are loaded with stock ``transformers`` ``Qwen2Model`` (weight names, shards,
missing-weight checks) and then run by our own lean bidirectional Qwen2
(:mod:`serve_app.core.qwen2`) over those weights. Any other architecture (BERT-like
sentence-transformers models) is loaded with ``AutoModel``, which is already bidirectional.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn

from ..errors import MissingWeightsError, ModelLoadError
from .checkpoint import ModelFiles
from .linear import can_prepack
from .qwen2 import BidirectionalQwen2

log = logging.getLogger(__name__)


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
        prepack = can_prepack(device, dtype)
        on_device = model.to(device)  # type: ignore[arg-type]  # transformers types .to() for its own wrappers only
        module: nn.Module = BidirectionalQwen2(on_device, prepack=prepack)
        log.info("Qwen2 engine: GEMMs via %s", "oneDNN, prepacked weights" if prepack else "F.linear")
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
