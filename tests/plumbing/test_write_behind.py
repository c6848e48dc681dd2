"""A file written front to back goes to the disk as it grows, and leaves the page cache.

A restore writes a GiB nobody reads back soon: ``WriteBehind`` starts each
step's writeback as soon as it is complete and drops the step before it
from the page cache once it is on the disk, so the cache holds at most two
steps of the file, whatever its size, and the bytes are the ones written.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from vml.plumbing.repository import WriteBehind

STEP = 256 << 10


def _cached(fd: int, offset: int) -> bool:
    """Whether the page at ``offset`` is in the page cache (``mincore`` of a mapping).

    Asked through a mapping that is never touched, which reads nothing: a
    read with ``RWF_NOWAIT`` may start readahead of the very pages it asks
    about, so its answer depended on how fast the disk served them (this
    test failed about one run in five that way).  ``fd`` is open for
    writing: a writable mapping lets ctypes take its address.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    m = mmap.mmap(fd, page, offset=offset - offset % page)
    try:
        anchor = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * 1)()
        rc = libc.mincore(ctypes.addressof(anchor), page, vec)
        del anchor  # the mapping cannot close while a ctypes object holds it
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return bool(vec[0] & 1)
    finally:
        m.close()


def test_written_steps_leave_the_page_cache_and_read_back(tmp_path: Path) -> None:
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
