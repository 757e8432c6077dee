"""int8 / uint8 calibration of a corpus job: ranges from a sample of its own rows, ``_calibration.json``.

The sample is the first rows of up to 8 parts spread over the corpus, embedded once by one
encoder (a Ray task with an encoder actor's resources) with the job's prompt and limits. The file
is written before any part, and a resumed job reads it back: every part is quantised with the same
ranges. The service loads the same file (``calibration_ranges`` in its config), so its int8 / uint8
answers equal the job's columns for the same texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.quantization import CalibrationRanges
from .files import join
from .options import CorpusOptions, JobSettings
from .output import read_bytes, write_atomically
from .parts import read_part
from .plan import Plan

if TYPE_CHECKING:
    from .pipeline import Actors

CALIBRATION = "_calibration.json"
#: Parts the sample is read from, spread evenly over the corpus.
SAMPLE_PARTS = 8
#: Sizes the file has ranges for besides the job's own: KaLM v2's Matryoshka sizes below the model's.
MATRYOSHKA_DIMENSIONS = (512, 256, 128, 64)


def calibration_for(
    plan: Plan, settings: JobSettings, options: CorpusOptions, actors: Actors, out_uri: str, native_dimensions: int
) -> CalibrationRanges:
    """The ranges in ``out_uri``'s calibration file; computed and written first if it has none."""
    uri = join(out_uri, CALIBRATION)
    data = read_bytes(uri)
    if data is not None:
        return CalibrationRanges.from_json(data, uri)
    import ray

    sample = ray.remote(num_cpus=actors.num_cpus, num_gpus=actors.num_gpus)(_sample_ranges)
    dims = {native_dimensions, settings.dimensions or native_dimensions}
    dims |= {d for d in MATRYOSHKA_DIMENSIONS if d < native_dimensions}
    ranges = ray.get(sample.remote(plan, settings, options, sorted(dims)))
    write_atomically(uri, ranges.to_json())
    return ranges


def sample_rows(plan: Plan, rows: int) -> list[str]:
    """Up to ``rows`` texts: the first rows of up to SAMPLE_PARTS parts spread over the corpus."""
    k = min(plan.parts, SAMPLE_PARTS)
    parts = sorted({round(i * (plan.parts - 1) / max(k - 1, 1)) for i in range(k)})
    per_part = -(-rows // len(parts))
    return [t for p in parts for t in read_part(plan, p).texts[:per_part]][:rows]


def _sample_ranges(plan: Plan, settings: JobSettings, options: CorpusOptions, dims: list[int]) -> CalibrationRanges:
    """In a Ray task: embed the sample as the job's encoders do, and take each size's per-dimension ranges."""
    from .pipeline import EmbedParts, _tokenizer, tokenize

    texts = sample_rows(plan, options.calibration_rows)
    tokenized = tokenize(_tokenizer(settings.model, settings.max_tokens), texts, settings.prompt, settings.truncate)
    token_ids = [ids for ids, _ in tokenized if ids is not None]
    if not token_ids:
        raise ValueError("no row of the calibration sample could be embedded (all are bad rows)")
    encoder = EmbedParts(
        settings.model, options.device, options.dtype, settings.max_tokens, options.batch_tokens, None, options.verbose
    ).encoder
    return CalibrationRanges.from_sample(encoder.embed_token_ids(token_ids), dims, settings.model)
