"""Reading one part: its rows from the input files, each accepted as ``(id, text)`` or set aside as a bad row.

A part is read without touching the rows before it (beyond one index stride). Every row of the
part ends up either among the good rows or, with its reason, among the bad ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .files import InputFile
from .ids import canonical_int, empty_id
from .plan import Plan
from .records import MISSING, csv_header, line_records, read_parquet_slice
from .scanning import INDEX_STRIDE


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
        if id_ is MISSING:
            reason, id_ = f"no id field {cols.id!r}", None
        elif id_ is None:
            reason = "null id"
        elif empty_id(id_):
            reason = "empty id"
        elif plan.id_type == "int64":
            if isinstance(id_, str) and canonical_int(id_):
                id_ = int(id_)
            elif isinstance(id_, bool) or not isinstance(id_, int):
                reason, id_ = f"id {id_!r} is not an integer like this corpus's other ids", None
        elif not isinstance(id_, (str, int, float)) or isinstance(id_, bool):
            reason, id_ = f"id {id_!r} is not a string or number", None
        else:
            id_ = str(id_)
    if reason is None:
        if text is MISSING:
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
        out.bad.append({"id": None if id_ is MISSING else id_, "file": f.uri, "row": local_row, "reason": reason})


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
                records = read_parquet_slice(f, a, b, cols)
                for n, (id_, text, reason) in enumerate(records):
                    _accept(out, plan, f, a + n, first + a + n, id_, text, reason)
            else:
                header = csv_header(f)[0] if f.format in ("csv", "tsv") else None
                at = (a // INDEX_STRIDE) * INDEX_STRIDE
                row = at
                for _, record in line_records(f, cols, f.index[a // INDEX_STRIDE], at, header):
                    if record is None:
                        continue
                    if row >= a:
                        _accept(out, plan, f, row, first + row, *record)
                    row += 1
                    if row >= b:
                        break
        first += f.rows
    return out
