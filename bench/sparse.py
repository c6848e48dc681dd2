"""Sparse files as W2 needs them: content digests that cost the data, not the virtual size.

A 64 GiB raw disk holding 600 MiB is compared, copied and measured here by
its data extents (``SEEK_DATA``/``SEEK_HOLE``), never by reading 64 GiB of
holes:

* :func:`file_digest`: sha256 over the offset and bytes of every non-zero
  64 KiB chunk of the file (chunks on a fixed grid, holes and zero chunks
  skipped) and its size. Two files have the same digest exactly when their
  bytes are the same, whatever their holes: byte identity, at the cost of
  the data. Holes are checked apart (:func:`holes_kept`).
* :func:`changed_bytes`: bytes in the ``block``-sized chunks (on a fixed
  grid) that differ between two versions of a file.
* :func:`guest_view`: a disk image as the guest sees it, as a sparse raw
  file (``cp --sparse=always`` of a raw disk, ``qemu-img convert`` of a
  qcow2 one), so that guest offsets of two states can be compared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GRID = 64 << 10
"""Chunk of the digest grid, and the cluster size of QEMU's dirty bitmaps and qcow2."""
READ = 4 << 20


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every data extent of an open file (unwritten extents are holes)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        off = end
    return out


def _spans(extents: list[tuple[int, int]], block: int) -> list[tuple[int, int]]:
    """Extents widened to the ``block`` grid and merged: ``(start, end)``, sorted."""
    spans: list[tuple[int, int]] = []
    for off, length in sorted(extents):
        start = off // block * block
        end = -(-(off + length) // block) * block
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _chunks(fd: int, spans: list[tuple[int, int]], block: int) -> Iterator[tuple[int, bytes]]:
    for start, end in spans:
        off = start
        while off < end:
            buf = os.pread(fd, min(READ, end - off), off)
            if not buf:
                break
            for i in range(0, len(buf), block):
                yield off + i, buf[i : i + block]
            off += len(buf)


@dataclass(frozen=True)
class FileFacts:
    """What W2 records of one file: its content digest, size, data and allocated bytes."""

    digest: str
    size: int
    data: int  # bytes in data extents (what a SEEK_DATA reader reads)
    allocated: int  # st_blocks * 512 (unwritten extents included)


def file_digest(path: Path) -> FileFacts:
    """The content digest of ``path`` (see the module doc) and its sizes."""
    zero = bytes(GRID)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        extents = data_extents(fd, st.st_size)
        for off, chunk in _chunks(fd, _spans(extents, GRID), GRID):
            if chunk != zero[: len(chunk)]:
                h.update(struct.pack("<QI", off, len(chunk)))
                h.update(chunk)
    finally:
        os.close(fd)
    h.update(struct.pack("<Q", st.st_size))
    return FileFacts(
        digest=h.hexdigest(),
        size=st.st_size,
        data=sum(length for _, length in extents),
        allocated=st.st_blocks * 512,
    )


def area_files(area: Path, skip: str = ".vml") -> list[Path]:
    """Every regular file under ``area`` (sorted), without the ``skip`` folder at its root."""
    found: list[Path] = []
    for root, dirs, files in os.walk(area):
        if Path(root) == area and skip in dirs:
            dirs.remove(skip)
        dirs.sort()
        found += [Path(root) / name for name in sorted(files)]
    return found


def area_digest(area: Path) -> dict[str, FileFacts]:
    """``{relative path: FileFacts}`` of the VM's files in ``area`` (not ``.vml/``)."""
    return {str(p.relative_to(area)): file_digest(p) for p in area_files(area)}


def same_content(a: dict[str, FileFacts], b: dict[str, FileFacts]) -> bool:
    """Whether two areas hold the same files with the same bytes."""
    return a.keys() == b.keys() and all(a[k].digest == b[k].digest for k in a)


def holes_lost(saved: dict[str, FileFacts], restored: dict[str, FileFacts]) -> dict[str, int]:
    """Files a restore made take more disk than saved (1% + 1 MiB of slack): extra bytes each.

    The slack covers a file system's own extent blocks; a restore that
    writes a hole as zeros takes the hole's size more. Empty: holes kept.
    """
    lost: dict[str, int] = {}
    for name, s in saved.items():
        r = restored.get(name)
        if r is not None and r.allocated > s.allocated * 1.01 + (1 << 20):
            lost[name] = r.allocated - s.allocated
    return lost


def changed_bytes(old: Path, new: Path, block: int = GRID) -> int:
    """Bytes in ``block``-sized chunks that differ between two versions of a file.

    Only the data extents of either are read; a chunk that is a hole in one
    and zeros in the other is unchanged. A missing ``old`` counts every
    non-zero chunk of ``new``.
    """
    zero = bytes(block)
    fn = os.open(new, os.O_RDONLY)
    fo = os.open(old, os.O_RDONLY) if old.exists() else None
    try:
        extents = data_extents(fn, os.fstat(fn).st_size)
        if fo is not None:
            extents += data_extents(fo, os.fstat(fo).st_size)
        changed = 0
        for off, chunk in _chunks(fn, _spans(extents, block), block):
            before = os.pread(fo, len(chunk), off) if fo is not None else b""
            before += zero[: len(chunk) - len(before)]
            if chunk != before:
                changed += len(chunk)
        if fo is not None:
            # What the old file held past the new one's end was removed: changed too.
            size_new = os.fstat(fn).st_size
            for off, chunk in _chunks(
                fo, _spans(data_extents(fo, os.fstat(fo).st_size), block), block
            ):
                if off >= size_new and chunk != zero[: len(chunk)]:
                    changed += len(chunk)
    finally:
        os.close(fn)
        if fo is not None:
            os.close(fo)
    return changed


def guest_view(disk: Path, fmt: str, dest: Path) -> None:
    """``dest``: the disk's guest-visible bytes as a sparse raw file (zeros left as holes)."""
    if fmt == "raw":
        subprocess.run(["cp", "--sparse=always", str(disk), str(dest)], check=True)
    else:
        subprocess.run(
            ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(disk), str(dest)], check=True
        )


def copy_area(area: Path, dest: Path, skip: str = ".vml") -> None:
    """A sparse copy of the VM's files of ``area`` (not ``skip``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    entries = sorted(str(p) for p in area.iterdir() if p.name != skip)
    if entries:
        subprocess.run(["cp", "-a", "--sparse=always", *entries, str(dest)], check=True)


def evict(area: Path) -> None:
    """Drop the page cache of the VM's files of ``area`` (synced first), so the next reader reads the disk."""
    os.sync()
    for path in area_files(area):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(area: Path) -> None:
    """Read the data of the VM's files of ``area`` into the page cache.

    bup drops what it read from the page cache (``POSIX_FADV_DONTNEED``), so
    whichever tool saves after it would read the disk: every save starts
    from a warm area instead.
    """
    for path in area_files(area):
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in _spans(data_extents(fd, os.fstat(fd).st_size), READ):
                off = start
                while off < end and (buf := os.pread(fd, min(READ, end - off), off)):
                    off += len(buf)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
