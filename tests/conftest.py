"""Shared fixtures: real repositories and areas in temporary folders, KiB-sized."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vml.plumbing.repository import Repository, init_repository
from vml.plumbing.vm.locks import held_lock

# Small blocks so tests exercise many blocks, deltas and fan-out with KiB of data.
TEST_BLOCK = 64 << 10


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """An empty repository with 64 KiB blocks."""
    r = init_repository(tmp_path / "repo", TEST_BLOCK)
    yield r
    r.close()


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A small VM-like area: a config, an nvram and a sparse disk with data."""
    a = tmp_path / "area"
    make_area(a)
    return a


def make_area(a: Path, disk: int = 1 << 20, seed: int = 1) -> None:
    """Write a small VM into ``a``: .vmx, .nvram, and a sparse raw disk."""
    rng = random.Random(seed)
    a.mkdir(parents=True, exist_ok=True)
    (a / "vm.vmx").write_text('displayName = "test"\nmemsize = "64"\n')
    (a / "vm.nvram").write_bytes(rng.randbytes(8192))
    with open(a / "disk.img", "wb") as f:
        f.truncate(disk)
        for off in (0, 200_000, 700_000):
            f.seek(off)
            f.write(rng.randbytes(50_000))


def edit(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@contextmanager
def qemu_io_open(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real qemu-io holding ``image`` open (and locked) until the block ends."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # qemu-io locks the image a moment after it starts (later still on a
        # busy machine): hand it over only once the lock is there.
        deadline = time.monotonic() + 30
        while held_lock(image) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io took no lock"
            time.sleep(0.01)
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def need(tool: str) -> None:
    """Skip unless ``tool`` is installed (CI installs all of them)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def digest_area(folder: Path, *, mtimes: bool = False) -> dict[str, tuple[object, ...]]:
    """Every regular file below ``folder`` (``.vml`` excluded) -> (sha256, size, exec bit[, mtime]).

    VML keeps git's two file modes, so only the exec bit is compared.
    """
    import hashlib
    import os

    out: dict[str, tuple[object, ...]] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not (root == str(folder) and d == ".vml"))
        for name in names:
            p = Path(root) / name
            st = p.stat()
            item: tuple[object, ...] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                st.st_size,
                bool(st.st_mode & 0o111),
            )
            if mtimes:
                item += (st.st_mtime_ns,)
            out[p.relative_to(folder).as_posix()] = item
    return out


def allocated(path: Path) -> int:
    """Bytes the file system really allocated for ``path`` (holes cost nothing)."""
    return path.stat().st_blocks * 512


def three_entries(repo_path: Path, area: Path) -> Repository:
    """A repository with E1 (full) <- E2 (incremental) and E3 (differential on E1)."""
    from vml.porcelain.commit import commit

    r = init_repository(repo_path, TEST_BLOCK)
    make_area(area, disk=1 << 20)
    commit(r, area, message="fresh")
    edit(area / "disk.img", 300_000, b"x" * 5000)
    commit(r, area, message="worked")
    edit(area / "disk.img", 600_000, b"y" * 70_000)
    commit(r, area, message="diff", kind="differential")
    return r


def fstype(folder: Path) -> str:
    """The file system type of ``folder`` (``findmnt``), or ``"unknown"``."""
    done = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(folder)], capture_output=True, text=True
    )
    lines = done.stdout.split()
    return lines[0] if lines else "unknown"


def need_unwritten_extents(folder: Path) -> None:
    """Skip the test unless ``folder``'s file system keeps fallocated space as unwritten extents.

    ext4, XFS and btrfs do (``FIEMAP_EXTENT_UNWRITTEN``); tmpfs, NFS and FUSE
    have no ``FIEMAP``, and some file systems write zeros instead.
    """
    from vml.plumbing.vm.formats import fiemap_extents, plain_unwritten

    probe = folder / ".unwritten-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.posix_fallocate(fd, 0, 64 << 10)
        flags = [f for _, _, f in fiemap_extents(fd, 64 << 10, 0)]
    except OSError as e:
        pytest.skip(f"{fstype(folder)} at {folder} has no FIEMAP or fallocate ({e.strerror})")
    finally:
        os.close(fd)
        probe.unlink()
    if not flags or not all(plain_unwritten(f) for f in flags):
        pytest.skip(f"{fstype(folder)} at {folder} keeps no unwritten extents")
