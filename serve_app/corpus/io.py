"""The corpus job's files: which rows exist, how to read one part of them, what is done.

No Ray and no model here; ``serve_app.corpus`` runs these functions inside Ray Data.

A corpus is a sorted list of input files (Parquet, JSON Lines, CSV/TSV, plain text;
local paths or any URI pyarrow understands). Planning scans every file once and
counts its rows, remembering the byte offset of every ``INDEX_STRIDE``-th row, so
that the corpus's rows have fixed numbers ``0..rows-1`` (in file order) and any row
range can be read without reading what comes before it. The corpus is cut into
*parts* of ``rows_per_part`` consecutive rows; part ``k`` always holds the same rows,
and its output is written once, atomically, as ``part-{k:08d}.parquet``. A part whose
file exists is done. That is the whole resume mechanism: a restarted job embeds
exactly the parts that have no file yet.

Every input row ends up in exactly one place: the output (``id``, ``embedding``,
``n_tokens``) or, with the reason, ``_bad_rows/part-{k:08d}.jsonl``.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import io
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import CorpusError

MANIFEST = "_corpus.json"
BAD_ROWS_DIR = "_bad_rows"
SUMMARY = "_summary.json"
TMP_PREFIX = ".tmp-"
PART_RE = re.compile(r"^part-(\d{8})\.parquet$")
BAD_RE = re.compile(r"^part-(\d{8})\.jsonl$")
MANIFEST_VERSION = 1

#: Byte offset of every INDEX_STRIDE-th row is kept, so reading a part skips < this many rows.
INDEX_STRIDE = 1024

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
LINE_FORMATS = ("jsonl", "csv", "tsv", "text")
STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary())

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KiB default


# --- files and URIs --------------------------------------------------------------------


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and path for a local path or any URI pyarrow understands (s3://, gs://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent.endswith("/") or "://" not in parent or not name:  # a bucket or filesystem root
        return pafs.FileSystem.from_uri(uri)
    fs, path = _from_uri(parent)  # one filesystem object per folder, not per file
    return fs, f"{path.rstrip('/')}/{name}"


@functools.lru_cache(maxsize=64)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


@dataclass
class InputFile:
    """One input file, as listed and then as scanned."""

    uri: str
    format: str
    size: int
    mtime_ns: int | None
    rows: int = 0
    #: Byte offset of rows 0, INDEX_STRIDE, 2*INDEX_STRIDE, ... (line formats).
    index: list[int] = field(default_factory=list)

    @property
    def compressed(self) -> bool:
        return self.uri.lower().endswith(COMPRESSED)


def format_of(path: str, forced: str | None = None) -> str | None:
    if forced:
        return forced
    name = path.lower()
    for ext in COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return EXTENSIONS.get(os.path.splitext(name)[1])


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Shell-like: ``*`` stays within a folder, ``**`` crosses folders, hidden names need an explicit pattern."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(
            _glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1) if not any(_hidden(p) for p in parts[:i])
        )
    if not parts or (_hidden(parts[0]) and not pattern[0].startswith(parts[0][0])):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _hidden(rel: str) -> bool:
    """Files and folders starting with '.' or '_' are not data (Spark/Ray/pyarrow convention)."""
    return any(p.startswith((".", "_")) for p in rel.split("/"))


def list_inputs(spec: str, forced_format: str | None = None) -> list[InputFile]:
    """The files ``spec`` names (a file, a folder, or a glob with * ? [..] **), sorted by path."""
    fs, path = resolve(spec)
    prefix = ""  # what turns a path of ``fs`` back into a URI: "s3://", "hdfs://host:8020", ...
    if "://" in spec:
        at = spec.find(path)
        prefix = spec[:at] if at > 0 else spec.split("://", 1)[0] + "://"
    if any(c in path for c in "*?["):
        parts = path.split("/")
        static = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:static]) or "/"
        pattern = parts[static:]
        recursive = len(pattern) > 1 or "**" in pattern
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        infos = [
            i
            for i in infos
            if i.type == pafs.FileType.File and _glob_match(i.path[len(base) :].strip("/").split("/"), pattern)
        ]
        explicit = False
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"input {spec} does not exist")
        if info.type == pafs.FileType.Directory:
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and not _hidden(i.path[len(path) :].strip("/"))
            ]
            explicit = False
        else:
            infos, explicit = [info], True
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        fmt = format_of(info.path, forced_format)
        if fmt is None:
            if explicit:
                raise CorpusError(
                    f"cannot tell the format of {info.path} from its name; pass --format ({', '.join(FORMATS)})"
                )
            continue  # a folder or glob may hold other files (README, _SUCCESS, ...)
        files.append(InputFile(prefix + info.path, fmt, info.size or 0, info.mtime_ns))
    if not files:
        raise CorpusError(
            f"no input files found at {spec} (known extensions: {', '.join(sorted(EXTENSIONS))}, "
            f"optionally compressed {', '.join(COMPRESSED)})"
        )
    return files


# --- reading records -------------------------------------------------------------------
#
# Every format is read as a sequence of records ``(id, text, reason)`` numbered from 0
# within its file; ``reason`` is set (and id/text may be None) when the record is bad.
# Scanning (counting) and reading use the same iterators, so both number rows alike.


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    id: str | None = "id"  # None: ids are row numbers


def _open_lines(f: InputFile, offset: int = 0) -> Iterator[bytes]:
    fs, path = resolve(f.uri)
    if f.compressed:
        raw = fs.open_input_stream(path, compression="detect")
        stream = io.BufferedReader(raw, 1 << 20)
        while offset > 0:  # no random access into a compressed stream
            skipped = stream.read(min(offset, 1 << 22))
            if not skipped:
                break
            offset -= len(skipped)
    else:
        raw = fs.open_input_file(path)
        raw.seek(offset)
        stream = io.BufferedReader(raw, 1 << 20)
    try:
        yield from stream
    finally:
        stream.close()


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_records(lines: Iterator[bytes], first_row: int) -> Iterator[tuple[int, tuple]]:
    for n, line in enumerate(lines):
        row = first_row + n
        body = line.rstrip(b"\n").rstrip(b"\r")
        if row == 0 and body.startswith(b"\xef\xbb\xbf"):
            body = body[3:]
        text = _decode(body)
        yield len(line), (None, text, None if text is not None else "undecodable: not valid UTF-8")


def _json_records(lines: Iterator[bytes], cols: Columns) -> Iterator[tuple[int, tuple]]:
    for line in lines:
        size = len(line)
        if not line.strip():
            yield size, (None, None, "blank line")
            continue
        if _decode(line) is None:
            yield size, (None, None, "undecodable: not valid UTF-8")
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield size, (None, None, f"invalid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            yield size, (None, None, f"not a JSON object (a {type(obj).__name__})")
            continue
        id_ = obj.get(cols.id, _MISSING) if cols.id is not None else None
        yield size, (id_, obj.get(cols.text, _MISSING), None)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


class _CsvLines:
    """Feeds csv.reader one decoded line at a time, counting the bytes it has consumed."""

    def __init__(self, lines: Iterator[bytes]):
        self.lines = lines
        self.consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.consumed += len(line)
        return line.decode("utf-8", errors="surrogateescape")


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _csv_header(f: InputFile) -> tuple[list[str], int]:
    """The header's column names and the byte offset where data rows start."""
    lines = _CsvLines(_open_lines(f))
    reader = csv.reader(lines, delimiter="\t" if f.format == "tsv" else ",")
    for record in reader:
        if record:
            record[0] = record[0].removeprefix("\ufeff")
            return record, lines.consumed
    return [], lines.consumed


