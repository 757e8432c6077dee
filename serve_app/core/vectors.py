"""Vectors after pooling: L2 normalisation and Matryoshka truncation (numpy only, no torch)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidRequestError


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def check_dimensions(dimensions: int | None, native_dimensions: int) -> None:
    """Matryoshka sizes run from 1 to the model's own; anything else is the caller's mistake (HTTP 400)."""
    if dimensions is not None and not 1 <= dimensions <= native_dimensions:
        raise InvalidRequestError(
            f"dimensions must be between 1 and {native_dimensions}, got {dimensions}", param="dimensions"
        )


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first ``dimensions`` values, then L2-normalise again."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return l2_normalize(vectors[..., :dimensions]).astype(np.float32, copy=False)
