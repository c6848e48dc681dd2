"""A file written front to back goes to the disk as it grows, and leaves the page cache.

A restore writes a GiB nobody reads back soon: ``WriteBehind`` starts each
step's writeback as soon as it is complete and drops the step before it
from the page cache once it is on the disk, so the cache holds at most two
steps of the file, whatever its size, and the bytes are the ones written.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vml.plumbing.repository import WriteBehind

STEP = 256 << 10


def _cached(fd: int, offset: int) -> bool:
    """Whether the page at ``offset`` is in the page cache (a read that may not wait)."""
    try:
        os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


def test_written_steps_leave_the_page_cache_and_read_back(tmp_path: Path) -> None:
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT to tell cached pages here")
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if fs in ("tmpfs", "ramfs", "overlayfs"):
        pytest.skip(f"{fs}: the page cache is where the file lives")
    data = [os.urandom(STEP) for _ in range(6)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        behind = WriteBehind(fd, STEP)
        for i, chunk in enumerate(data):
            os.pwrite(fd, chunk, i * STEP)
            behind.advance((i + 1) * STEP)
            # A half step more changes nothing: steps go whole.
            behind.advance((i + 1) * STEP + STEP // 2)
        # Every step but the last one started is on the disk and out of the cache.
        assert [_cached(fd, i * STEP) for i in range(6)] == [False] * 5 + [True]
        assert b"".join(os.pread(fd, STEP, i * STEP) for i in range(6)) == b"".join(data)
        os.fsync(fd)
    finally:
        os.close(fd)
