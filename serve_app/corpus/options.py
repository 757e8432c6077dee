"""What a corpus job is asked to do (:class:`CorpusOptions`), and the part of it that fixes the vectors.

Light on purpose (no Ray, no pyarrow): the command line and notebooks build these first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..core.quantization import EMBEDDING_TYPES
from ..errors import CorpusError
from .formats import FORMATS

#: Rows per part: at most this many, at least MIN_ROWS_PER_PART, else enough parts for 4 per encoder actor.
MAX_ROWS_PER_PART = 10_000
MIN_ROWS_PER_PART = 100


@dataclass(frozen=True)
class CorpusOptions:
    """One corpus job: ``embed_corpus(CorpusOptions(input="docs/", output="vectors/"))``.

    Every field but ``input`` and ``output`` has the default the command line has; the
    command line's ``--help`` describes each with its flag (``text_column`` is ``--text-column``).
    """

    #: A file, a folder or a glob (``*``, ``?``, ``[..]``, ``**``); local or a URI (s3://, gs://, ...).
    input: str
    #: The folder (local or URI) for ``part-*.parquet``, ``_bad_rows/``, ``_corpus.json``, ``_summary.json``.
    output: str
    #: Input format; None: from each file's extension.
    format: str | None = None
    #: Column / JSON field holding the text.
    text_column: str = "text"
    #: Column / JSON field holding the id; None: ``id``, and the row number where inputs have none.
    id_column: str | None = None
    #: Hub id or local directory; None: ``$KALM_MODEL``, else the service's default.
    model: str | None = None
    #: Task instruction (``Instruct: {instruction} \n Query: {text}``), as the HTTP API's ``instruction``.
    instruction: str | None = None
    #: As the HTTP API's ``input_type``: the model's query prompt, or none for documents.
    input_type: Literal["query", "document"] | None = None
    #: Matryoshka: keep the first k dimensions, then L2-normalise; None: the model's size.
    dimensions: int | None = None
    #: Types written, one column each (core/quantization.py): ``embedding`` (float32) always, and
    #: ``embedding_<type>`` for each other; None: ``("float",)``, or what a resumed job started with.
    embedding_types: tuple[str, ...] | None = None
    #: Rows embedded to calibrate int8 / uint8 (per-dimension ranges, ``_calibration.json``), spread over the corpus.
    calibration_rows: int = 1000
    #: Most tokens per text; None: the model's limit (also the ceiling).
    max_tokens: int | None = None
    #: Cut over-long texts instead of listing them as bad rows.
    truncate: bool = False
    #: Rows per output file, the unit of resumption; None: 4 parts per encoder actor, within
    #: MIN_ROWS_PER_PART..MAX_ROWS_PER_PART (a resumed job keeps its own).
    rows_per_part: int | None = None
    #: Ray cluster to use; None: ``$RAY_ADDRESS``, else a local Ray this job starts and stops.
    address: str | None = None
    #: auto: one GPU per encoder actor where the cluster has GPUs, else CPUs.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: auto (bf16 on CUDA and on CPUs with bf16 in hardware, else float32; ``$KALM_DTYPE`` overrides),
    #: float32, bfloat16, float16.
    dtype: str = "auto"
    #: Token budget of one forward pass; None: as the service (16384 on CUDA, 512 on CPU).
    batch_tokens: int | None = None
    #: Most encoder actors; None: the cluster's GPUs, or as many as its CPUs fit.
    max_actors: int | None = None
    #: CPU-only clusters: CPUs (torch threads) per encoder actor; None: node CPUs / 8, 1..8.
    cpus_per_actor: int | None = None
    #: GPU clusters: GPUs per encoder actor; a fraction (0.5) puts several actors, each with its own
    #: copy of the model, on one GPU, so one's host work overlaps another's GPU work.
    gpus_per_actor: float = 1.0
    #: Where texts are read and tokenised: CPU tasks in front of the encoder actors, or the actors
    #: themselves; auto: tasks on GPU clusters, actors on CPU-only ones.
    tokenize_in: Literal["auto", "tasks", "actors"] = "auto"
    #: Bytes of object store, when this job starts a local Ray; None: Ray's default.
    object_store_memory: int | None = None
    #: Seconds between status lines while nothing else is printed.
    progress_interval: float = 5.0
    #: Ray Data's own progress bars; None: when stderr is a terminal.
    ray_progress: bool | None = None
    #: Ray's own logs and warnings, and the job's INFO logs, on stderr; else only the job's status lines.
    verbose: bool = False

    def check(self) -> None:
        """Raise :class:`CorpusError` naming the first option that cannot work."""
        for name, allowed in (
            ("format", (None, *FORMATS)),
            ("input_type", (None, "query", "document")),
            ("device", ("auto", "cpu", "cuda")),
            ("tokenize_in", ("auto", "tasks", "actors")),
        ):
            if getattr(self, name) not in allowed:
                raise CorpusError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        for t in self.embedding_types or ():
            if t not in EMBEDDING_TYPES:
                raise CorpusError(f"embedding types are {', '.join(EMBEDDING_TYPES)}, got {t!r}")
        if self.instruction is not None and not self.instruction.strip():
            raise CorpusError("instruction must not be empty")
        if self.instruction is not None and self.input_type is not None:
            raise CorpusError("give an instruction or an input_type, not both")
        for name in (
            "dimensions",
            "max_tokens",
            "rows_per_part",
            "batch_tokens",
            "max_actors",
            "cpus_per_actor",
            "calibration_rows",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CorpusError(f"{name} must be at least 1, got {value}")
        if not 0 < self.gpus_per_actor <= 1:
            raise CorpusError(f"gpus_per_actor must be above 0 and at most 1, got {self.gpus_per_actor}")
        if self.progress_interval <= 0:
            raise CorpusError(f"progress_interval must be above 0, got {self.progress_interval}")


@dataclass
class JobSettings:
    """What decides the vectors and the parts: stored in ``_corpus.json``; a resumed job must be given the same."""

    model: str
    prompt: str
    dimensions: int | None
    max_tokens: int
    truncate: bool
    text_column: str
    id_column: str
    format: str | None
    rows_per_part: int
    #: float first, then the others in the order asked, each once
    embedding_types: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
