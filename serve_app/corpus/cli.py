"""Embed a whole corpus offline with Ray Data: the service's exact vectors, every GPU, resumable.

    python -m serve_app.corpus --input docs/ --output vectors/ [--input-type document]
    python -m serve_app.corpus --input 's3://bucket/corpus/*.parquet' --output s3://bucket/vectors/
    python -m serve_app.corpus --input docs.jsonl --benchmark      # tokens/s against sentence-transformers

A thin shell over ``embed_corpus(CorpusOptions(...))``: flags are the options' fields
(``--text-column`` is ``text_column``), and a flag not given keeps the option's default.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import replace

from ..errors import KalmServeError
from .formats import FORMATS
from .job import embed_corpus
from .options import MAX_ROWS_PER_PART, MIN_ROWS_PER_PART, CorpusOptions
from .pipeline import configure_logging

#: A line of Ray's C++ core in this process: ``[2026-11-30 10:14:00,613 E 14316 14316] core_worker.cc:2465: ...``.
RAY_CORE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
#: Ray core lines kept to show after a failure.
HELD_LINES = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags given (those not given are absent: the options' defaults apply)."""
    p = argparse.ArgumentParser(
        prog="python -m serve_app.corpus",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--input", required=True, help="a file, a folder or a glob; local or a URI (s3://, gs://, ...)")
    p.add_argument("--output", help="directory (local or URI) for part-*.parquet; required unless --benchmark")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from each file's extension)")
    p.add_argument("--text-column", help="column / JSON field holding the text (default: text)")
    p.add_argument(
        "--id-column", help="column / JSON field holding the id (default: id; the row number when inputs have none)"
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
    p.add_argument(
        "--embedding-types",
        type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
        help="comma-separated, of float, int8, uint8, binary, ubinary: one column each (embedding: float32, "
        "always; embedding_<type> for the others); int8/uint8 calibrate on --calibration-rows rows first and "
        "write _calibration.json (default: float; a resumed job keeps its own)",
    )
    p.add_argument(
        "--calibration-rows", type=int, help="rows embedded to calibrate int8/uint8, spread over the corpus (1000)"
    )
    p.add_argument("--max-tokens", type=int, help="most tokens per text (default and ceiling: the model's limit)")
    p.add_argument("--truncate", action="store_true", help="cut over-long texts instead of listing them as bad rows")
    p.add_argument(
        "--rows-per-part",
        type=int,
        help=f"rows per output file, the unit of resumption (default: 4 parts per encoder actor, "
        f"{MIN_ROWS_PER_PART:,} to {MAX_ROWS_PER_PART:,} rows; a resumed job keeps its own)",
    )
    run = p.add_argument_group("where it runs")
    run.add_argument("--address", help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="auto (default): one GPU per encoder actor where the cluster has GPUs, else CPUs",
    )
    run.add_argument(
        "--dtype",
        help="auto (default: bf16 on CUDA and on CPUs with bf16 in hardware, else fp32; $KALM_DTYPE overrides), "
        "float32, bfloat16, float16",
    )
    run.add_argument(
        "--batch-tokens",
        type=int,
        help="token budget of one forward pass (default as the service: 16384 CUDA, 512 CPU)",
    )
    run.add_argument("--max-actors", type=int, help="most encoder actors (default: the cluster's GPUs, or CPUs)")
    run.add_argument(
        "--cpus-per-actor",
        type=int,
        help="CPU-only clusters: CPUs (torch threads) per encoder actor (default: node CPUs / 8, 1..8)",
    )
    run.add_argument(
        "--gpus-per-actor",
        type=float,
        default=1.0,
        help="GPU clusters: GPUs per encoder actor; 0.5 puts two actors on each GPU (default: 1)",
    )
    run.add_argument(
        "--tokenize-in",
        choices=["auto", "tasks", "actors"],
        help="where texts are read and tokenised: CPU tasks in front of the encoder actors, or the "
        "actors themselves (default auto: tasks on GPU clusters, actors on CPU-only ones)",
    )
    run.add_argument("--object-store-memory", type=int, help="bytes, when this command starts a local Ray")
    run.add_argument("--progress-interval", type=float, help="seconds between status lines (default: 5)")
    run.add_argument(
        "--ray-progress",
        action=argparse.BooleanOptionalAction,
        help="Ray Data's own progress bars (default: when stderr is a terminal)",
    )
    run.add_argument(
        "--verbose", action="store_true", help="Ray's own logs and warnings, and the job's INFO logs, on stderr"
    )
    bench = p.add_argument_group("benchmark")
    bench.add_argument(
        "--benchmark",
        action="store_true",
        help="after the job, run sentence-transformers' encode on the same texts and compare tokens/s "
        "(into a temporary folder unless --output names a fresh one)",
    )
    bench.add_argument("--st-batch-size", type=int, help="sentence-transformers batch size (default 32)")
    args = p.parse_args(argv)
    if "output" not in args and "benchmark" not in args:
        p.error("--output is required")
    return args


def main(argv: list[str] | None = None) -> int:
    flags = vars(parse_args(argv))
    benchmark, st_batch_size = flags.pop("benchmark", False), flags.pop("st_batch_size", 32)
    # the benchmark's temporary output: a placeholder here, the real folder below
    options = CorpusOptions(**{"output": "", **flags})
    configure_logging(options.verbose)
    held: deque[bytes] = deque(maxlen=HELD_LINES)
    try:
        with contextlib.ExitStack() as stack:
            if not options.verbose:
                stack.enter_context(_ray_core_lines_held_back(held))
            if benchmark:
                from .benchmark import benchmark as compare

                if not options.output:
                    options = replace(options, output=stack.enter_context(tempfile.TemporaryDirectory("-kalm-bench")))
                compare(options, st_batch_size)
                return 0
            summary = embed_corpus(options)
    except KalmServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if held:
            print("Ray's own messages before the failure (all of them with --verbose):", file=sys.stderr)
            sys.stderr.write("".join(line.decode(errors="replace") for line in held))
        raise
    print(summary.report(), flush=True)
    return 0 if summary.complete else 1


@contextlib.contextmanager
def _ray_core_lines_held_back(held: deque[bytes]) -> Iterator[None]:
    """Lines of Ray's C++ core on this process's stderr go to ``held``; everything else passes through.

    The job quiets Ray's Python logs itself; these come from the core worker inside this
    process, e.g. its error-level line about actor constructor arguments in the object store,
    which every Ray Data actor pool causes (ray-project/ray#53727).
    """
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with open(read_end, "rb") as pipe:
            for line in pipe:
                if RAY_CORE_LINE.match(line):
                    held.append(line)
                else:
                    os.write(terminal, line)

    forwarder = threading.Thread(target=forward, name="corpus-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # this process's last handle on the pipe: the forwarder reads to its end
        forwarder.join(timeout=5)
        if not forwarder.is_alive():
            os.close(terminal)
