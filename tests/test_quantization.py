"""Quantised embeddings are sentence-transformers' ``quantize_embeddings``, bit for bit (core/quantization.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from serve_app.core.quantization import CalibrationRanges, bytes_per_vector, check_embedding_types, quantize
from serve_app.core.vectors import l2_normalize, truncate_dimensions
from serve_app.errors import InvalidRequestError

pytestmark = pytest.mark.unit


def unit_vectors(n: int, dims: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    v[:, 3] = 0.0  # exactly 0 is "not > 0": bit 0
    return l2_normalize(v).astype(np.float32)


@pytest.mark.parametrize("embedding_type", ["binary", "ubinary"])
@pytest.mark.parametrize("dims", [64, 32, 8])
def test_binary_types_equal_sentence_transformers(embedding_type, dims):
    vectors = truncate_dimensions(unit_vectors(50), dims)
    got = quantize(vectors, embedding_type)
    want = quantize_embeddings(vectors, precision=embedding_type)
    assert got.dtype == want.dtype and got.shape == (50, dims // 8)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("embedding_type", ["int8", "uint8"])
@pytest.mark.parametrize("dims", [64, 16])
def test_calibrated_types_equal_sentence_transformers_with_the_same_sample(embedding_type, dims):
    sample = unit_vectors(500, seed=1)
    calibration = CalibrationRanges.from_sample(sample, [64, 16], "m")
    vectors = truncate_dimensions(unit_vectors(50, seed=2), dims)  # not in the sample: some values fall outside
    got = quantize(vectors, embedding_type, calibration)
    want = quantize_embeddings(
        vectors, precision=embedding_type, calibration_embeddings=truncate_dimensions(sample, dims)
    )
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_calibration_ranges_survive_their_file_exactly(tmp_path):
    calibration = CalibrationRanges.from_sample(unit_vectors(300), [64, 32, 8], "m")
    (tmp_path / "c.json").write_bytes(calibration.to_json())
    loaded = CalibrationRanges.load(tmp_path / "c.json")
    assert loaded.model == "m" and loaded.sample_size == 300 and sorted(loaded.ranges) == [8, 32, 64]
    for dims, r in calibration.ranges.items():
        assert loaded.ranges[dims].tobytes() == r.tobytes()


def test_a_constant_dimension_maps_to_level_0_as_in_sentence_transformers():
    sample = unit_vectors(10)
    calibration = CalibrationRanges.from_sample(sample, [64], "m")
    assert calibration.ranges[64][0, 3] == calibration.ranges[64][1, 3] == 0
    got = quantize(sample, "uint8", calibration)
    assert got.tobytes() == quantize_embeddings(sample, "uint8", calibration_embeddings=sample).tobytes()


def test_bytes_per_vector():
    assert [bytes_per_vector(t, 256) for t in ("float", "int8", "uint8", "binary", "ubinary")] == [
        1024,
        256,
        256,
        32,
        32,
    ]


@pytest.mark.parametrize(
    "types, dims, calibrated, param, says",
    [
        (["float", "int4"], 64, True, "types", "unknown embedding type 'int4'"),
        (["ubinary"], 12, True, "dims", "multiple of 8"),
        (["int8"], 64, False, "types", "calibration ranges"),
        (["uint8"], 24, True, "dims", "for 8, 64 dimensions"),
    ],
)
def test_what_cannot_be_given_is_a_client_mistake(types, dims, calibrated, param, says):
    calibration = CalibrationRanges.from_sample(unit_vectors(20), [64, 8], "m") if calibrated else None
    with pytest.raises(InvalidRequestError, match=says) as caught:
        check_embedding_types(types, dims, calibration, "types", "dims")
    assert caught.value.param == param
