"""Embed a whole corpus offline with Ray Data: the service's exact vectors, every GPU, resumable.

    python -m serve_app.corpus --input docs/ --output vectors/ [--input-type document]
    python -m serve_app.corpus --input 's3://bucket/corpus/*.parquet' --output s3://bucket/vectors/
    python -m serve_app.corpus --input docs.jsonl --benchmark      # tokens/s against sentence-transformers

The pipeline, one Ray Data dataset, streaming (memory is bounded by a few parts in flight)::

    parts (fixed row ranges, the ones without output yet)
      ─► read + tokenise          CPU tasks on GPU clusters; inside the actors on CPU-only ones
                                  (corpus_io.read_part, the Encoder's TextTokenizer)
      ─► EmbedParts actors        1 GPU each, or reserved CPUs; autoscaling pool
                                  (Encoder.embed_token_ids: the service's token-budget batching)
      ─► write                    0-CPU tasks   part-XXXXXXXX.parquet, atomically
      ─► one summary row per part back to this process (progress, summary)

Prompts follow the HTTP API exactly (``--instruction`` / ``--input-type`` are its
``instruction`` / ``input_type``), so queries embedded by the service and documents
embedded here live in the same space. See ``serve_app.corpus.io`` for the files.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import environment, placement
from ..errors import InputTooLongError, KalmServeError
from .io import (
    BAD_ROWS_DIR,
    FORMATS,
    MANIFEST,
    SUMMARY,
    Columns,
    CorpusError,
    Plan,
    absolute_uri,
    bad_rows_name,
    check_unchanged,
    done_parts,
    join,
    list_inputs,
    make_plan,
    output_counts,
    part_name,
    prepare_output,
    read_json,
    read_part,
    scan_file,
    write_atomically,
    write_json,
)

log = logging.getLogger("serve_app.corpus")

#: Rows per part: at most this many, at least MIN_ROWS_PER_PART, else enough parts for 4 per encoder actor.
MAX_ROWS_PER_PART = 10_000
MIN_ROWS_PER_PART = 100
MAX_CPUS_PER_ACTOR = 8


def _configure_logging() -> None:
    """INFO from serve_app (the Encoder logs its model load), in the driver and in Ray workers."""
    logger = logging.getLogger("serve_app")
    logger.setLevel(logging.DEBUG if environment.corpus_debug() else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


# --- stage 1: read + tokenise (CPU tasks) ----------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str, max_input_tokens: int | None):
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    from ..core.checkpoint import read_model_files
    from ..core.tokenization import TextTokenizer

    os.environ.setdefault(
        "RAYON_NUM_THREADS", str(placement.reserved_cpus())
    )  # tokenizers: no more threads than reserved
    return TextTokenizer(read_model_files(model), max_input_tokens)


def tokenize(tokenizer, texts: list[str], prompt: str, truncate: bool) -> list[tuple[list[int] | None, str | None]]:
    """``(token ids, None)`` per text, or ``(None, reason)`` for one over the token limit."""
    if not texts:
        return []
    try:
        return [(t.ids, None) for t in tokenizer.encode_texts(texts, prompt=prompt, truncate=truncate)]
    except InputTooLongError:
        pass  # some are too long: find which, keep the rest
    out = []
    for text, t in zip(texts, tokenizer.encode_texts(texts, prompt=prompt, truncate=True)):
        if not t.truncated:
            out.append((t.ids, None))
            continue
        try:
            tokenizer.encode_texts([text], prompt=prompt, truncate=False)
        except InputTooLongError as e:
            out.append(
                (
                    None,
                    f"over-long: {e.length} tokens, more than the limit of {e.limit} tokens "
                    f"(--truncate cuts it, --max-tokens sets the limit)",
                )
            )
    return out


# One part travels from stage to stage as one row (so Ray Data can never split it): its
# number and sizes as scalars, its rows' values as lists.
_LIST_COLUMNS = {"ids": None, "token_lengths": pa.int32(), "token_values": pa.int32(), "embedding": pa.float32()}


def _unpack(batch: pa.Table) -> list[dict]:
    """Rows of a batch of parts; list columns come back as Arrow arrays (no copies)."""
    columns = {name: batch.column(name) for name in batch.column_names}
    return [
        {name: (col[i].values if name in _LIST_COLUMNS else col[i].as_py()) for name, col in columns.items()}
        for i in range(batch.num_rows)
    ]


def _pack(rows: list[dict], id_type: pa.DataType) -> pa.Table:
    columns = {}
    for name in rows[0]:
        if name in _LIST_COLUMNS:
            type_ = _LIST_COLUMNS[name] or id_type
            arrays = [
                r[name].cast(type_) if isinstance(r[name], pa.Array) else pa.array(r[name], type=type_) for r in rows
            ]
            offsets = pa.array(np.cumsum([0] + [len(a) for a in arrays]), type=pa.int64())
            columns[name] = pa.LargeListArray.from_arrays(offsets, pa.concat_arrays(arrays))
        else:
            columns[name] = pa.array([r[name] for r in rows])
    return pa.table(columns)


def _id_type(plan: Plan) -> pa.DataType:
    return pa.int64() if plan.id_type == "int64" else pa.string()


def read_and_tokenize(
    batch: pa.Table, plan: Plan, model: str, prompt: str, max_input_tokens: int | None, truncate: bool
) -> pa.Table:
    """Part numbers → per part: its good rows' ids and token ids, its bad rows as JSON lines."""
    tokenizer = _tokenizer(model, max_input_tokens)
    out = []
    for part in batch.column("part").to_pylist():
        started = time.perf_counter()
        got = read_part(plan, part)
        ids, lengths, values = [], [], []
        tokenized = tokenize(tokenizer, got.texts, prompt, truncate)
        for id_, (file, row), (token_ids, reason) in zip(got.ids, got.where, tokenized):
            if reason is not None:
                got.bad.append({"id": id_, "file": file, "row": row, "reason": reason})
                continue
            ids.append(id_)
            lengths.append(len(token_ids))
            values.append(np.asarray(token_ids, dtype=np.int32))
        start, stop = plan.part_rows(part)
        out.append(
            {
                "part": part,
                "rows": stop - start,
                "ids": ids,
                "token_lengths": lengths,
                "token_values": np.concatenate(values) if values else np.empty(0, dtype=np.int32),
                "bad": "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in got.bad),
                "read_s": time.perf_counter() - started,
            }
        )
    return _pack(out, _id_type(plan))


