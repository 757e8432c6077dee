"""The input formats, and how a file's name tells which one it is.

Light on purpose (no pyarrow): :mod:`.options` and the command line check ``--format`` against these.
"""

from __future__ import annotations

import os

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
}
FORMATS = ("parquet", "jsonl", "csv", "tsv", "text")
#: Compressed line formats (``docs.jsonl.gz``) are read through pyarrow's codecs.
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")


def format_of(path: str, forced: str | None = None) -> str | None:
    if forced:
        return forced
    name = path.lower()
    for ext in COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return EXTENSIONS.get(os.path.splitext(name)[1])
