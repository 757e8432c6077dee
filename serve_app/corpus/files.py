"""The corpus job's files: local paths and URIs as pyarrow filesystems, and the input files a spec names.

Inputs are local paths or any URI pyarrow understands (s3://, gs://, ...). No Ray and no model here.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from ..errors import CorpusError
from .formats import COMPRESSED, EXTENSIONS, FORMATS, format_of


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
    #: Byte offset of rows 0, INDEX_STRIDE, 2*INDEX_STRIDE, ... (line formats; see :mod:`.scanning`).
    index: list[int] = field(default_factory=list)

    @property
    def compressed(self) -> bool:
        return self.uri.lower().endswith(COMPRESSED)


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