# --- stage 2: embed (actor pool: 1 GPU each, or reserved CPUs) ---------------------------


class EmbedParts:
    """One Encoder per actor; embeds a part's token ids with the service's token-budget batching."""

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        max_input_tokens: int | None,
        max_batch_tokens: int | None,
        dimensions: int | None,
        read_kwargs: dict | None = None,
    ):
        import torch

        from ..core.device import dtype_name, resolve_device, use_cpu_threads
        from ..core.encoder import Encoder

        _configure_logging()
        device = resolve_device(device)
        if device.type == "cpu":
            use_cpu_threads(placement.reserved_cpus())
        log.info("encoder actor starting: model=%s device=%s torch_threads=%d", model, device, torch.get_num_threads())
        self.encoder = Encoder.from_pretrained(
            model, device=device, dtype=dtype, max_input_tokens=max_input_tokens, max_batch_tokens=max_batch_tokens
        )
        self.encoder.warm_up()
        self.dtype = dtype_name(self.encoder.dtype)  # reported per part: "auto" may differ between nodes
        self.dimensions = dimensions
        self.read_kwargs = read_kwargs  # set: this actor reads and tokenises its parts itself
        self.ready_at = time.time()  # model loaded: benchmarks time from here, as they time ST's encode

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..core.vectors import truncate_dimensions

        if self.read_kwargs is not None:
            batch = read_and_tokenize(batch, **self.read_kwargs)
        parts = _unpack(batch)
        for part in parts:
            started = time.perf_counter()
            lengths = part.pop("token_lengths").to_numpy()
            values = part.pop("token_values").to_numpy(zero_copy_only=False, writable=True)
            if len(lengths):
                vectors = self.encoder.embed_token_ids(np.split(values, np.cumsum(lengths)[:-1]))
            else:
                vectors = np.empty((0, self.encoder.dimensions), dtype=np.float32)
            part["embedding"] = truncate_dimensions(vectors, self.dimensions).reshape(-1)
            part["token_lengths"] = lengths
            part["embed_s"] = time.perf_counter() - started
            part["ready_at"] = self.ready_at
            part["dtype"] = self.dtype
            log.debug(
                "part %d: %d rows read and tokenised in %.2fs, embedded in %.2fs",
                part["part"],
                len(lengths),
                part["read_s"],
                part["embed_s"],
            )
        return _pack(parts, batch.schema.field("ids").type.value_type)