def _csv_records(
    f: InputFile, lines: Iterator[bytes], header: list[str], cols: Columns
) -> Iterator[tuple[int, tuple | None]]:
    feeder = _CsvLines(lines)
    reader = csv.reader(feeder, delimiter="\t" if f.format == "tsv" else ",")
    text_at = header.index(cols.text) if cols.text in header else None
    id_at = header.index(cols.id) if cols.id in header else None
    before = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            size, before = feeder.consumed - before, feeder.consumed
            yield size, (None, None, f"malformed CSV row: {e}")
            continue
        size, before = feeder.consumed - before, feeder.consumed
        if not record:  # blank line: not a row
            yield size, None
            continue
        if len(record) != len(header):
            yield size, (None, None, f"malformed CSV row: {len(record)} fields, the header has {len(header)}")
            continue
        id_ = record[id_at] if id_at is not None else None
        text = record[text_at] if text_at is not None else _MISSING
        if (isinstance(text, str) and _has_surrogates(text)) or (id_ is not None and _has_surrogates(id_)):
            yield size, (None, None, "undecodable: not valid UTF-8")
            continue
        yield size, (id_, text, None)


def _line_records(
    f: InputFile, cols: Columns, offset: int, first_row: int, header: list[str] | None = None
) -> Iterator[tuple[int, tuple | None]]:
    """``(bytes consumed, record or None for a skipped blank CSV line)`` from ``offset`` on."""
    lines = _open_lines(f, offset)
    if f.format == "text":
        return _text_records(lines, first_row)
    if f.format == "jsonl":
        return _json_records(lines, cols)
    return _csv_records(f, lines, header or [], cols)


