"""Saving a large file as blocks, and building it back.

Saving streams the file block by block through a thread pool (hashing and
compression release the GIL, so both cores work) with a bounded window, so
memory stays flat whatever the image size.  Holes are found with
``SEEK_DATA``/``SEEK_HOLE`` and never read; zero blocks cost nothing.

Building resolves every block first (see chains.py), then writes each block
once, checking each built block against the entry's block checks (or, for an
entry saved before checks existed, every object id as it is read) and the
image's digest (a hash list of its blocks' ids) as it is written.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dulwich.objects import Blob, Tree

from vml.errors import AreaError, CorruptRepository, FileChanged, NoSpace
from vml.plumbing.areas import stat_signature
from vml.plumbing.cache import BlockRecords, block_hash, page_hashes
from vml.plumbing.chains import (
    MAX_DELTA_DEPTH,
    ZERO,
    Recipe,
    ResolvedImage,
    materialize,
    ordered_map,
)
from vml.plumbing.deltas import encode_delta
from vml.plumbing.manifests import (
    BLOB_MODE,
    BLOCKS_NAME,
    CHECKS_NAME,
    MANIFEST_NAME,
    MAX_BLOCKS,
    TREE_MODE,
    BlockRef,
    LayerBlock,
    Manifest,
    block_trees,
    ranges,
)
from vml.plumbing.packs import BLOB, PackReader, PackWriter, blob_id, deflate
from vml.plumbing.repository import libc, start_writeback
from vml.progress import Advance

WINDOW = 16
# Start writeback of a file being built every this many blocks.
_WRITEBACK_BLOCKS = 32


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of ``fd`` that hold data (not holes)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after pos
            return out
        return [(0, size)]  # filesystem without SEEK_DATA: everything is data
    return out


class _HoleMap:
    """Answers "does block n hold any data?" from a sorted list of data ranges."""

    def __init__(self, data: list[tuple[int, int]]) -> None:
        self.data = data
        self.i = 0

    def has_data(self, start: int, end: int) -> bool:
        # Blocks are asked for in increasing order, so one forward cursor suffices.
        while self.i < len(self.data) and self.data[self.i][1] <= start:
            self.i += 1
        return self.i < len(self.data) and self.data[self.i][0] < end


_ZEROS: dict[int, bytes] = {}
_ZERO_HASHES: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}


def zeros(length: int) -> bytes:
    """A shared all-zero buffer of ``length`` bytes."""
    z = _ZEROS.get(length)
    if z is None:
        z = _ZEROS[length] = bytes(length)
    return z


def zero_record(length: int, page_size: int, ppb: int) -> tuple[bytes, bytes]:
    """Cache record parts (block hash, page hashes) of an all-zero block."""
    key = (length, page_size, ppb)
    rec = _ZERO_HASHES.get(key)
    if rec is None:
        z = zeros(length)
        rec = _ZERO_HASHES[key] = (block_hash(z), page_hashes(z, page_size, ppb))
    return rec


_ZERO_DIGESTS: dict[int, bytes] = {}


def block_digest(data: bytes | None, length: int) -> bytes:
    """A block's id: the git blob id of its bytes (``None``: ``length`` zero bytes).

    Whole blocks are stored under exactly this id, so reading one back and
    checking its object id already checks its digest: no second hash pass.
    """
    if data is not None:
        return blob_id(data)
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = _ZERO_DIGESTS[length] = blob_id(zeros(length))
    return d


def file_digest(path: Path, block_size: int) -> str:
    """An image's digest as manifests record it, computed from the file.

    The digest of an image is the SHA-256 of the concatenated git blob ids
    of its blocks (a hash list).  It covers every byte like a whole-file
    hash, but a save hashes only the blocks that changed, a restore checks
    each block as it reads it, and zero blocks cost nothing.
    """
    out = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            out.update(block_digest(chunk if chunk != zeros(len(chunk)) else None, len(chunk)))
    return out.hexdigest()


def _zero_pages(data: bytes, candidates: list[int], page_size: int, hashes: bytes) -> list[int]:
    """Which of the ``candidates`` pages of ``data`` are all zero.

    The pages' xxh3 (already computed) sorts them out; the bytes confirm it.
    """
    zh = _ZERO_PAGE_HASH.get(page_size)
    if zh is None:
        zh = _ZERO_PAGE_HASH[page_size] = page_hashes(zeros(page_size), page_size, 1)
    mv = memoryview(data)
    out = []
    for k in candidates:
        if hashes[8 * k : 8 * k + 8] == zh:
            page = mv[k * page_size : (k + 1) * page_size]
            if page == zeros(len(page)):
                out.append(k)
    return out


_ZERO_PAGE_HASH: dict[int, bytes] = {}


@dataclass
class _Outcome:
    data: bytes | None  # None: all zero
    digest: bytes
    bhash: bytes
    pages: bytes
    kind: str  # "same" | "zero" | "whole" | "delta"
    sha: bytes | None = None
    zdata: bytes | None = None
    raw_len: int = 0
    read: int = 0


@dataclass
class SaveInputs:
    """Everything :func:`save_image` compares the file against."""

    parent: ResolvedImage | None  # None: this layer is a base (full entry or new file)
    records: BlockRecords | None  # cached hashes of the area's entry
    records_match: Callable[[int], bool]  # do the records describe the parent's block n?
    # Blobs the new entry uses without writing them because a pack already
    # holds them; the caller re-checks they still exist before moving refs
    # (a concurrent gc may have dropped them while nothing referenced them).
    reused: set[bytes] = field(default_factory=set)


def _parent_hashes(
    reader: PackReader,
    inp: SaveInputs,
    n: int,
    pr: Recipe,
    length: int,
    page_size: int,
    ppb: int,
) -> tuple[bytes, bytes]:
    if pr == ZERO:
        return zero_record(length, page_size, ppb)
    if inp.records is not None and inp.records_match(n):
        h = inp.records.block_hash(n)
        if h is not None:
            return h, inp.records.page_hashes(n)
    # No cache for this block: build the parent's version from the repository.
    data = materialize(reader, pr, length)
    assert data is not None
    return block_hash(data), page_hashes(data, page_size, ppb)


def save_image(
    reader: PackReader,
    writer: PackWriter,
    pool: Executor,
    path: Path,
    size: int,
    block_size: int,
    page_size: int,
    inp: SaveInputs,
    record_out: BinaryIO | None,
    progress: Advance,
) -> tuple[Tree, Manifest, int, int]:
    """Save one image file; returns (image tree, manifest, bytes read, blocks stored).

    Every object is added to ``writer``; the per-block cache records for the
    file as read are written to ``record_out``.
    """
    ppb = block_size // page_size
    nblocks = (size + block_size - 1) // block_size
    if nblocks > MAX_BLOCKS:
        raise AreaError(
            f"{path.name} has {nblocks} blocks of {block_size >> 10} KiB, more than a block map holds",
            "save it in a repository made with a larger --block-size",
        )
    base_layer = inp.parent is None
    fd = os.open(path, os.O_RDONLY)
    results: Generator[_Outcome, None, None] | None = None
    try:
        before = stat_signature(os.fstat(fd))
        holes = _HoleMap(data_ranges(fd, size))

        def spans() -> Iterator[tuple[int, int, int, bool]]:
            # A generator, consumed in order: memory stays flat for any size.
            for n in range(nblocks):
                off = n * block_size
                length = min(block_size, size - off)
                yield n, off, length, holes.has_data(off, off + length)

        def work(span: tuple[int, int, int, bool]) -> _Outcome:
            n, off, length, has_data = span
            data: bytes | None = None
            if has_data:
                data = os.pread(fd, length, off)
                if len(data) != length:
                    raise FileChanged(f"{path.name} shrank while it was read")
            read = length if data is not None else 0
            if data is not None and data == zeros(length):
                data = None
            if data is None:
                bh, pages = zero_record(length, page_size, ppb)
            else:
                bh = block_hash(data)
                pages = b""
            pr = None if inp.parent is None else inp.parent.recipe(n, length)
            if pr is not None:
                ph, ppages = _parent_hashes(reader, inp, n, pr, length, page_size, ppb)
                if ph == bh:
                    # Unchanged: the cached digest saves hashing the block again.
                    dg = None
                    if data is not None and inp.records is not None and inp.records_match(n):
                        dg = inp.records.block_digest(n)
                    if dg is None:
                        dg = block_digest(data, length)
                    return _Outcome(data, bytes(dg), bh, bytes(ppages), "same", read=read)
            if data is None:
                return _Outcome(None, block_digest(None, length), bh, pages, "zero", read=read)
            digest = block_digest(data, length)
            pages = page_hashes(data, page_size, ppb)
            if pr is not None and len(pr.deltas) < MAX_DELTA_DEPTH:
                # Deltas stack on one block across entries; once they would
                # add up to half a block, store the block whole, so building
                # any block reads at most about one and a half blocks.
                # Pages that became zero carry no bytes and do not count: a
                # restore only writes zeros for them.
                npages = (length + page_size - 1) // page_size
                changed = [
                    k
                    for k in range(npages)
                    if pages[8 * k : 8 * k + 8] != ppages[8 * k : 8 * k + 8]
                ]
                zero_pages = _zero_pages(data, changed, page_size, pages)
                if zero_pages:
                    gone = set(zero_pages)
                    changed = [k for k in changed if k not in gone]
                # The stacked deltas' sizes cost a look-up each: only asked
                # when the new delta alone would fit.
                fresh = len(changed) * page_size
                if fresh <= length // 2 and (
                    fresh + sum(reader.object_size(d) or length for d in pr.deltas) <= length // 2
                ):
                    delta = encode_delta(data, changed, page_size, zero_pages)
                    sha = blob_id(delta)
                    z = None if reader.in_packs(sha) else deflate(delta)
                    return _Outcome(data, digest, bh, pages, "delta", sha, z, len(delta), read)
            sha = digest  # a whole block's blob id is its digest
            z = None if reader.in_packs(sha) else deflate(data)
            return _Outcome(data, digest, bh, pages, "whole", sha, z, length, read)

        file_hash = hashlib.sha256()
        checks = bytearray()
        blocks: dict[int, BlockRef] = {}
        zero_blocks: list[int] = []
        read_total = 0
        results = ordered_map(pool, work, spans(), WINDOW)
        for n, out in enumerate(results):
            length = min(block_size, size - n * block_size)
            file_hash.update(out.digest)
            checks += out.digest + out.bhash
            if record_out is not None:
                record_out.write(out.digest + out.bhash + out.pages)
            read_total += out.read
            progress(length)
            if out.kind == "zero":
                # Over a parent that already has zeros here, the block comes
                # out "same", never "zero": a base layer just omits it.
                if not base_layer:
                    zero_blocks.append(n)
            elif out.kind in ("whole", "delta"):
                assert out.sha is not None
                if out.zdata is not None:
                    writer.add_compressed(BLOB, out.sha, out.raw_len, out.zdata)
                elif out.sha not in writer:
                    inp.reused.add(out.sha)
                blocks[n] = (out.kind == "delta", out.sha)
        after = stat_signature(os.fstat(fd))
        if after != before:
            raise FileChanged(f"{path.name} changed while it was read")
    finally:
        if results is not None:
            results.close()  # workers stop before the file descriptor closes
        os.close(fd)
    manifest = Manifest(
        size=size,
        sha256=file_hash.hexdigest(),
        block_size=block_size,
        page_size=page_size,
        base=base_layer,
        zero=ranges(zero_blocks),
    )
    tree = image_tree(writer, manifest, blocks, bytes(checks))
    return tree, manifest, read_total, len(blocks)


def image_tree(
    writer: PackWriter,
    manifest: Manifest,
    blocks: Mapping[int, LayerBlock],
    checks: bytes | None,
) -> Tree:
    """Write an image's manifest, checks and block map; returns its tree.

    ``checks`` is the blob id and xxh3-128 of every block of the file (None:
    unknown, as for an entry rewritten from one saved before checks existed).
    """
    man = Blob.from_string(manifest.encode())
    writer.add_object(man)
    tree = Tree()
    tree.add(MANIFEST_NAME, BLOB_MODE, man.id)
    if checks is not None:
        chk = Blob.from_string(checks)
        writer.add_object(chk)
        tree.add(CHECKS_NAME, BLOB_MODE, chk.id)
    top, made = block_trees(blocks)
    for t in made:
        writer.add_object(t)
    if top is not None:
        tree.add(BLOCKS_NAME, TREE_MODE, top.id)
    writer.add_object(tree)
    return tree


# -- building images back --

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Turn a range into a hole (zeros that take no space), or write zeros."""
    fallocate = libc().fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        write_all(fd, zeros(length), offset)


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write every byte at ``offset`` (a write may be short), or raise NoSpace."""
    mv = memoryview(data)
    while mv:
        try:
            n = os.pwrite(fd, mv, offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("no space left while writing the area") from None
            if e.errno == errno.EFBIG:
                raise NoSpace(
                    "a file grew beyond what this file system or process may write"
                ) from None
            raise
        mv = mv[n:]
        offset += n


def write_image(
    reader: PackReader,
    pool: Executor,
    image: ResolvedImage,
    fd: int,
    old: ResolvedImage | None,
    progress: Advance,
    record_out: BinaryIO | None = None,
    old_records: BlockRecords | None = None,
) -> int:
    """Write ``image`` into the open file ``fd`` and check its digest.

    With ``old`` (what the file holds now, known to be clean), only blocks
    whose recipe differs are written; the others are taken as they are, with
    their digests from ``old_records`` (the area cache) or, without it, read
    back and hashed.  Without ``old``, ``fd`` must be an empty file and is
    written in full, zero blocks left as holes.  Blocks are built, written and
    hashed by the pool's workers; the area cache's per-block records go to
    ``record_out``.  Returns the bytes written.
    """
    m = image.manifest
    bs = m.block_size
    ps = m.page_size
    ppb = bs // ps
    in_place = old is not None
    try:
        os.ftruncate(fd, m.size)  # sparse: unwritten blocks stay holes
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL):
            raise NoSpace(f"cannot make a file of {m.size} bytes here ({e.strerror})") from None
        raise
    want_records = record_out is not None

    def build(n: int) -> tuple[int, bytes, bytes | None]:
        # Workers write their own block (pwrite at an offset is thread safe)
        # and hash it, so the ordered consumer below only combines digests.
        length = m.block_length(n)
        if old is not None and old.recipe(n, length) == image.recipes[n]:
            if old_records is not None and old_records.block_digest(n) is not None:
                return (
                    0,
                    bytes(old_records.block_digest(n) or b""),
                    (bytes(old_records.record(n)) if want_records else None),
                )
            data = os.pread(fd, length, n * bs)
            if len(data) != length:
                raise CorruptRepository("the area's file is shorter than its entry says")
            if data == zeros(length):
                return 0, block_digest(None, length), _zero_rec(length) if want_records else None
            dg = block_digest(data, length)
            if not want_records:
                return 0, dg, None
            return 0, dg, dg + block_hash(data) + page_hashes(data, ps, ppb)
        recipe = image.recipes[n]
        check = image.check(n)
        # With the entry's checks, each block is checked once, built, with the
        # xxh3 the area cache needs anyway, and its id is read, not hashed;
        # without them, each object is checked by id as it is read.
        built = materialize(reader, recipe, length, verify=check is None)
        if built is None:
            if check is not None and check != (
                block_digest(None, length),
                zero_record(length, ps, ppb)[0],
            ):
                raise CorruptRepository(_damaged(n))
            if in_place:
                punch_hole(fd, n * bs, length)
            return 0, block_digest(None, length), _zero_rec(length) if want_records else None
        bh = block_hash(built) if check is not None or want_records else b""
        if check is not None and bh != check[1]:
            # Damage somewhere: build again checking every object id, which
            # passes over a damaged copy when another pack holds a good one.
            built = materialize(reader, recipe, length)
            bh = block_hash(built) if built is not None else b""
            if bh != check[1]:
                raise CorruptRepository(_damaged(n))
            assert built is not None
        write_all(fd, built, n * bs)
        if n % _WRITEBACK_BLOCKS == _WRITEBACK_BLOCKS - 1:
            start_writeback(fd)  # the final fsync then waits for little
        # The block's id: from its checks, or the block map for a whole block
        # (checked as it was read), else hashed.  The image's digest over
        # these ids is checked at the end.
        if check is not None:
            dg = check[0]
        elif recipe.base is not None and not recipe.deltas:
            dg = recipe.base
        else:
            dg = block_digest(built, length)
        if not want_records:
            return length, dg, None
        return length, dg, dg + bh + page_hashes(built, ps, ppb)

    def _damaged(n: int) -> str:
        return f"block {n} of a file does not match its check; the repository is damaged"

    def _zero_rec(length: int) -> bytes:
        return block_digest(None, length) + b"".join(zero_record(length, ps, ppb))

    file_hash = hashlib.sha256()
    written = 0
    results = ordered_map(pool, build, iter(range(m.nblocks)), WINDOW)
    try:
        for n, (nw, dg, rec) in enumerate(results):
            written += nw
            file_hash.update(dg)
            if record_out is not None and rec is not None:
                record_out.write(rec)
            progress(m.block_length(n))
    finally:
        results.close()  # workers stop before the caller closes the file
    if file_hash.hexdigest() != m.sha256:
        raise CorruptRepository(
            "a rebuilt image does not match its digest; the repository is damaged"
        )
    return written
