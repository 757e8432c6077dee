"""The models one ingress serves: each with its config, tokenizer and encoder deployment's handle.

Several models are served as several encoder deployments behind the one ingress, not as Serve's
model multiplexing (``@serve.multiplexed``, models loaded on demand into the replicas of one
deployment): each model keeps its own replicas, autoscaling, placement and dtype; a request for
one never waits behind another's model load or computes on its replicas; and losing one model's
replica leaves the others untouched. Multiplexing suits many small, rarely used models sharing
replicas; docs/migrating-models.md says more.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import ServiceConfig
from ..core.quantization import CalibrationRanges
from ..core.tokenization import TextTokenizer
from ..errors import ModelNotFoundError
from .dispatch import EncoderHandle


@dataclass(frozen=True)
class ServedModel:
    """One model: its single-model config (``ServiceConfig.served_models``), tokenizer, vector size, replicas."""

    config: ServiceConfig
    tokenizer: TextTokenizer
    dimensions: int
    encoder: EncoderHandle

    @property
    def id(self) -> str:
        return self.config.model_id

    @functools.cached_property
    def calibration(self) -> CalibrationRanges | None:
        """The model's int8/uint8 ranges (``calibration_ranges``, written by the corpus job), read once."""
        path = self.config.calibration_ranges
        return CalibrationRanges.load(path) if path else None


class ServedModels:
    """The served models in config order, found by any id a request may name."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("a service serves at least one model")
        self.models = models
        self._by_id = {model_id: model for model in models for model_id in model.config.accepted_model_ids}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models)

    @property
    def first(self) -> ServedModel:
        return self.models[0]

    @property
    def min_input_tokens(self) -> int:
        """The smallest per-input token limit: counts made before a request's model is known use it."""
        return min(model.tokenizer.max_input_tokens for model in self.models)

    def resolve(self, requested: str) -> ServedModel:
        """The model a request's ``model`` names; ``ModelNotFoundError`` for any other id."""
        model = self._by_id.get(requested)
        if model is None:
            served = ", ".join(f"'{m.id}'" for m in self.models)
            raise ModelNotFoundError(f"The model '{requested}' does not exist; this service serves {served}")
        return model
