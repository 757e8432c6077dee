"""Ids from an id column: integer-like or strings, one kind per corpus; a blank id names nothing."""

from __future__ import annotations

from typing import Any


def id_kind(value: Any) -> str | None:
    """``"int"`` for integers and their canonical text form, ``"str"`` for other strings and numbers, else None."""
    if isinstance(value, bool):
        return "str"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "int" if canonical_int(value) else "str"
    if isinstance(value, float):
        return "str"
    return None


def empty_id(value: Any) -> bool:
    """An id that is only whitespace names nothing: its row is a bad row (and does not make int ids strings)."""
    return isinstance(value, str) and not value.strip()


def canonical_int(s: str) -> bool:
    try:
        return str(int(s)) == s and abs(int(s)) < 2**63
    except ValueError:
        return False


def merge_kind(a: str | None, b: str | None) -> str | None:
    """The kind of ids seen so far: one ``"str"`` makes all ids strings; None (none seen) changes nothing."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a == b else "str"
