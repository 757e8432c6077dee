"""The job's Ray Data stages: read + tokenise, embed (``EmbedParts`` actors), write.

One part travels from stage to stage as one row (so Ray Data can never split it): its
number and sizes as scalars, its rows' values as lists::

    parts (part numbers, the ones without output yet)
      ─► read + tokenise          CPU tasks on GPU clusters; inside the actors on CPU-only ones
                                  (io.read_part, the Encoder's TextTokenizer)
      ─► EmbedParts actors        1 GPU each, or reserved CPUs; autoscaling pool
                                  (Encoder.embed_token_ids: the service's token-budget batching)
      ─► write                    0-CPU tasks   part-XXXXXXXX.parquet, atomically, with a
                                  column per embedding type (core/quantization.py)
      ─► one summary row per part back to the driver (progress, summary)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import environment, placement
from ..core.quantization import CalibrationRanges, quantize
from ..errors import InputTooLongError
from .files import join
from .options import CorpusOptions, JobSettings
from .output import bad_rows_name, part_name, write_atomically
from .parts import read_part
from .plan import Plan

if TYPE_CHECKING:
    import ray.data

    from ..core.tokenization import TextTokenizer

log = logging.getLogger("serve_app.corpus")


def configure_logging(verbose: bool) -> None:
    """The package's logs on stderr, in the driver and in the actors: INFO with ``verbose``, else warnings only."""
    logger = logging.getLogger("serve_app")
    logger.setLevel(logging.DEBUG if environment.corpus_debug() else logging.INFO if verbose else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


@dataclass(frozen=True)
class Actors:
    """The encoder actor pool: Ray resources of one actor, the most actors, and whether they tokenise."""

    num_cpus: int
    num_gpus: float
    max_actors: int
    tokenize_in_actors: bool

    @classmethod
    def for_cluster(cls, options: CorpusOptions) -> Actors:
        """From ``serve_app.placement``, on the cluster Ray is connected to."""
        resources, max_actors, tokenize_in_actors = placement.corpus_actor_resources(
            options.device, options.tokenize_in, options.cpus_per_actor, options.max_actors, options.gpus_per_actor
        )
        return cls(resources.get("num_cpus", 0), resources.get("num_gpus", 0), max_actors, tokenize_in_actors)

    def describe(self, actors: int) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus} CPU"
        where = "they tokenise too" if self.tokenize_in_actors else "tokenising in CPU tasks"
        return f"{actors} encoder actor{'s' if actors != 1 else ''} ({each} each; {where})"


# --- stage 1: read + tokenise (CPU tasks, or inside the actors) -------------------------

#: ``(token ids, None)`` for a text, or ``(None, reason)`` for one over the token limit.
Tokenized = tuple[list[int], None] | tuple[None, str]


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str, max_input_tokens: int | None) -> TextTokenizer:
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    from ..core.checkpoint import read_model_files
    from ..core.tokenization import TextTokenizer

    # tokenizers: no more threads than Ray reserved for this task or actor
    os.environ.setdefault("RAYON_NUM_THREADS", str(placement.reserved_cpus()))
    return TextTokenizer(read_model_files(model), max_input_tokens)


def tokenize(tokenizer: TextTokenizer, texts: list[str], prompt: str, truncate: bool) -> list[Tokenized]:
    """Token ids per text, or the reason it is a bad row (found while tokenising: nothing is tokenised again)."""
    out: list[Tokenized] = []
    for t in tokenizer.encode_within_limits(texts, prompt, truncate, keep_too_long=True):
        if isinstance(t, InputTooLongError):
            measured = f"{t.length} tokens" if isinstance(t.length, int) else t.length
            reason = (
                f"over-long: {measured}, more than the limit of {t.limit} tokens "
                f"(--truncate cuts it, --max-tokens sets the limit)"
            )
            out.append((None, reason))
        else:
            out.append((t.ids, None))
    return out


_LIST_COLUMNS = {"ids": None, "token_lengths": pa.int32(), "token_values": pa.int32(), "embedding": pa.float32()}


def _unpack(batch: pa.Table) -> list[dict[str, Any]]:
    """Rows of a batch of parts; list columns come back as Arrow arrays (no copies)."""
    columns = {name: batch.column(name) for name in batch.column_names}
    return [
        {name: (col[i].values if name in _LIST_COLUMNS else col[i].as_py()) for name, col in columns.items()}
        for i in range(batch.num_rows)
    ]


