"""The output directory: part files, bad rows, the manifest and summary, written atomically.

Each part's output is written once, atomically, as ``part-{k:08d}.parquet``; its bad rows, with
their reasons, as ``_bad_rows/part-{k:08d}.jsonl``. A part whose file exists is done. That is the
whole resume mechanism: a restarted job embeds exactly the parts that have no file yet.
"""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .files import resolve

MANIFEST = "_corpus.json"
BAD_ROWS_DIR = "_bad_rows"
SUMMARY = "_summary.json"
TMP_PREFIX = ".tmp-"
PART_RE = re.compile(r"^part-(\d{8})\.parquet$")
BAD_RE = re.compile(r"^part-(\d{8})\.jsonl$")


def part_name(part: int) -> str:
    return f"part-{part:08d}.parquet"


def bad_rows_name(part: int) -> str:
    return f"{BAD_ROWS_DIR}/part-{part:08d}.jsonl"


#: Where an object appears only once its upload completed (so a direct write is atomic).
OBJECT_STORES = ("s3", "gcs", "abfs")


def write_atomically(uri: str, data: bytes) -> None:
    """Readers see the whole file or none: object stores (s3://, gs://, abfs://) show an object
    only once its upload completed; on filesystems we write a temp name and rename it."""
    fs, path = resolve(uri)
    if fs.type_name in OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes | None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(uri: str) -> dict | None:
    data = read_bytes(uri)
    return None if data is None else json.loads(data)


def write_json(uri: str, doc: dict) -> None:
    write_atomically(uri, json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n")


def prepare_output(out_uri: str) -> None:
    """Create the directory and drop temp files a killed run left behind."""
    fs, path = resolve(out_uri)
    fs.create_dir(path, recursive=True)
    for folder in (path, f"{path}/{BAD_ROWS_DIR}"):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.base_name.startswith(TMP_PREFIX):
                fs.delete_file(info.path)


def done_parts(out_uri: str) -> set[int]:
    fs, path = resolve(out_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {int(m.group(1)) for i in infos if i.type == pafs.FileType.File and (m := PART_RE.match(i.base_name))}


def output_counts(out_uri: str) -> tuple[dict[int, int], dict[int, int]]:
    """Rows in each part file (from Parquet footers) and bad rows per part."""
    fs, path = resolve(out_uri)

    def rows(file: str) -> int:
        if file.endswith(".parquet"):
            with fs.open_input_file(file) as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        with fs.open_input_stream(file) as f:
            return f.read().count(b"\n")

    found = {}  # path -> part
    for folder, pattern in ((path, PART_RE), (f"{path}/{BAD_ROWS_DIR}", BAD_RE)):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if m := pattern.match(info.base_name):
                found[info.path] = int(m.group(1))
    with ThreadPoolExecutor(16) as pool:  # object stores: one request per file, so many at once
        counts = dict(zip(found, pool.map(rows, found)))
    good = {part: counts[f] for f, part in found.items() if f.endswith(".parquet")}
    bad = {part: counts[f] for f, part in found.items() if f.endswith(".jsonl")}
    return good, bad
