"""A 1 TiB disk holding a few MiB costs its few MiB: to save, check out, restore, cache.

Virtual size must never be a cost: holes and zero blocks go in bulk, the
area cache keeps records only for blocks that hold data, and a checkout
whose cache cannot be written says so and carries on (the cache is an
accelerator).  Sizes and bytes are asserted, never times.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import allocated, edit, need_unwritten_extents
from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm.formats import data_ranges
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.status import status

MiB = 1 << 20
TiB = 1 << 40
# Where the test disk holds data: three 1 MiB runs spread over the terabyte.
DATA = (0, TiB // 2 + 12345, TiB - 4 * MiB)


def _io() -> tuple[int, int]:
    """Bytes this process read and wrote through system calls so far (holes included)."""
    doc = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(doc["rchar"]), int(doc["wchar"])


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _sparse_disk(path: Path, seed: int) -> None:
    rng = __import__("random").Random(seed)
    with open(path, "wb") as f:
        f.truncate(TiB)
        for off in DATA:
            f.seek(off)
            f.write(rng.randbytes(MiB))


def _same_sparse(a: Path, b: Path) -> bool:
    """Same size and bytes, reading only where either file holds data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        for start, end in sorted(data_ranges(fa, size) + data_ranges(fb, size)):
            if os.pread(fa, end - start, start) != os.pread(fb, end - start, start):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (the test is skipped where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def big(tmp_path: Path) -> tuple[Repository, Path]:
    """A repository (1 MiB blocks) and an area holding a 1 TiB disk with 3 MiB of data."""
    repo = init_repository(tmp_path / "repo")
    area = tmp_path / "area"
    area.mkdir()
    (area / "notes.txt").write_text("a sparse disk\n")
    _sparse_disk(area / "disk.img", 1)
    return repo, area


def test_a_terabyte_disk_costs_its_data(big: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = big
    r0, w0 = _io()
    e1 = commit(repo, area, message="first")
    r1, w1 = _io()
    # 3 MiB of data in 4 blocks (one run straddles two), plus the small file:
    # only the data is read (to the file system's blocks), not the rest of the blocks.
    assert e1.read_bytes <= 3 * MiB + 8192 + 1024 and e1.stored_bytes < 4 * MiB
    # What was read and written in all (packs, cache, metadata), not a terabyte's worth.
    assert r1 - r0 < 64 * MiB and w1 - w0 < 64 * MiB
    cache = area / ".vml" / "cache"
    assert _tree_size(cache) < 32 << 10  # 2 KiB per block of data, nothing per hole
    # Unchanged: nothing read, nothing but metadata stored.
    (area / "notes.txt").write_text("a sparse disk, again\n")
    e2 = commit(repo, area, message="second")
    assert e2.read_bytes < 1024 and e2.stored_bytes < 16 << 10
    # A change in the middle: without a dirty bitmap the file's data is read
    # again (its 4 blocks holding data, never its holes); a page delta is stored.
    edit(area / "disk.img", TiB // 2 + 12345 + 5000, b"\x07" * 5000)
    e3 = commit(repo, area, message="third")
    assert e3.read_bytes <= 3 * MiB + 8192 + 1024 and e3.stored_bytes < 64 << 10
    assert status(repo, area).clean


def test_a_save_without_a_bitmap_reads_the_data_not_the_blocks(tmp_path: Path) -> None:
    """A file system's metadata: a 4 KiB page in every 1 MiB block of a 64 MiB disk.

    A save without a dirty bitmap reads every byte of data (1/256 of the
    blocks it touches), and the file comes back the same, holes kept.
    """
    repo = init_repository(tmp_path / "repo")
    area = tmp_path / "area"
    area.mkdir()
    disk = area / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        for n in range(64):
            f.seek(n * MiB + (n % 7) * 8192)
            f.write(bytes([n + 1]) * 4096)
    data = sum(b - a for a, b in data_ranges(os.open(disk, os.O_RDONLY), 64 * MiB))
    assert data <= 64 * 8192  # one or two file-system blocks per page
    e1 = commit(repo, area)
    assert e1.read_bytes == data
    edit(disk, 5 * MiB + 5 * 8192, b"\x09" * 100)
    e2 = commit(repo, area)
    assert e2.read_bytes == data  # no bitmap: all the data again, still not the blocks
    out = tmp_path / "out"
    checkout(repo, e2.entry, out)
    assert _same_sparse(out / "disk.img", disk)
    slack = 64 << 10  # the file system's own blocks (an extent tree shaped otherwise)
    assert allocated(out / "disk.img") <= allocated(disk) + slack
    # In place, back and forth: a block's zero pages are punched, not left holding old bytes.
    edit(out / "disk.img", 9 * MiB, b"\x05" * MiB)
    e3 = commit(repo, out)
    back = restore(repo, e2.entry, out)
    assert back.written_bytes <= 8192 + 4096
    assert _same_sparse(out / "disk.img", disk)
    assert allocated(out / "disk.img") <= allocated(disk) + slack
    restore(repo, e3.entry, out)
    assert allocated(out / "disk.img") >= MiB


def test_checkout_and_restore_keep_the_holes(big: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, area = big
    e1 = commit(repo, area)
    out = tmp_path / "out"
    r0, w0 = _io()
    res = checkout(repo, e1.entry, out)
    r1, w1 = _io()
    assert res.written_bytes <= 4 * MiB + 1024 and not res.notes
    assert w1 - w0 < 64 * MiB and r1 - r0 < 64 * MiB
    assert _same_sparse(out / "disk.img", area / "disk.img")
    assert allocated(out / "disk.img") <= 4 * MiB + (64 << 10)
    assert _tree_size(out / ".vml" / "cache") < 32 << 10
    assert status(repo, out).clean
    # Change it, save, and go back: only what differs is written, holes stay holes.
    edit(out / "disk.img", 7 * MiB, b"\x01" * 4096)  # data where E1 has a hole
    edit(out / "disk.img", 100, b"\x02" * 4096)
    e2 = commit(repo, out)
    assert e2.read_bytes <= 5 * MiB + 1024  # its data (no dirty bitmap here), not its holes
    back = restore(repo, e1.entry, out)
    assert back.in_place and back.written_bytes <= MiB
    assert _same_sparse(out / "disk.img", area / "disk.img")
    assert allocated(out / "disk.img") <= 4 * MiB + (64 << 10)
    assert status(repo, out).clean


def test_checkout_into_a_filesystem_smaller_than_the_old_cache(
    big: tuple[Repository, Path], tmp_path: Path
) -> None:
    """The data fits in 16 MiB; a cache of 2 KiB per block of virtual size (2 GiB) would not."""
    repo, area = big
    e1 = commit(repo, area)
    with _tmpfs(tmp_path / "small", "16m") as small:
        res = checkout(repo, e1.entry, small / "vm")
        assert not res.notes
        assert _same_sparse(small / "vm" / "disk.img", area / "disk.img")
        assert status(repo, small / "vm").clean
        edit(small / "vm" / "disk.img", 0, b"\x03" * 10)
        assert commit(repo, small / "vm").read_bytes <= 4 * MiB + 1024


def test_a_cache_that_cannot_be_written_is_said_once_and_the_checkout_goes_on(
    big: tuple[Repository, Path], tmp_path: Path
) -> None:
    repo, area = big
    e1 = commit(repo, area)
    out = tmp_path / "out"
    # The cache's folder has room for one page: its records do not fit, the data does.
    with _tmpfs(out / ".vml" / "cache.tmp", "4k"):
        res = checkout(repo, e1.entry, out)
        assert [n for n in res.notes if "area cache" in n] == [
            "the area cache was not written (no space left); the next save reads more"
        ]
        assert _same_sparse(out / "disk.img", area / "disk.img")
        assert not (out / ".vml" / "cache").exists()
        # Without a cache, status and the next save read the data (and only the data).
        assert status(repo, out).clean
        edit(out / "disk.img", 0, b"\x04" * 10)
        saved = commit(repo, out)
        assert saved.read_bytes <= 4 * MiB + 1024
        assert any("area cache" in n for n in saved.notes)


def test_fallocated_space_is_not_read_and_comes_back_as_holes(tmp_path: Path) -> None:
    """Unwritten extents (fallocated, or mke2fs's journal) read as zeros: never read, never stored.

    A page written into the fallocated space is data, though the page is
    still dirty in the page cache and the extent on disk unwritten; zeros of
    that space read into the cache (which SEEK_DATA then reports as data)
    are not.  The file comes back byte for byte, the unwritten space as holes.
    """
    need_unwritten_extents(tmp_path)
    repo = init_repository(tmp_path / "repo")
    area = tmp_path / "area"
    area.mkdir()
    disk = area / "disk.img"
    fd = os.open(disk, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 4 * MiB)
        os.posix_fallocate(fd, MiB, 2 * MiB)
        os.pwrite(fd, b"\x01" * 4096, MiB + MiB // 2)  # in the fallocated space
        os.pwrite(fd, b"\x02" * 8192, 3 * MiB + MiB // 2)  # after a hole
        assert os.pread(fd, MiB // 2, 2 * MiB) == bytes(MiB // 2)  # cached zeros
    finally:
        os.close(fd)
    e1 = commit(repo, area)
    assert e1.read_bytes == 4096 + 8192
    assert status(repo, area).clean
    out = tmp_path / "out"
    checkout(repo, e1.entry, out)
    got = out / "disk.img"
    assert got.read_bytes() == disk.read_bytes()
    assert allocated(got) <= 12 << 10
    # Data written into what is left of the unwritten space is found.
    edit(disk, 2 * MiB + 4096, b"\x03" * 4096)
    assert not status(repo, area).clean
    e2 = commit(repo, area)
    assert e2.read_bytes == 2 * 4096 + 8192  # both pages and the data, nothing else
    assert status(repo, area).clean
    restore(repo, e2.entry, out)
    assert got.read_bytes() == disk.read_bytes()
    assert allocated(got) <= 16 << 10
    assert status(repo, out).clean