def _pack(rows: list[dict[str, Any]], id_type: pa.DataType) -> pa.Table:
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
            if token_ids is None:
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
    return _pack(out, pa.int64() if plan.id_type == "int64" else pa.string())


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
        verbose: bool,
        read_kwargs: dict[str, Any] | None = None,
    ):
        import torch

        from ..core.device import dtype_name, resolve_device, use_cpu_threads
        from ..core.encoder import Encoder

        configure_logging(verbose)
        on = resolve_device(device)
        if on.type == "cpu":
            use_cpu_threads(placement.reserved_cpus())
        log.info("encoder actor starting: model=%s device=%s torch_threads=%d", model, on, torch.get_num_threads())
        self.encoder = Encoder.from_pretrained(
            model, device=on, dtype=dtype, max_input_tokens=max_input_tokens, max_batch_tokens=max_batch_tokens
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
            values = part.pop("token_values").to_numpy(zero_copy_only=False)
            if len(lengths):
                token_ids = [ids.tolist() for ids in np.split(values, np.cumsum(lengths)[:-1])]
                vectors = self.encoder.embed_token_ids(token_ids)
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


# --- stage 3: write (0-CPU tasks) --------------------------------------------------------


def write_parts(
    batch: pa.Table,
    out_uri: str,
    dimensions: int,
    embedding_types: list[str],
    calibration: CalibrationRanges | None,
) -> pa.Table:
    """Write each part's bad rows, then its vectors: the file whose presence marks the part done.

    ``embedding`` holds the float32 vectors; each other type its own ``embedding_<type>`` column.
    """
    summary = []
    for part in _unpack(batch):
        if part["bad"]:
            write_atomically(join(out_uri, bad_rows_name(part["part"])), part["bad"].encode())
        columns = {"id": part["ids"], "embedding": pa.FixedSizeListArray.from_arrays(part["embedding"], dimensions)}
        vectors = part["embedding"].to_numpy(zero_copy_only=False).reshape(-1, dimensions)
        for t in embedding_types[1:]:  # float first, as the ``embedding`` column
            typed = quantize(vectors, t, calibration)
            columns[f"embedding_{t}"] = pa.FixedSizeListArray.from_arrays(pa.array(typed.reshape(-1)), typed.shape[1])
        table = pa.table({**columns, "n_tokens": part["token_lengths"]})
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


# --- the dataset ------------------------------------------------------------------------


def build(
    plan: Plan,
    pending: list[int],
    settings: JobSettings,
    options: CorpusOptions,
    actors: Actors,
    out_uri: str,
    dimensions: int,
    calibration: CalibrationRanges | None = None,
) -> ray.data.Dataset:
    """The Ray Data dataset whose rows are the summaries of the parts it has written.

    GPU clusters: read + tokenise in CPU tasks, feeding one encoder actor per GPU.
    CPU-only clusters: the encoder actors read and tokenise their parts themselves
    (a few % of the model's work), so every CPU can run the model.
    """
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = options.ray_progress if options.ray_progress is not None else sys.stderr.isatty()
    read_kwargs = dict(
        plan=plan,
        model=settings.model,
        prompt=settings.prompt,
        max_input_tokens=settings.max_tokens,
        truncate=settings.truncate,
    )
    ds: ray.data.Dataset = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
    if not actors.tokenize_in_actors:
        ds = ds.map_batches(
            read_and_tokenize,  # type: ignore[arg-type]  # Ray Data's UDF type has no room for fn_kwargs
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=1,
            fn_kwargs=read_kwargs,
        )
    ds = ds.map_batches(
        EmbedParts,
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            min_size=1, max_size=actors.max_actors, initial_size=min(actors.max_actors, len(pending))
        ),
        fn_constructor_kwargs=dict(
            model=settings.model,
            device=options.device,
            dtype=options.dtype,
            max_input_tokens=settings.max_tokens,
            max_batch_tokens=options.batch_tokens,
            dimensions=settings.dimensions,
            verbose=options.verbose,
            read_kwargs=read_kwargs if actors.tokenize_in_actors else None,
        ),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )
    # Writing is light next to the model, like the service's ingress: it reserves no CPU.
    return ds.map_batches(
        write_parts,  # type: ignore[arg-type]  # as read_and_tokenize
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs=dict(
            out_uri=out_uri,
            dimensions=dimensions,
            embedding_types=settings.embedding_types,
            calibration=calibration,
        ),
    )
