"""Which ranges of a file hold data: holes never, unwritten extents not in a save.

ext4 and XFS keep fallocated space (and ``mke2fs``'s journal) as unwritten
extents, which read as zeros but which ``SEEK_DATA`` reports as data once
their pages are cached.  ``data_ranges(..., skip_unwritten=True)`` leaves
them out with ``FIEMAP``, after writing back the file's dirty pages: a page
written into an unwritten extent must still count as data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from tests.conftest import fstype, need_unwritten_extents
from vml.plumbing.vm import formats
from vml.plumbing.vm.formats import (
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_MERGED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
    data_ranges,
    fiemap_extents,
    plain_unwritten,
)

KiB = 1 << 10
SIZE = 512 * KiB


def _image(path: Path) -> list[tuple[int, int]]:
    """A file with a hole, a fallocated range with one page written in it, and data.

    Its written pages stay dirty in the page cache (nothing flushes them);
    zeros of the fallocated range are read into the cache too.  Returns the
    ranges holding data.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, SIZE)
        os.posix_fallocate(fd, 64 * KiB, 256 * KiB)  # [64, 320) KiB unwritten
        os.pwrite(fd, b"\x01" * 4 * KiB, 128 * KiB)  # a page inside it, dirty
        os.pwrite(fd, b"\x02" * 16 * KiB, 384 * KiB)  # ordinary data after a hole
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 64 * KiB, 192 * KiB) == bytes(64 * KiB)  # zeros, now cached
    finally:
        os.close(fd)
    return [(128 * KiB, 132 * KiB), (384 * KiB, 400 * KiB)]


def _outside_is_zero(path: Path, ranges: list[tuple[int, int]]) -> bool:
    data = path.read_bytes()
    pos = 0
    for a, b in [*ranges, (len(data), len(data))]:
        if data[pos:a] != bytes(a - pos):
            return False
        pos = b
    return True


def test_unwritten_extents_are_left_out_and_dirty_pages_in_them_kept(tmp_path: Path) -> None:
    need_unwritten_extents(tmp_path)
    path = tmp_path / "disk.img"
    written = _image(path)
    fd = os.open(path, os.O_RDONLY)  # read-only: FIEMAP_FLAG_SYNC still writes back
    try:
        got = data_ranges(fd, SIZE, skip_unwritten=True)
        # The flush happened: the written page's extent is no longer unwritten.
        flags = {a: f for a, _, f in fiemap_extents(fd, SIZE, 0)}
        seek = data_ranges(fd, SIZE)
    finally:
        os.close(fd)
    assert got == written
    assert not plain_unwritten(flags[128 * KiB])
    assert _outside_is_zero(path, got)
    # Without skip_unwritten, SEEK_DATA: never less than the data.
    assert all(any(a <= x and y <= b for a, b in seek) for x, y in written)


def test_a_file_without_unwritten_extents_is_not_flushed(tmp_path: Path) -> None:
    """No unwritten extent: SEEK_DATA's answer, and the dirty pages stay dirty (delalloc)."""
    need_unwritten_extents(tmp_path)
    path = tmp_path / "plain.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(100 * KiB)
        f.write(b"\x03" * 8 * KiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = data_ranges(fd, SIZE, skip_unwritten=True)
        assert got == data_ranges(fd, SIZE)
        assert got[0][0] <= 100 * KiB and got[-1][1] >= 108 * KiB
        if fstype(tmp_path) == "ext4":  # ext4 tells delayed allocation apart
            assert all(f & 0x4 for _, _, f in fiemap_extents(fd, SIZE, 0))  # DELALLOC
    finally:
        os.close(fd)


def test_many_extents_are_read_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_unwritten_extents(tmp_path)
    monkeypatch.setattr(formats, "FIEMAP_BATCH", 2)
    path = tmp_path / "many.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    written = []
    try:
        os.ftruncate(fd, 1024 * KiB)
        os.posix_fallocate(fd, 512 * KiB, 256 * KiB)
        for n in range(0, 1024, 32):  # a page every 32 KiB, in holes and unwritten space
            os.pwrite(fd, bytes([n % 251 + 1]) * 4 * KiB, n * KiB)
            written.append((n * KiB, (n + 4) * KiB))
        os.fsync(fd)  # separate extents on disk
        got = data_ranges(fd, 1024 * KiB, skip_unwritten=True)
        assert len(list(fiemap_extents(fd, 1024 * KiB, 0))) > 2 * formats.FIEMAP_BATCH
    finally:
        os.close(fd)
    assert got == written
    assert _outside_is_zero(path, got)


def test_ranges_stop_at_the_size_asked(tmp_path: Path) -> None:
    need_unwritten_extents(tmp_path)
    path = tmp_path / "disk.img"
    _image(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert data_ranges(fd, 130 * KiB, skip_unwritten=True) == [(128 * KiB, 130 * KiB)]
        assert data_ranges(fd, 0, skip_unwritten=True) == []
    finally:
        os.close(fd)


def test_only_plain_unwritten_extents_read_as_zeros() -> None:
    u = FIEMAP_EXTENT_UNWRITTEN
    assert plain_unwritten(u)
    assert plain_unwritten(u | FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED)
    assert not plain_unwritten(0)
    assert not plain_unwritten(FIEMAP_EXTENT_LAST)
    # unknown, delalloc, encoded, encrypted, not aligned, inline, tail: data may be there
    for other in (0x2, 0x4, 0x8, 0x80, 0x100, 0x200, 0x400, 0x4000):
        assert not plain_unwritten(u | other)


def test_without_fiemap_seek_data_answers() -> None:
    """tmpfs has no FIEMAP: SEEK_DATA's ranges, holes still left out."""
    if fstype(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        f.truncate(SIZE)
        f.seek(256 * KiB)
        f.write(b"\x04" * 4 * KiB)
        f.flush()
        with pytest.raises(OSError):
            list(fiemap_extents(f.fileno(), SIZE, 0))
        got = data_ranges(f.fileno(), SIZE, skip_unwritten=True)
        assert got == data_ranges(f.fileno(), SIZE)
        assert got[0][0] <= 256 * KiB < 260 * KiB <= got[-1][1] and got[-1][1] - got[0][0] < SIZE


def test_a_failing_flush_falls_back_to_seek_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIEMAP_FLAG_SYNC fails (a write-back error): SEEK_DATA, which never hides data."""
    need_unwritten_extents(tmp_path)
    path = tmp_path / "disk.img"
    _image(path)
    real = fcntl.ioctl

    def ioctl(fd: int, request: int, arg: bytearray) -> int:
        if request == formats.FS_IOC_FIEMAP and arg[16] & formats.FIEMAP_FLAG_SYNC:
            raise OSError(errno.EIO, "write-back failed")
        return int(real(fd, request, arg))

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert data_ranges(fd, SIZE, skip_unwritten=True) == data_ranges(fd, SIZE)
    finally:
        os.close(fd)


def test_a_folder_has_no_data(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert data_ranges(fd, 0, skip_unwritten=True) == []
    finally:
        os.close(fd)
