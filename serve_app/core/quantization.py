"""Embeddings sized for storage: ``binary``, ``ubinary``, ``int8`` and ``uint8`` (numpy only, no torch).

The definitions are sentence-transformers' ``quantize_embeddings``, bit for bit (docs/api.md,
"Quantised embeddings"), applied to the unit-length vector after the Matryoshka cut:

- ``ubinary``: one bit a dimension, 1 where the value is > 0, packed 8 dimensions a byte, the
  first dimension in the high bit (``np.packbits``); ``binary``: that byte - 128, as int8.
- ``uint8``: ``floor((value - min) / step)`` clipped to 0..255, in float32, where ``step`` is
  ``(max - min) / 255`` (1 where max = min) and min, max are the dimension's calibration range;
  ``int8``: that - 128.

Calibration ranges belong to the model (and to the output size: a cut vector is normalised
again, so each size has its own), never to a request: :class:`CalibrationRanges` are computed
from a sample of a corpus (the corpus job does, and writes them beside its output) and loaded
by the service from the file its config names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ..errors import InvalidRequestError
from .vectors import truncate_dimensions

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
#: One bit a dimension, 8 a byte: these need a multiple of 8 dimensions (no padding).
PACKED_TYPES = ("binary", "ubinary")
#: These need calibration ranges.
CALIBRATED_TYPES = ("int8", "uint8")
#: What the file the corpus job writes says it is.
CALIBRATION_FORMAT = "kalm-serve calibration ranges v1"
#: How to get ranges, for the 400 that says there are none.
HOW_TO_CALIBRATE = (
    "compute them with the corpus job (python -m serve_app.corpus ... --embedding-types int8 writes "
    "_calibration.json beside its output) and name that file in the service's config as calibration_ranges"
)


@dataclass(frozen=True)
class CalibrationRanges:
    """Per-dimension [min, max] of a sample of one model's vectors, for each output size."""

    model: str
    sample_size: int
    #: output dimensions -> float32 array [2, dimensions]: row 0 the minima, row 1 the maxima
    ranges: dict[int, np.ndarray]

    @classmethod
    def from_sample(cls, vectors: np.ndarray, dimensions: Iterable[int], model: str) -> CalibrationRanges:
        """Ranges for each of ``dimensions`` from unit-length vectors of the model's full size."""
        ranges = {}
        for dims in sorted(set(dimensions)):
            cut = truncate_dimensions(np.asarray(vectors, np.float32), dims)
            ranges[dims] = np.vstack((cut.min(axis=0), cut.max(axis=0))).astype(np.float32)
        return cls(model, len(vectors), ranges)

    def for_dimensions(self, dimensions: int, param: str) -> np.ndarray:
        if dimensions not in self.ranges:
            sizes = ", ".join(map(str, sorted(self.ranges)))
            raise InvalidRequestError(
                f"int8/uint8 at {dimensions} dimensions needs calibration ranges for that size; this service has "
                f"them for {sizes} dimensions. Ask for one of those, or {HOW_TO_CALIBRATE}",
                param=param,
            )
        return self.ranges[dimensions]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "format": CALIBRATION_FORMAT,
                "model": self.model,
                "sample_size": self.sample_size,
                # float32 written shortest-exact: read back as float32, every value is the same
                "ranges": {str(d): {"min": r[0], "max": r[1]} for d, r in self.ranges.items()},
            },
            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "calibration ranges") -> CalibrationRanges:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{where} is not a calibration file (its format must be {CALIBRATION_FORMAT!r})")
        ranges = {}
        for dims, r in doc["ranges"].items():
            array = np.array([r["min"], r["max"]], np.float32)
            if array.shape != (2, int(dims)):
                raise ValueError(f"{where}: the ranges for {dims} dimensions have shape {array.shape}")
            ranges[int(dims)] = array
        return cls(doc["model"], int(doc["sample_size"]), ranges)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationRanges:
        return cls.from_json(Path(path).read_bytes(), str(path))


def check_embedding_types(
    types: Sequence[str], dimensions: int, calibration: CalibrationRanges | None, param: str, dimensions_param: str
) -> None:
    """Raise the 400 for a set of types these vectors cannot be given in; ``param`` names the field."""
    unknown = [t for t in types if t not in EMBEDDING_TYPES]
    if unknown:
        raise InvalidRequestError(
            f"unknown embedding type {unknown[0]!r}; the types are {', '.join(EMBEDDING_TYPES)}", param=param
        )
    packed = [t for t in types if t in PACKED_TYPES]
    if packed and dimensions % 8:
        raise InvalidRequestError(
            f"{packed[0]} packs 8 dimensions a byte: ask for a multiple of 8 dimensions, not {dimensions}",
            param=dimensions_param,
        )
    calibrated = [t for t in types if t in CALIBRATED_TYPES]
    if calibrated:
        if calibration is None:
            raise InvalidRequestError(
                f"{calibrated[0]} needs calibration ranges (per-dimension min/max of the model's vectors) and this "
                f"service has none: {HOW_TO_CALIBRATE}",
                param=param,
            )
        calibration.for_dimensions(dimensions, dimensions_param)


def quantize(vectors: np.ndarray, embedding_type: str, calibration: CalibrationRanges | None = None) -> np.ndarray:
    """``vectors`` (float32 [n, d], unit length) in ``embedding_type``; checked first by ``check_embedding_types``."""
    if embedding_type == "float":
        return vectors
    if embedding_type in PACKED_TYPES:
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if embedding_type == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if embedding_type in CALIBRATED_TYPES:
        assert calibration is not None
        ranges = calibration.for_dimensions(vectors.shape[-1], "dimensions")
        starts = ranges[0]
        steps = (ranges[1] - starts) / np.float32(255)
        steps = np.where(steps == 0, np.float32(1), steps)
        levels = np.clip(np.floor((vectors.astype(np.float32, copy=False) - starts) / steps), 0, 255)
        return levels.astype(np.uint8) if embedding_type == "uint8" else (levels - 128).astype(np.int8)
    raise ValueError(f"unknown embedding type {embedding_type!r}")


def bytes_per_vector(embedding_type: str, dimensions: int) -> int:
    """Storage of one vector of ``dimensions`` in ``embedding_type``, without any index."""
    if embedding_type == "float":
        return 4 * dimensions
    return dimensions // 8 if embedding_type in PACKED_TYPES else dimensions
