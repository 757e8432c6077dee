"""The corpus job: ``embed_corpus(CorpusOptions(...)) -> CorpusSummary``.

Checks the model and the options, plans the parts (or reads the plan of an earlier run and
refuses to go on if the settings or the input changed), starts or joins Ray only when there
is something to embed, runs :mod:`.pipeline`, and writes ``_summary.json``. Prompts follow the
HTTP API exactly (``instruction`` / ``input_type``), so queries embedded by the service and
documents embedded here live in the same space. See :mod:`.plan` and :mod:`.output` for the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import environment
from ..core.quantization import CALIBRATED_TYPES, PACKED_TYPES, CalibrationRanges, bytes_per_vector
from ..errors import CorpusError
from .calibration import calibration_for
from .files import InputFile, absolute_uri, join, list_inputs
from .options import MAX_ROWS_PER_PART, MIN_ROWS_PER_PART, CorpusOptions, JobSettings
from .output import MANIFEST, SUMMARY, done_parts, output_counts, prepare_output, read_json, write_json
from .pipeline import Actors, build
from .plan import Plan, check_unchanged, make_plan
from .progress import CorpusSummary, Progress
from .records import Columns
from .scanning import scan_file

log = logging.getLogger("serve_app.corpus")


def embed_corpus(options: CorpusOptions) -> CorpusSummary:
    """Embed every part of ``options.input`` that has no file in ``options.output`` yet.

    Raises :class:`~serve_app.errors.CorpusError` (or another ``KalmServeError``) when the
    options, the model, the input or the output folder cannot be used as asked.
    """
    options.check()
    with Progress(options.progress_interval) as progress:
        return _embed(options, progress)


def default_rows_per_part(rows: int, max_actors: int) -> int:
    """Big parts (fewer files, little per-part overhead), but enough to keep every actor busy."""
    return min(MAX_ROWS_PER_PART, max(MIN_ROWS_PER_PART, -(-rows // (4 * max_actors))))


@dataclass
class _Run:
    """What this run embedded and how long it took."""

    parts_done_before: int = 0
    pipeline_s: float = 0.0
    steady_s: float = 0.0


def _embed(options: CorpusOptions, progress: Progress) -> CorpusSummary:
    from ..core.checkpoint import read_model_files
    from ..core.tokenization import TextTokenizer

    wall_started = time.perf_counter()
    model = _resolve_model(options.model)
    progress.stage(f"reading the model's files ({model}) and listing {options.input}")
    files = read_model_files(model)  # fails here, with the way out, when the model can't be found
    if files.is_standin:
        progress.note(f"{model} is a stand-in checkpoint with RANDOM weights, not the real model")
    if options.dimensions is not None and not 1 <= options.dimensions <= files.hidden_size:
        raise CorpusError(f"dimensions must be between 1 and {files.hidden_size}, got {options.dimensions}")
    tokenizer = TextTokenizer(files, options.max_tokens)
    settings = JobSettings(
        model=model,
        prompt=tokenizer.request_prompt(options.instruction, options.input_type),
        dimensions=options.dimensions,
        max_tokens=tokenizer.max_input_tokens,
        truncate=options.truncate,
        text_column=options.text_column,
        id_column=options.id_column or "id",
        format=options.format,
        rows_per_part=options.rows_per_part or MAX_ROWS_PER_PART,  # without rows_per_part: decided when planning
        embedding_types=list(dict.fromkeys(("float", *(options.embedding_types or ())))),
    )
    out_uri = absolute_uri(options.output)
    inputs = list_inputs(absolute_uri(options.input), options.format)
    dimensions = settings.dimensions or files.hidden_size
    run = _Run()

    plan = _resumed_plan(options, settings, out_uri, inputs)
    packed = [t for t in settings.embedding_types if t in PACKED_TYPES]
    if packed and dimensions % 8:
        raise CorpusError(f"{packed[0]} packs 8 dimensions a byte: give a multiple of 8 dimensions, not {dimensions}")
    if plan is not None and not _pending(plan, out_uri):
        run.parts_done_before = plan.parts
        progress.stage(f"all {plan.parts:,} parts are already done: nothing to embed")
    else:
        with _ray(options, progress):
            actors = Actors.for_cluster(options)
            if plan is None:
                plan = _new_plan(options, settings, inputs, out_uri, actors.max_actors, progress)
            pending = _pending(plan, out_uri)
            run.parts_done_before = plan.parts - len(pending)
            rows_before = plan.rows - sum(b - a for a, b in map(plan.part_rows, pending))
            if run.parts_done_before:
                progress.stage(
                    f"{run.parts_done_before:,} of {plan.parts:,} parts already done ({rows_before:,} rows): "
                    f"embedding the {len(pending):,} missing"
                )
            initial_actors = min(actors.max_actors, len(pending))
            progress.stage(f"loading the model on {actors.describe(initial_actors)}")
            calibration: CalibrationRanges | None = None
            if any(t in CALIBRATED_TYPES for t in settings.embedding_types):
                progress.stage(f"calibrating int8/uint8 on up to {options.calibration_rows:,} rows")
                calibration = calibration_for(plan, settings, options, actors, out_uri, files.hidden_size)
            progress.start_embedding(plan.rows, rows_before)
            pipeline_started = time.perf_counter()
            dataset = build(plan, pending, settings, options, actors, out_uri, dimensions, calibration)
            with _ray_data_console_quiet(not options.verbose):
                for summary in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    progress.update(summary)
            run.pipeline_s = time.perf_counter() - pipeline_started
            if progress.first_ready_at is not None:
                run.steady_s = time.time() - progress.first_ready_at
            progress.finish()
    return _summarize(
        options, plan, out_uri, progress, run, dimensions, settings.embedding_types, time.perf_counter() - wall_started
    )


def _resolve_model(name: str | None) -> str:
    name = name or environment.model()
    return os.path.abspath(os.path.expanduser(name)) if os.path.isdir(os.path.expanduser(name)) else name


def _resumed_plan(options: CorpusOptions, settings: JobSettings, out_uri: str, inputs: list[InputFile]) -> Plan | None:
    """The plan of an earlier run into ``out_uri``, if any, once its settings and input match these."""
    manifest = read_json(join(out_uri, MANIFEST))
    if manifest is None:
        return None
    plan = Plan.from_json(manifest)
    if options.rows_per_part is None:  # not given: whatever the job was started with
        settings.rows_per_part = plan.settings.get("rows_per_part", settings.rows_per_part)
    if options.embedding_types is None:  # likewise (jobs from before quantised columns: float only)
        settings.embedding_types = plan.settings.get("embedding_types", ["float"])
    plan.settings.setdefault("embedding_types", ["float"])
    differ = {k: (plan.settings.get(k), v) for k, v in settings.as_dict().items() if plan.settings.get(k) != v}
    if differ:
        raise CorpusError(
            f"{options.output} was started with other settings: "
            + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differ.items())
            + ". Resume with the same arguments, or write to a new output folder"
        )
    check_unchanged(plan, inputs)
    log.info("resuming %s: %d rows in %d parts", options.output, plan.rows, plan.parts)
    return plan


def _new_plan(
    options: CorpusOptions,
    settings: JobSettings,
    inputs: list[InputFile],
    out_uri: str,
    max_actors: int,
    progress: Progress,
) -> Plan:
    """Count every input file's rows (a Ray task per file), cut them into parts, write the manifest."""
    import ray

    progress.stage(f"planning: counting the rows of {len(inputs):,} input file{'s' if len(inputs) != 1 else ''}")
    cols = Columns(text=settings.text_column, id=settings.id_column)
    scan = ray.remote(num_cpus=1)(scan_file)
    scans = ray.get([scan.remote(f, cols) for f in inputs])
    if options.rows_per_part is None:
        settings.rows_per_part = default_rows_per_part(sum(s.rows for s in scans), max_actors)
    plan = make_plan(inputs, scans, settings.as_dict(), settings.rows_per_part, options.id_column is not None)
    write_json(join(out_uri, MANIFEST), plan.to_json())
    progress.stage(
        f"planned {plan.rows:,} rows in {plan.parts:,} parts of <= {plan.rows_per_part:,} rows "
        f"(ids: {plan.id_source.replace('_', ' ')}, {plan.id_type})"
    )
    return plan


