"""Vectors after pooling: L2 normalisation and Matryoshka truncation (numpy only, no torch)."""

from __future__ import annotations

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first ``dimensions`` values, then L2-normalise again."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return l2_normalize(vectors[..., :dimensions]).astype(np.float32, copy=False)
