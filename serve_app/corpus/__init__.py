"""The offline corpus job (Ray Data): the service's exact vectors for a whole corpus, resumable.

    from serve_app.corpus import CorpusOptions, embed_corpus
    summary = embed_corpus(CorpusOptions(input="docs/", output="vectors/", input_type="document"))

| module | one idea |
|---|---|
| ``options`` | ``CorpusOptions``: what a job is asked to do, with every default; ``JobSettings``: what fixes the vectors |
| ``job`` | ``embed_corpus``: planning, resume, joining or starting Ray, the summary |
| ``pipeline`` | the Ray Data stages: read + tokenise, ``EmbedParts`` actors, writes |
| ``formats`` | the input formats, and how a file's name tells which (no pyarrow) |
| ``files`` | local paths and URIs as pyarrow filesystems; ``list_inputs``: the files an input spec names |
| ``records`` | reading ``(id, text, reason)`` records from each format |
| ``ids`` | id kinds (integer-like or string), one per corpus |
| ``scanning`` | ``scan_file``: a file's rows, byte index and columns, for the plan |
| ``plan`` | ``Plan``: which rows form which part, stored as ``_corpus.json``; resume checks |
| ``parts`` | ``read_part``: one part's good rows and bad rows with reasons |
| ``output`` | the output folder: part names, atomic writes, manifest and summary, done parts, counts |
| ``progress`` | status lines from the first second; ``CorpusSummary`` |
| ``benchmark`` | the job against sentence-transformers' ``encode`` |
| ``cli`` | ``python -m serve_app.corpus``: flags to ``CorpusOptions`` |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .job import embed_corpus
    from .options import CorpusOptions
    from .progress import CorpusSummary

__all__ = ["CorpusOptions", "CorpusSummary", "embed_corpus"]

_HOMES = {"embed_corpus": "job", "CorpusOptions": "options", "CorpusSummary": "progress"}


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (or `python -m serve_app.corpus --help`) does not load pyarrow first.
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
