"""Hidden states → one vector per text (normalisation and Matryoshka cuts: ``core.vectors``)."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``hidden`` [batch, seq, dim] over the tokens ``attention_mask`` marks (right padding).

    Accumulates in float32 whatever the model's dtype, so bf16 replicas pool as precisely
    as fp32 ones.
    """
    hidden = hidden.float()
    if mode == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = attention_mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling mode {mode!r}")