# --- stage 3: write (CPU tasks) --------------------------------------------------------


def write_parts(batch: pa.Table, out_uri: str, dimensions: int) -> pa.Table:
    """Write each part's bad rows, then its vectors: the file whose presence marks the part done."""
    summary = []
    for part in _unpack(batch):
        if part["bad"]:
            write_atomically(join(out_uri, bad_rows_name(part["part"])), part["bad"].encode())
        table = pa.table(
            {
                "id": part["ids"],
                "embedding": pa.FixedSizeListArray.from_arrays(part["embedding"], dimensions),
                "n_tokens": part["token_lengths"],
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomically(join(out_uri, part_name(part["part"])), sink.getvalue())
        summary.append(
            {
                "part": part["part"],
                "rows": part["rows"],
                "embedded": len(table),
                "bad": part["bad"].count("\n"),
                "tokens": int(part["token_lengths"].to_numpy().sum()),
                "read_s": part["read_s"],
                "embed_s": part["embed_s"],
                "ready_at": part["ready_at"],
                "dtype": part["dtype"],
            }
        )
    return pa.Table.from_pylist(summary)


# --- the job ---------------------------------------------------------------------------


@dataclass
class JobSettings:
    """What decides the vectors and the parts; a resumed job must be given the same."""

    model: str
    prompt: str
    dimensions: int | None
    max_tokens: int
    truncate: bool
    text_column: str
    id_column: str
    format: str | None
    rows_per_part: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Progress:
    """Counts what came back and prints a line now and then (every ``interval`` seconds)."""

    total_rows: int
    rows_before: int
    interval: float = 5.0
    started: float = field(default_factory=time.perf_counter)
    parts: int = 0
    rows: int = 0
    embedded: int = 0
    bad: int = 0
    tokens: int = 0
    first_ready_at: float | None = None  # wall clock when the first encoder actor had its model loaded
    dtypes: set = field(default_factory=set)  # what the encoders ran in (auto may differ between nodes)
    _last: float = 0.0

    def update(self, summary: pa.Table) -> None:
        for row in summary.to_pylist():
            self.parts += 1
            self.rows += row["rows"]
            self.embedded += row["embedded"]
            self.bad += row["bad"]
            self.tokens += row["tokens"]
            self.first_ready_at = min(self.first_ready_at or row["ready_at"], row["ready_at"])
            self.dtypes.add(row["dtype"])
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self.print()

    def print(self) -> None:
        elapsed = time.perf_counter() - self.started
        done = self.rows_before + self.rows
        left = self.total_rows - done
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = f"{_clock(left / rate)}" if rate > 0 and left else "-"
        print(
            f"[corpus] {done:,}/{self.total_rows:,} rows ({100 * done / max(1, self.total_rows):.1f}%) | "
            f"{self.bad:,} bad | {self.tokens:,} tokens | {self.tokens / max(elapsed, 1e-9):,.0f} tokens/s | "
            f"{_clock(elapsed)} elapsed | eta {eta}",
            file=sys.stderr,
            flush=True,
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def default_rows_per_part(rows: int, max_actors: int) -> int:
    """Big parts (fewer files, little per-part overhead), but enough to keep every actor busy."""
    return min(MAX_ROWS_PER_PART, max(MIN_ROWS_PER_PART, -(-rows // (4 * max_actors))))


def _resolve_model(name: str | None) -> str:
    name = name or environment.model()
    return os.path.abspath(os.path.expanduser(name)) if os.path.isdir(os.path.expanduser(name)) else name


def _prompt(tokenizer, instruction: str | None, input_type: str | None) -> str:
    """The service's prompt for these request fields (the same public function the API uses)."""
    return tokenizer.request_prompt(instruction, input_type)


def _init_ray(address: str | None, object_store_memory: int | None) -> bool:
    """Connect to (or start) Ray; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"object_store_memory": object_store_memory, "include_dashboard": False}
    ray.init(address=address, **kwargs)
    return not address


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the summary (also written to OUTPUT/_summary.json)."""
    import ray

    from ..core.checkpoint import read_model_files
    from ..core.tokenization import TextTokenizer

    wall_started = time.perf_counter()
    model = _resolve_model(args.model)
    files = read_model_files(model)  # fails here, with the way out, when the model can't be found
    if args.dimensions is not None and not 1 <= args.dimensions <= files.hidden_size:
        raise CorpusError(f"--dimensions must be between 1 and {files.hidden_size}, got {args.dimensions}")
    tokenizer = TextTokenizer(files, args.max_tokens)
    settings = JobSettings(
        model=model,
        prompt=_prompt(tokenizer, args.instruction, args.input_type),
        dimensions=args.dimensions,
        max_tokens=tokenizer.max_input_tokens,
        truncate=args.truncate,
        text_column=args.text_column,
        id_column=args.id_column or "id",
        format=args.format,
        rows_per_part=args.rows_per_part or MAX_ROWS_PER_PART,  # without --rows-per-part: decided when planning
    )
    out_uri = absolute_uri(args.output)
    inputs = list_inputs(absolute_uri(args.input), args.format)

    started_ray = _init_ray(args.address, args.object_store_memory)
    try:
        manifest = read_json(join(out_uri, MANIFEST))
        if manifest is not None:
            plan = Plan.from_json(manifest)
            if args.rows_per_part is None:  # not given: whatever the job was started with
                settings.rows_per_part = plan.settings.get("rows_per_part", settings.rows_per_part)
            differ = {k: (plan.settings.get(k), v) for k, v in settings.as_dict().items() if plan.settings.get(k) != v}
            if differ:
                raise CorpusError(
                    f"{args.output} was started with other settings: "
                    + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differ.items())
                    + ". Resume with the same arguments, or write to a new --output"
                )
            check_unchanged(plan, inputs)
            log.info("resuming %s: %d rows in %d parts", args.output, plan.rows, plan.parts)
        else:
            cols = Columns(text=settings.text_column, id=settings.id_column)
            scan = ray.remote(num_cpus=1)(scan_file)
            plan_started = time.perf_counter()
            scans = ray.get([scan.remote(f, cols) for f in inputs])
            if args.rows_per_part is None:
                max_actors = placement.corpus_actor_resources(
                    args.device, args.tokenize_in, args.cpus_per_actor, args.max_actors
                )[1]
                settings.rows_per_part = default_rows_per_part(sum(s.rows for s in scans), max_actors)
            plan = make_plan(inputs, scans, settings.as_dict(), settings.rows_per_part, args.id_column is not None)
            write_json(join(out_uri, MANIFEST), plan.to_json())
            log.info(
                "planned %d input file(s), %d rows, %d parts of <= %d rows, ids from %s (%s), in %.1fs",
                len(plan.files),
                plan.rows,
                plan.parts,
                plan.rows_per_part,
                plan.id_source,
                plan.id_type,
                time.perf_counter() - plan_started,
            )
        prepare_output(out_uri)
        done = done_parts(out_uri)
        pending = [p for p in range(plan.parts) if p not in done]
        rows_before = sum(b - a for a, b in map(plan.part_rows, sorted(done)))
        progress = Progress(plan.rows, rows_before, interval=args.progress_interval)
        if done:
            log.info(
                "%d of %d parts already done (%d rows): embedding the %d missing",
                len(done),
                plan.parts,
                rows_before,
                len(pending),
            )

        pipeline_s = steady_s = 0.0
        if pending:
            pipeline_started = time.perf_counter()
            dataset = _pipeline(plan, pending, settings, args, out_uri, settings.dimensions or files.hidden_size)
            for summary in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.update(summary)
            pipeline_s = time.perf_counter() - pipeline_started
            steady_s = time.time() - progress.first_ready_at
            progress.print()
        good, bad = output_counts(out_uri)
        incomplete = [
            p
            for p in range(plan.parts)
            if p not in good or good[p] + bad.get(p, 0) != plan.part_rows(p)[1] - plan.part_rows(p)[0]
        ]
    finally:
        if started_ray:
            ray.shutdown()

    wall_s = time.perf_counter() - wall_started
    summary = {
        "output": args.output,
        "complete": not incomplete,
        "incomplete_parts": incomplete[:20],
        "corpus_rows": plan.rows,
        "corpus_embedded": sum(good.values()),
        "corpus_bad": sum(bad.values()),
        "parts": plan.parts,
        "parts_done_before": len(done),
        "parts_this_run": progress.parts,
        "rows": progress.rows,
        "embedded": progress.embedded,
        "bad": progress.bad,
        "tokens": progress.tokens,
        "pipeline_s": round(pipeline_s, 3),
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(progress.tokens / pipeline_s, 1) if pipeline_s else 0.0,
        "tokens_per_s_wall": round(progress.tokens / wall_s, 1) if wall_s else 0.0,
        "steady_s": round(steady_s, 3),
        "tokens_per_s_steady": round(progress.tokens / steady_s, 1) if steady_s else 0.0,
        "dimensions": settings.dimensions or files.hidden_size,
        "id_source": plan.id_source,
        "id_type": plan.id_type,
        "dtypes": sorted(progress.dtypes),
    }
    if len(progress.dtypes) > 1:
        log.warning(
            "encoders ran in several dtypes (%s): nodes differ in bf16 support; pin --dtype for vectors computed alike",
            ", ".join(sorted(progress.dtypes)),
        )
    write_json(join(out_uri, SUMMARY), summary)
    _print_summary(summary, out_uri)
    return summary


def _pipeline(
    plan: Plan, pending: list[int], settings: JobSettings, args: argparse.Namespace, out_uri: str, dimensions: int
):
    """The Ray Data dataset whose rows are the summaries of the parts it has written.

    GPU clusters: read + tokenise in CPU tasks, feeding one encoder actor per GPU.
    CPU-only clusters: the encoder actors read and tokenise their parts themselves
    (a few % of the model's work), so every CPU can run the model. ``--tokenize-in``
    chooses otherwise.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = args.ray_progress if args.ray_progress is not None else sys.stderr.isatty()
    actor_resources, max_actors, tokenize_in_actors = placement.corpus_actor_resources(
        args.device, args.tokenize_in, args.cpus_per_actor, args.max_actors
    )
    log.info(
        "encoder actors: %s each, pool of 1..%d; tokenising in %s",
        actor_resources,
        max_actors,
        "the actors" if tokenize_in_actors else "CPU tasks",
    )
    read_kwargs = dict(
        plan=plan,
        model=settings.model,
        prompt=settings.prompt,
        max_input_tokens=settings.max_tokens,
        truncate=settings.truncate,
    )

    ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
    if not tokenize_in_actors:
        ds = ds.map_batches(read_and_tokenize, batch_size=1, batch_format="pyarrow", num_cpus=1, fn_kwargs=read_kwargs)
    ds = ds.map_batches(
        EmbedParts,
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=max_actors, initial_size=min(max_actors, len(pending))),
        fn_constructor_kwargs=dict(
            model=settings.model,
            device=args.device,
            dtype=args.dtype,
            max_input_tokens=settings.max_tokens,
            max_batch_tokens=args.batch_tokens,
            dimensions=settings.dimensions,
            read_kwargs=read_kwargs if tokenize_in_actors else None,
        ),
        **actor_resources,
    )
    # Writing is light next to the model, like the service's ingress: it reserves no CPU.
    return ds.map_batches(
        write_parts,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs=dict(out_uri=out_uri, dimensions=dimensions),
    )


def _print_summary(s: dict, out_uri: str) -> None:
    state = "complete" if s["complete"] else f"INCOMPLETE ({len(s['incomplete_parts'])}+ parts missing)"
    bad_note = f" (reasons in {join(out_uri, BAD_ROWS_DIR)}/)" if s["corpus_bad"] else ""
    print(
        f"corpus job {state}: {out_uri}\n"
        f"  this run      {s['rows']:,} rows in {s['parts_this_run']:,} parts "
        f"({s['parts_done_before']:,} of {s['parts']:,} parts were already done)\n"
        f"  embedded      {s['embedded']:,} rows, {s['tokens']:,} tokens, in {', '.join(s['dtypes']) or '-'}\n"
        f"  rows skipped  {s['bad']:,}{bad_note}\n"
        f"  tokens/s      {s['tokens_per_s']:,.0f} over the pipeline ({s['pipeline_s']:.1f} s, encoder start "
        f"included); {s['tokens_per_s_steady']:,.0f} once the encoders were loaded ({s['steady_s']:.1f} s)\n"
        f"  wall time     {s['wall_s']:.1f} s ({s['tokens_per_s_wall']:,.0f} tokens/s)\n"
        f"  corpus        {s['corpus_rows']:,} rows: {s['corpus_embedded']:,} embedded, {s['corpus_bad']:,} bad",
        flush=True,
    )


# --- benchmark -------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict:
    """Run the job, then sentence-transformers' ``encode`` on the same texts and model directory."""
    import torch

    own_output = args.output is None
    if own_output:
        args.output = tempfile.mkdtemp(prefix="kalm-corpus-bench-")
    elif read_json(join(absolute_uri(args.output), MANIFEST)) is not None:
        raise CorpusError(f"--benchmark needs a fresh --output; {args.output} already holds a job")
    try:
        job = run(args)
        plan = Plan.from_json(read_json(join(absolute_uri(args.output), MANIFEST)))
        texts = [t for p in range(plan.parts) for t in read_part(plan, p).texts]
        good = pq.read_table(absolute_uri(args.output), columns=["embedding"]) if "://" not in args.output else None
    finally:
        if own_output:
            shutil.rmtree(args.output, ignore_errors=True)

    from sentence_transformers import SentenceTransformer

    from ..core.device import dtype_name, parse_dtype, resolve_device

    device = str(resolve_device(args.device))
    # the dtype the job's encoders ran in (ST alone would follow config.json)
    dtype = parse_dtype(job["dtypes"][0] if len(job["dtypes"]) == 1 else args.dtype, torch.device(device))
    st = SentenceTransformer(plan.settings["model"], device=device, model_kwargs={"dtype": dtype})
    prompt = plan.settings["prompt"] or None
    st.encode(texts[:64], prompt=prompt, batch_size=args.st_batch_size)  # warm-up
    started = time.perf_counter()
    st_vectors = st.encode(texts, prompt=prompt, batch_size=args.st_batch_size, convert_to_numpy=True)
    st_s = time.perf_counter() - started
    st_tps = job["tokens"] / st_s
    result = {
        "texts": len(texts),
        "tokens": job["tokens"],
        "device": device,
        "dtype": dtype_name(dtype),
        "torch_threads": torch.get_num_threads(),
        "st_s": round(st_s, 3),
        "st_tokens_per_s": round(st_tps, 1),
        "st_batch_size": args.st_batch_size,
        **{
            f"corpus_{k}": job[k]
            for k in ("steady_s", "pipeline_s", "wall_s", "tokens_per_s_steady", "tokens_per_s", "tokens_per_s_wall")
        },
        "ratio": round(job["tokens_per_s_steady"] / st_tps, 3),
        "ratio_pipeline": round(job["tokens_per_s"] / st_tps, 3),
        "ratio_wall": round(job["tokens_per_s_wall"] / st_tps, 3),
    }
    if good is not None and len(good) == len(st_vectors) and plan.settings["dimensions"] is None:
        ours = np.asarray(good.column("embedding").combine_chunks().flatten()).reshape(len(good), -1)
        result["mean_cosine_vs_st"] = round(float(np.mean(np.sum(ours * st_vectors, axis=1))), 4)
    rows = [
        ("corpus job, encoders loaded -> end", job["tokens_per_s_steady"], job["steady_s"], result["ratio"]),
        ("corpus job, whole pipeline", job["tokens_per_s"], job["pipeline_s"], result["ratio_pipeline"]),
        ("corpus job, whole command", job["tokens_per_s_wall"], job["wall_s"], result["ratio_wall"]),
    ]
    print(
        f"benchmark: {len(texts):,} texts, {job['tokens']:,} tokens, same model directory, {device}, "
        f"{result['dtype']} on both sides\n"
        f"  sentence-transformers encode (model loaded)  {st_tps:>10,.0f} tokens/s  {st_s:7.1f} s   "
        f"(batch_size={args.st_batch_size}, {torch.get_num_threads()} torch threads)",
        flush=True,
    )
    for name, tps, seconds, ratio in rows:
        print(f"  {name:<43} {tps:>10,.0f} tokens/s  {seconds:7.1f} s   {ratio:.2f}x", flush=True)
    if "mean_cosine_vs_st" in result:
        print(
            f"  mean cosine(ours, sentence-transformers) = {result['mean_cosine_vs_st']}: sentence-transformers "
            f"loads a KaLM directory as stock (causal) Qwen2 without remote code, so its vectors are not "
            f"KaLM's; only its speed is comparable",
            flush=True,
        )
    return result


# --- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m serve_app.corpus",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="a file, a folder or a glob; local or a URI (s3://, gs://, ...)")
    p.add_argument("--output", help="directory (local or URI) for part-*.parquet; required unless --benchmark")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from each file's extension)")
    p.add_argument("--text-column", default="text", help="column / JSON field holding the text (default: text)")
    p.add_argument(
        "--id-column",
        default=None,
        help="column / JSON field holding the id (default: id; the row number when inputs have none)",
    )
    p.add_argument("--model", help="hub id or local directory (default: $KALM_MODEL, else the service's default)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="task instruction: 'Instruct: {instruction} \\n Query: {text}'")
    prompt.add_argument(
        "--input-type",
        choices=["query", "document"],
        help="query: the model's query prompt; document: no prompt (as the HTTP API)",
    )
    p.add_argument("--dimensions", type=int, help="Matryoshka: keep the first k dims, then L2-normalise")
    p.add_argument("--max-tokens", type=int, help="most tokens per text (default and ceiling: the model's limit)")
    p.add_argument("--truncate", action="store_true", help="cut over-long texts instead of listing them as bad rows")
    p.add_argument(
        "--rows-per-part",
        type=int,
        help=f"rows per output file, the unit of resumption (default: 4 parts per encoder actor, "
        f"{MIN_ROWS_PER_PART:,} to {MAX_ROWS_PER_PART:,} rows; a resumed job keeps its own)",
    )
    run_ = p.add_argument_group("where it runs")
    run_.add_argument("--address", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    run_.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: one GPU per encoder actor where the cluster has GPUs, else CPUs",
    )
    run_.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA and on CPUs with bf16 in hardware, else "
        "fp32; $KALM_DTYPE overrides), float32, bfloat16, float16",
    )
    run_.add_argument(
        "--batch-tokens",
        type=int,
        help="token budget of one forward pass (default as the service: 16384 CUDA, 512 CPU)",
    )
    run_.add_argument("--max-actors", type=int, help="most encoder actors (default: the cluster's GPUs, or CPUs)")
    run_.add_argument(
        "--cpus-per-actor",
        type=int,
        help="CPU-only clusters: CPUs (torch threads) per encoder actor (default: node CPUs / 8, 1..8)",
    )
    run_.add_argument(
        "--tokenize-in",
        choices=["auto", "tasks", "actors"],
        default="auto",
        help="where texts are read and tokenised: CPU tasks in front of the encoder actors, or the "
        "actors themselves (auto: tasks on GPU clusters, actors on CPU-only ones)",
    )
    run_.add_argument("--object-store-memory", type=int, help="bytes, when this command starts a local Ray")
    run_.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    run_.add_argument(
        "--ray-progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Ray Data's own progress bars (default: when stderr is a terminal)",
    )
    bench = p.add_argument_group("benchmark")
    bench.add_argument(
        "--benchmark",
        action="store_true",
        help="after the job, run sentence-transformers' encode on the same texts and compare tokens/s",
    )
    bench.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers batch size (default 32)")
    args = p.parse_args(argv)
    if args.output is None and not args.benchmark:
        p.error("--output is required")
    if args.instruction is not None and not args.instruction.strip():
        p.error("--instruction must not be empty")
    for name in ("dimensions", "max_tokens", "rows_per_part", "batch_tokens", "max_actors", "cpus_per_actor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging()
    try:
        if args.benchmark:
            benchmark(args)
            return 0
        return 0 if run(args)["complete"] else 1
    except (CorpusError, KalmServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
