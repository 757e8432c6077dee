"""Big request buffers handed back to the operating system once freed (glibc's allocator).

A 30 MiB body, its decoded text and the parsed JSON are each one large allocation. glibc serves
allocations above its mmap threshold with their own mappings, returned at ``free``, but it raises
that threshold to the size of each such block freed (up to 32 MiB), so after the first big request
the next ones come from the heap and arenas, whose freed pages it keeps: an ingress or proxy grew
by hundreds of MB per burst and kept it (docs/measurements/2026-12-03-hardening.md). Fixing the
threshold turns that adjustment off; ``trim()`` after a large request returns what is left free.
Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: Allocations from this size up get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 1024 * 1024
#: A process that took in a body larger than this trims after it (the proxy: its pieces are small
#: allocations, below any mmap threshold).
TRIM_AFTER_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both)
    except (OSError, AttributeError):
        return None
    return libc


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold in this process; False where the allocator is not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> None:
    """Return the free pages of every arena to the OS (a few ms; run it off the event loop)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