def _pending(plan: Plan, out_uri: str) -> list[int]:
    """The parts without a file yet (temp files a killed run left behind are dropped first)."""
    prepare_output(out_uri)
    done = done_parts(out_uri)
    return [p for p in range(plan.parts) if p not in done]


@contextlib.contextmanager
def _ray(options: CorpusOptions, progress: Progress) -> Iterator[None]:
    """Join the Ray cluster at ``address`` or ``$RAY_ADDRESS``, else start a local one; leave it on the way out.

    Without ``verbose`` Ray's own Python logs stay below ERROR and the actors' output stays in
    Ray's log files; a process already connected (a notebook, a test) keeps its connection.
    """
    import ray

    if ray.is_initialized():
        progress.stage("using the Ray this process is connected to")
        yield
        return
    address = options.address or environment.ray_address()
    progress.stage(f"connecting to Ray at {address}" if address else "starting a local Ray")
    ray.init(
        address=address,
        object_store_memory=None if address else options.object_store_memory,  # for a Ray this job starts
        include_dashboard=None if address else False,
        log_to_driver=options.verbose,
        logging_level=logging.INFO if options.verbose else logging.ERROR,
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _ray_data_console_quiet(quiet: bool) -> Iterator[None]:
    """Ray Data's console lines (execution plan, "progress bars disabled") only at ERROR; its log files keep all."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in handlers]
    if quiet:
        for h in handlers:
            h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def _summarize(
    options: CorpusOptions,
    plan: Plan,
    out_uri: str,
    progress: Progress,
    run: _Run,
    dimensions: int,
    embedding_types: list[str],
    wall_s: float,
) -> CorpusSummary:
    good, bad = output_counts(out_uri)
    incomplete = [
        p
        for p in range(plan.parts)
        if p not in good or good[p] + bad.get(p, 0) != plan.part_rows(p)[1] - plan.part_rows(p)[0]
    ]
    summary = CorpusSummary(
        output=out_uri,
        complete=not incomplete,
        incomplete_parts=incomplete[:20],
        corpus_rows=plan.rows,
        corpus_embedded=sum(good.values()),
        corpus_bad=sum(bad.values()),
        parts=plan.parts,
        parts_done_before=run.parts_done_before,
        parts_this_run=progress.parts,
        rows=progress.rows,
        embedded=progress.embedded,
        bad=progress.bad,
        tokens=progress.tokens,
        pipeline_s=round(run.pipeline_s, 3),
        wall_s=round(wall_s, 3),
        tokens_per_s=round(progress.tokens / run.pipeline_s, 1) if run.pipeline_s else 0.0,
        tokens_per_s_wall=round(progress.tokens / wall_s, 1) if wall_s else 0.0,
        steady_s=round(run.steady_s, 3),
        tokens_per_s_steady=round(progress.tokens / run.steady_s, 1) if run.steady_s else 0.0,
        dimensions=dimensions,
        embedding_types=embedding_types,
        bytes_per_row={t: bytes_per_vector(t, dimensions) for t in embedding_types},
        id_source=plan.id_source,
        id_type=plan.id_type,
        dtypes=sorted(progress.dtypes),
    )
    if len(progress.dtypes) > 1:
        log.warning(
            "encoders ran in several dtypes (%s): nodes differ in bf16 support; pin --dtype for vectors computed alike",
            ", ".join(summary.dtypes),
        )
    write_json(join(out_uri, SUMMARY), summary.to_json())
    return summary
