"""What the job tells its user: status lines on stderr from its first second, and the summary at the end.

::

    [corpus] 0:00:00 starting a local Ray
    [corpus] 0:00:33 planning: counting the rows of 1 input file
    [corpus] 0:00:36 loading the model on 2 encoder actors (1 CPU each)
    [corpus] 0:01:20 250/2,000 rows (12.5%) | 0 bad | 4,410 tokens | 101 tokens/s | eta 0:05:06
    [corpus] 0:01:32 2,000/2,000 rows (100.0%) | 0 bad | 35,401 tokens | 630 tokens/s | eta -
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from .files import join
from .output import BAD_ROWS_DIR

PREFIX = "[corpus]"


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    """Status lines: one when a stage starts (once: a stage's line said again reads as a stage
    restarting), one per finished part (at most every ``interval`` s), the rows line again every
    ``interval`` s while embedding and nothing else is printed, and exactly one final line.

    Use it as a context manager: the repeating runs in a thread while the job waits on Ray.
    """

    interval: float = 5.0
    started: float = field(default_factory=time.perf_counter)
    # this run's parts, as their summary rows come back from the pipeline
    total_rows: int = 0
    rows_before: int = 0
    parts: int = 0
    rows: int = 0
    embedded: int = 0
    bad: int = 0
    tokens: int = 0
    first_ready_at: float | None = None  # wall clock when the first encoder actor had its model loaded
    dtypes: set[str] = field(default_factory=set)  # what the encoders ran in (auto may differ between nodes)
    _embedding_since: float | None = field(default=None, init=False)
    _finished: bool = field(default=False, init=False)
    _printed_at: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _repeater: threading.Thread | None = field(default=None, init=False)

    def __enter__(self) -> Progress:
        self._repeater = threading.Thread(target=self._repeat, name="corpus-progress", daemon=True)
        self._repeater.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._repeater is not None:
            self._repeater.join()

    def stage(self, what: str) -> None:
        """A new stage starts: say so, once."""
        with self._lock:
            self._print(what)

    def note(self, what: str) -> None:
        """A line said once; the current stage stays what it was."""
        with self._lock:
            self._print(f"note: {what}")

    def start_embedding(self, total_rows: int, rows_before: int) -> None:
        """From here on the status is the rows done (``rows_before`` of them by earlier runs)."""
        with self._lock:
            self.total_rows, self.rows_before = total_rows, rows_before
            self._embedding_since = time.perf_counter()

    def update(self, summary: pa.Table) -> None:
        """Count the parts of one pipeline summary batch; the line for the last part waits for :meth:`finish`."""
        with self._lock:
            for row in summary.to_pylist():
                self.parts += 1
                self.rows += row["rows"]
                self.embedded += row["embedded"]
                self.bad += row["bad"]
                self.tokens += row["tokens"]
                self.first_ready_at = min(self.first_ready_at or row["ready_at"], row["ready_at"])
                self.dtypes.add(row["dtype"])
            first_part = self.parts == len(summary)
            if self._done() < self.total_rows and (
                first_part or time.perf_counter() - self._printed_at >= self.interval
            ):
                self._print(self._rows_line())

    def finish(self) -> None:
        """The final line (once), however recently a line was printed."""
        with self._lock:
            if not self._finished:
                self._finished = True
                self._print(self._rows_line())

    def _done(self) -> int:
        return self.rows_before + self.rows

    def _rows_line(self) -> str:
        since = time.perf_counter() - (self._embedding_since or self.started)
        done, left = self._done(), self.total_rows - self._done()
        rate = self.rows / since if since > 0 else 0.0
        eta = clock(left / rate) if rate > 0 and left else "-"
        return (
            f"{done:,}/{self.total_rows:,} rows ({100 * done / max(1, self.total_rows):.1f}%) | {self.bad:,} bad | "
            f"{self.tokens:,} tokens | {self.tokens / max(since, 1e-9):,.0f} tokens/s | eta {eta}"
        )

    def _print(self, what: str) -> None:
        self._printed_at = time.perf_counter()
        print(f"{PREFIX} {clock(self._printed_at - self.started)} {what}", file=sys.stderr, flush=True)

    def _repeat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            with self._lock:
                if self._finished or self.parts == 0 or time.perf_counter() - self._printed_at < self.interval:
                    continue
                if self._done() < self.total_rows:  # the 100 % line is finish()'s alone
                    self._print(self._rows_line())


@dataclass
class CorpusSummary:
    """What one run of the job did, and the state of its output folder (also in ``OUTPUT/_summary.json``)."""

    output: str
    #: Every part of the corpus has its file, and each file's rows plus its bad rows are the part's rows.
    complete: bool
    incomplete_parts: list[int]  # the first 20
    # the whole corpus, this run and earlier ones
    corpus_rows: int
    corpus_embedded: int
    corpus_bad: int
    parts: int
    parts_done_before: int
    # this run
    parts_this_run: int
    rows: int
    embedded: int
    bad: int
    tokens: int
    pipeline_s: float  # the Ray Data pipeline, encoder actors' start included
    wall_s: float  # the whole call, Ray start and planning included
    tokens_per_s: float
    tokens_per_s_wall: float
    steady_s: float  # from the first encoder actor's model load to the end
    tokens_per_s_steady: float
    dimensions: int
    embedding_types: list[str]  # one column each: embedding (float32), embedding_<type>
    bytes_per_row: dict[str, int]  # the vector columns' bytes per row, by type (no index, no Parquet overhead)
    id_source: str  # "column" or "row_number"
    id_type: str  # "int64" or "string"
    dtypes: list[str]  # what the encoders ran in

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def bytes_report(self) -> str:
        """The vector columns' bytes per row: ``float 256 B, ubinary 8 B (64 dims)``."""
        sizes = ", ".join(f"{t} {b:,} B" for t, b in self.bytes_per_row.items())
        return f"{sizes} ({self.dimensions} dims)"

    def report(self) -> str:
        """The lines the command prints at the end."""
        state = "complete" if self.complete else f"INCOMPLETE ({len(self.incomplete_parts)}+ parts missing)"
        bad_note = f" (reasons in {join(self.output, BAD_ROWS_DIR)}/)" if self.corpus_bad else ""
        return (
            f"corpus job {state}: {self.output}\n"
            f"  this run      {self.rows:,} rows in {self.parts_this_run:,} parts "
            f"({self.parts_done_before:,} of {self.parts:,} parts were already done)\n"
            f"  embedded      {self.embedded:,} rows, {self.tokens:,} tokens, in {', '.join(self.dtypes) or '-'}\n"
            f"  rows skipped  {self.bad:,}{bad_note}\n"
            f"  tokens/s      {self.tokens_per_s:,.0f} over the pipeline ({self.pipeline_s:.1f} s, encoder start "
            f"included); {self.tokens_per_s_steady:,.0f} once the encoders were loaded ({self.steady_s:.1f} s)\n"
            f"  wall time     {self.wall_s:.1f} s ({self.tokens_per_s_wall:,.0f} tokens/s)\n"
            f"  bytes/row     {self.bytes_report()}\n"
            f"  corpus        {self.corpus_rows:,} rows: {self.corpus_embedded:,} embedded, {self.corpus_bad:,} bad"
        )
