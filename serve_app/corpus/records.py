"""Reading records from each input format: ``(id, text, reason)``, numbered from 0 within a file.

``reason`` is set (and id/text may be None) when the record is bad; a field the record lacks is
:data:`MISSING`. Scanning (counting) and reading a part use the same iterators, so both number rows alike.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .files import InputFile, resolve

STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary())

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KiB default


@dataclass(frozen=True)
class Columns:
    """Which column (or JSON field) holds the text, and which the id."""

    text: str = "text"
    id: str | None = "id"  # None: ids are row numbers


class _Missing:
    """A field the record does not have (unlike one that is null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


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
        id_ = obj.get(cols.id, MISSING) if cols.id is not None else None
        yield size, (id_, obj.get(cols.text, MISSING), None)


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


def csv_header(f: InputFile) -> tuple[list[str], int]:
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
        text = record[text_at] if text_at is not None else MISSING
        if (isinstance(text, str) and _has_surrogates(text)) or (id_ is not None and _has_surrogates(id_)):
            yield size, (None, None, "undecodable: not valid UTF-8")
            continue
        yield size, (id_, text, None)


def line_records(
    f: InputFile, cols: Columns, offset: int, first_row: int, header: list[str] | None = None
) -> Iterator[tuple[int, tuple | None]]:
    """``(bytes consumed, record or None for a skipped blank CSV line)`` from ``offset`` on."""
    lines = _open_lines(f, offset)
    if f.format == "text":
        return _text_records(lines, first_row)
    if f.format == "jsonl":
        return _json_records(lines, cols)
    return _csv_records(f, lines, header or [], cols)


def read_parquet_slice(f: InputFile, start: int, stop: int, cols: Columns) -> Iterator[tuple]:
    """The records of rows ``start..stop`` of a Parquet file, reading only the row groups that hold them."""
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
