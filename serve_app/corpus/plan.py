"""The plan: which rows form which part, fixed once and stored as the manifest (``_corpus.json``).

A corpus is a sorted list of input files. Planning scans every file once (:mod:`.scanning`), so
that the corpus's rows have fixed numbers ``0..rows-1`` (in file order). The corpus is cut into
*parts* of ``rows_per_part`` consecutive rows; part ``k`` always holds the same rows, which is
what lets a restarted job embed exactly the parts that have no output yet (:mod:`.output`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import CorpusError
from .files import InputFile
from .ids import merge_kind
from .records import Columns
from .scanning import FileScan

MANIFEST_VERSION = 1


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
            kind = merge_kind(kind, s.id_kind)
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
