"""Big buffers go back to the OS once freed: glibc's mmap threshold fixed, free pages trimmed."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import psutil
from serve_app.serve import memory
fixed = {fixed}
if fixed:
    assert memory.return_big_buffers()
me = psutil.Process()
start = me.memory_info().rss
for _ in range(6):  # as an ingress does: a 30 MiB body, its text, then small objects made meanwhile
    bodies = [bytearray(30 * 2**20) for _ in range(4)]
    for body in bodies:
        body[::4096] = b"x" * len(body[::4096])
    small = [str(i) * 50 for i in range(20000)]
    del bodies
del small
memory.trim() if fixed else None
print((me.memory_info().rss - start) // 2**20)
"""


def grown_mb(fixed: bool) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD.format(fixed=fixed)], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_big_buffers_leave_the_process_with_the_threshold_fixed():
    kept, returned = grown_mb(fixed=False), grown_mb(fixed=True)
    assert returned < kept / 3, (kept, returned)  # most of each burst of 120 MiB is returned, not kept