# --- scanning (planning) ------------------------------------------------------------


@dataclass
class FileScan:
    """What planning learns about one file."""

    rows: int
    index: list[int]
    columns: list[str] | None  # None: the format has no fixed columns (JSON Lines)
    text_type_ok: bool = True
    has_text: bool = False
    has_id: bool = False
    id_kind: str | None = None  # "int" or "str" when has_id


def _id_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "str"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "int" if _canonical_int(value) else "str"
    if isinstance(value, float):
        return "str"
    return None


def _empty_id(value: Any) -> bool:
    """An id that is only whitespace names nothing: its row is a bad row (and does not make int ids strings)."""
    return isinstance(value, str) and not value.strip()


def _canonical_int(s: str) -> bool:
    try:
        return str(int(s)) == s and abs(int(s)) < 2**63
    except ValueError:
        return False


def _merge_kind(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a == b else "str"


def scan_file(f: InputFile, cols: Columns) -> FileScan:
    """Count ``f``'s rows, index their byte offsets, and see which columns it has."""
    if f.format == "parquet":
        fs, path = resolve(f.uri)
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            schema = pf.schema_arrow
            scan = FileScan(rows=pf.metadata.num_rows, index=[], columns=schema.names)
        scan.has_text = cols.text in schema.names
        scan.text_type_ok = not scan.has_text or schema.field(cols.text).type in STRING_TYPES
        if cols.id is not None and cols.id in schema.names:
            scan.has_id = True
            scan.id_kind = "int" if pa.types.is_integer(schema.field(cols.id).type) else "str"
        return scan

    header, offset = _csv_header(f) if f.format in ("csv", "tsv") else (None, 0)
    scan = FileScan(rows=0, index=[], columns=header)
    if header is not None:
        scan.has_text = cols.text in header
        scan.has_id = cols.id is not None and cols.id in header
    elif f.format == "text":
        scan.has_text = True
    for size, record in _line_records(f, cols, offset, 0, header):
        if record is None:
            offset += size
            continue
        if scan.rows % INDEX_STRIDE == 0:
            scan.index.append(offset)
        offset += size
        scan.rows += 1
        id_, text, reason = record
        if reason is None and f.format == "jsonl":
            scan.has_text |= text is not _MISSING
            if id_ is not _MISSING and cols.id is not None:
                scan.has_id = True
        if reason is None and scan.has_id and id_ is not None and id_ is not _MISSING and not _empty_id(id_):
            scan.id_kind = _merge_kind(scan.id_kind, _id_kind(id_) or "str")
    return scan


# --- the plan ------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything that fixes which rows form which part; stored as the manifest."""

    settings: dict
    files: list[InputFile]
    rows_per_part: int
    id_source: str  # "column" or "row_number"
    id_type: str  # "int64" or "string"

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def parts(self) -> int:
        return -(-self.rows // self.rows_per_part)

    def part_rows(self, part: int) -> tuple[int, int]:
        start = part * self.rows_per_part
        return start, min(self.rows, start + self.rows_per_part)

    def columns(self) -> Columns:
        return Columns(
            text=self.settings["text_column"], id=self.settings["id_column"] if self.id_source == "column" else None
        )

    def to_json(self) -> dict:
        return {
            "kalm_corpus_manifest": MANIFEST_VERSION,
            "settings": self.settings,
            "rows_per_part": self.rows_per_part,
            "id_source": self.id_source,
            "id_type": self.id_type,
            "rows": self.rows,
            "parts": self.parts,
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_json(cls, doc: dict) -> Plan:
        if doc.get("kalm_corpus_manifest") != MANIFEST_VERSION:
            raise CorpusError(f"unknown manifest version {doc.get('kalm_corpus_manifest')!r}")
        return cls(
            settings=doc["settings"],
            files=[InputFile(**f) for f in doc["files"]],
            rows_per_part=doc["rows_per_part"],
            id_source=doc["id_source"],
            id_type=doc["id_type"],
        )


def make_plan(
    files: list[InputFile], scans: list[FileScan], settings: dict, rows_per_part: int, id_column_explicit: bool
) -> Plan:
    """Check the scans agree on the columns and fix the id source and type."""
    text_col, id_col = settings["text_column"], settings["id_column"]
    for f, s in zip(files, scans):
        if f.format != "text" and s.rows and not s.has_text:
            cols = f"; its columns: {', '.join(s.columns)}" if s.columns is not None else ""
            raise CorpusError(f"{f.uri} has no text column {text_col!r}{cols} (set --text-column)")
        if not s.text_type_ok:
            raise CorpusError(f"column {text_col!r} of {f.uri} does not hold strings")
        f.rows, f.index = s.rows, s.index
    with_id = [f.uri for f, s in zip(files, scans) if s.has_id]
    without_id = [f.uri for f, s in zip(files, scans) if not s.has_id and s.rows]
    if id_column_explicit and without_id:
        raise CorpusError(
            f"--id-column {id_col!r}: not found in {without_id[0]}"
            + (f" and {len(without_id) - 1} more file(s)" if len(without_id) > 1 else "")
        )
    if with_id and without_id:
        raise CorpusError(
            f"some input files have an id column {id_col!r} ({with_id[0]}) and some do not "
            f"({without_id[0]}); ids must come from one place (use --id-column)"
        )
    if with_id:
        kind = None
        for s in scans:
            kind = _merge_kind(kind, s.id_kind)
        return Plan(settings, files, rows_per_part, "column", "int64" if kind in ("int", None) else "string")
    return Plan(settings, files, rows_per_part, "row_number", "int64")


def check_unchanged(plan: Plan, files: list[InputFile]) -> None:
    """A resumed job must see the files it started with."""
    before = {f.uri: f for f in plan.files}
    now = {f.uri: f for f in files}
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    changed = sorted(
        u for u in set(now) & set(before) if (now[u].size, now[u].mtime_ns) != (before[u].size, before[u].mtime_ns)
    )
    problems = [
        f"{what}: {items[0]}" + (f" and {len(items) - 1} more" if len(items) > 1 else "")
        for what, items in (("new", added), ("gone", removed), ("changed", changed))
        if items
    ]
    if problems:
        raise CorpusError(
            "the input is not what this output directory was started with ("
            + "; ".join(problems)
            + "); write to a new --output, or remove the old one"
        )


# --- reading one part ----------------------------------------------------------------


@dataclass
class PartRows:
    """The rows of one part: the good ones (id, text) and the bad ones (with reasons)."""

    ids: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    where: list[tuple[str, int]] = field(default_factory=list)  # (file, row in that file) of each good row
    bad: list[dict] = field(default_factory=list)


def _accept(
    out: PartRows, plan: Plan, f: InputFile, local_row: int, global_row: int, id_: Any, text: Any, reason: str | None
) -> None:
    cols = plan.columns()
    if plan.id_source == "row_number":
        id_ = global_row
    elif reason is None:
        if id_ is _MISSING:
            reason, id_ = f"no id field {cols.id!r}", None
        elif id_ is None:
            reason = "null id"
        elif _empty_id(id_):
            reason = "empty id"
        elif plan.id_type == "int64":
            if isinstance(id_, str) and _canonical_int(id_):
                id_ = int(id_)
            elif isinstance(id_, bool) or not isinstance(id_, int):
                reason, id_ = f"id {id_!r} is not an integer like this corpus's other ids", None
        elif not isinstance(id_, (str, int, float)) or isinstance(id_, bool):
            reason, id_ = f"id {id_!r} is not a string or number", None
        else:
            id_ = str(id_)
    if reason is None:
        if text is _MISSING:
            reason = f"no text field {cols.text!r}"
        elif text is None:
            reason = "null text"
        elif not isinstance(text, str):
            reason = f"text is not a string (a {type(text).__name__})"
        elif not text:
            reason = "empty text"
    if reason is None:
        out.ids.append(id_)
        out.texts.append(text)
        out.where.append((f.uri, local_row))
    else:
        out.bad.append({"id": None if id_ is _MISSING else id_, "file": f.uri, "row": local_row, "reason": reason})


def _read_parquet_slice(f: InputFile, start: int, stop: int, cols: Columns) -> Iterator[tuple]:
    fs, path = resolve(f.uri)
    with fs.open_input_file(path) as handle:
        pf = pq.ParquetFile(handle)
        groups: list[int] = []
        first = at = 0  # first: the row where the first group read starts
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < stop and at + n > start:
                first = first if groups else at
                groups.append(g)
            at += n
        names = [cols.text] + ([cols.id] if cols.id is not None else [])
        table = pf.read_row_groups(groups, columns=names).slice(start - first, stop - start)
    texts = table.column(cols.text).combine_chunks()
    if not pa.types.is_binary(texts.type) and not pa.types.is_large_binary(texts.type):
        texts = texts.cast(pa.large_binary())  # decode ourselves: bad UTF-8 is a bad row, not a crash
    ids = [None] * len(table)
    if cols.id is not None:
        column = table.column(cols.id)
        if not (pa.types.is_integer(column.type) or column.type in STRING_TYPES[:3]):
            column = column.cast(pa.string())  # dates, decimals, ...: their text form
        ids = column.to_pylist()
    for i, raw in enumerate(texts.to_pylist()):
        if raw is None:
            yield ids[i], None, None
            continue
        text = _decode(raw)
        yield ids[i], text, None if text is not None else "undecodable: not valid UTF-8"


def read_part(plan: Plan, part: int) -> PartRows:
    """The rows of ``part``, read without touching the rows before them (beyond one index stride)."""
    start, stop = plan.part_rows(part)
    out = PartRows()
    cols = plan.columns()
    first = 0
    for f in plan.files:
        a, b = max(start, first) - first, min(stop, first + f.rows) - first
        if a < b:
            if f.format == "parquet":
                records = _read_parquet_slice(f, a, b, cols)
                for n, (id_, text, reason) in enumerate(records):
                    _accept(out, plan, f, a + n, first + a + n, id_, text, reason)
            else:
                header = _csv_header(f)[0] if f.format in ("csv", "tsv") else None
                at = (a // INDEX_STRIDE) * INDEX_STRIDE
                row = at
                for _, record in _line_records(f, cols, f.index[a // INDEX_STRIDE], at, header):
                    if record is None:
                        continue
                    if row >= a:
                        _accept(out, plan, f, row, first + row, *record)
                    row += 1
                    if row >= b:
                        break
        first += f.rows
    return out


# --- the output directory ------------------------------------------------------------


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


def read_json(uri: str) -> dict | None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


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
