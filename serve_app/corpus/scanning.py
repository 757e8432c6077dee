"""Scanning one input file for the plan: count its rows, index their byte offsets, see its columns.

The byte offset of every ``INDEX_STRIDE``-th row is kept, so that any row range can be read
without reading what comes before it (see :mod:`.parts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .files import InputFile, resolve
from .ids import empty_id, id_kind, merge_kind
from .records import MISSING, STRING_TYPES, Columns, csv_header, line_records

#: Byte offset of every INDEX_STRIDE-th row is kept, so reading a part skips < this many rows.
INDEX_STRIDE = 1024


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

    header, offset = csv_header(f) if f.format in ("csv", "tsv") else (None, 0)
    scan = FileScan(rows=0, index=[], columns=header)
    if header is not None:
        scan.has_text = cols.text in header
        scan.has_id = cols.id is not None and cols.id in header
    elif f.format == "text":
        scan.has_text = True
    for size, record in line_records(f, cols, offset, 0, header):
        if record is None:
            offset += size
            continue
        if scan.rows % INDEX_STRIDE == 0:
            scan.index.append(offset)
        offset += size
        scan.rows += 1
        id_, text, reason = record
        if reason is None and f.format == "jsonl":
            scan.has_text |= text is not MISSING
            if id_ is not MISSING and cols.id is not None:
                scan.has_id = True
        if reason is None and scan.has_id and id_ is not None and id_ is not MISSING and not empty_id(id_):
            scan.id_kind = merge_kind(scan.id_kind, id_kind(id_) or "str")
    return scan
