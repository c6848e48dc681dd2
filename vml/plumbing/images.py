"""Saving a large file as blocks, and building it back.

Saving streams the file block by block through a thread pool (hashing and
compression release the GIL, so both cores work) with a bounded window, so
memory stays flat whatever the image size.  Holes (and, in a save,
unwritten extents: ``FIEMAP``) are found without reading and never read;
zero blocks cost nothing.

Building resolves every block first (see chains.py), then writes each block
once, checking each built block against the entry's block checks (or, for an
entry saved before checks existed, every object id as it is read) and the
image's digest (a hash list of its blocks' ids) as it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.objects import Blob, ObjectID, Tree

from vml.errors import AreaError, FileChanged
from vml.plumbing.areas import stat_signature
from vml.plumbing.cache import (
    BlockRecords,
    RecordsWriter,
    block_hash,
    page_hashes,
    zero_page_hash,
)
from vml.plumbing.chains import (
    MAX_DELTA_DEPTH,
    NO_SOURCES,
    WINDOW,
    ZERO,
    Recipe,
    ResolvedImage,
    materialize,
    ordered_map,
    same_length_end,
)
from vml.plumbing.deltas import Where, encode_delta, own_data_at
from vml.plumbing.digests import Digests, block_digest, zero_record, zeros
from vml.plumbing.manifests import (
    BLOB_MODE,
    BLOCKS_NAME,
    MANIFEST_NAME,
    MAX_BLOCKS,
    SOURCES_NAME,
    TREE_MODE,
    Anchored,
    BlockChecks,
    LayerBlock,
    Manifest,
    block_trees,
    sources_tree,
)
from vml.plumbing.packreader import BLOB, PackReader, blob_id
from vml.plumbing.packwriter import PackWriter, deflate
from vml.plumbing.pageindex import Budget, Looked, PageIndex
from vml.plumbing.vm.formats import data_ranges

# How far a save got: bytes of the file passed, and bytes of them read.
SaveAdvance = Callable[[int, int], None]

# Start writeback of a file being built every this many blocks.
_WRITEBACK_BLOCKS = 32


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


class DataExtents:
    """The data ranges of a file, asked per block from any thread (no cursor)."""

    def __init__(self, data: list[tuple[int, int]]) -> None:
        self.data = data
        self.ends = [b for _, b in data]

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that hold data, clipped to it."""
        out: list[tuple[int, int]] = []
        for a, b in self.data[bisect_right(self.ends, start) :]:
            if a >= end:
                break
            out.append((max(a, start), min(b, end)))
        return out


def read_data(fd: int, off: int, length: int, extents: DataExtents | None) -> tuple[bytes, int]:
    """``length`` bytes at ``off`` and the bytes read: only the parts ``extents`` says hold data.

    A block that straddles a hole costs what its data holds, not the block:
    the hole's zeros are filled in, never read (``None``: read it all).  A
    file that shrank meanwhile gives fewer bytes than ``length``.
    """
    parts = [(off, off + length)] if extents is None else extents.within(off, off + length)
    if parts == [(off, off + length)]:
        data = os.pread(fd, length, off)
        return data, len(data)
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    for a, b in parts:
        n = os.preadv(fd, [view[a - off : b - off]], a)
        got += n
        if n != b - a:
            return b"", got
    return bytes(buf), got


def file_digest(path: Path, block_size: int) -> str:
    """An image's digest as manifests record it, computed from the file.

    The digest of an image is the SHA-256 of the concatenated git blob ids
    of its blocks (a hash list).  It covers every byte like a whole-file
    hash, but a save hashes only the blocks that changed, a restore checks
    each block as it reads it, and zero blocks cost nothing: only blocks
    holding data (``SEEK_DATA``) are read here.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        nb = (size + block_size - 1) // block_size
        out = Digests(size, block_size)
        extents = DataExtents(data_ranges(fd, size))
        for a, b in block_spans(extents.data, block_size, nb):
            for n in range(a, b):
                length = min(block_size, size - n * block_size)
                chunk = read_data(fd, n * block_size, length, extents)[0]
                if chunk != zeros(len(chunk)):
                    out.block(n, block_digest(chunk, len(chunk)), b"", zero=True)
        out.zeros_until(nb)
    finally:
        os.close(fd)
    return out.hash.hexdigest()


def _zero_pages(data: bytes, candidates: list[int], page_size: int, hashes: bytes) -> list[int]:
    """Which of the ``candidates`` pages of ``data`` are all zero.

    The pages' xxh3 (already computed) sorts them out; the bytes confirm it.
    """
    zh = zero_page_hash(page_size)
    mv = memoryview(data)
    out = []
    for k in candidates:
        if hashes[8 * k : 8 * k + 8] == zh:
            page = mv[k * page_size : (k + 1) * page_size]
            if page == zeros(len(page)):
                out.append(k)
    return out


def _differing(hashes: bytes, old: bytes | memoryview, count: int) -> list[int]:
    """The pages ``k < count`` whose 8-byte hashes differ between ``hashes`` and ``old``."""
    if hashes[: 8 * count] == old[: 8 * count]:
        return []
    # Compared as 64-bit words: a third of the time of comparing 8-byte slices.
    a, b = memoryview(hashes).cast("Q"), memoryview(old).cast("Q")
    return [k for k in range(count) if a[k] != b[k]]


@dataclass
class _Outcome:
    n: int
    data: bytes | None  # None: all zero
    digest: bytes
    bhash: bytes
    pages: bytes
    kind: str  # "same" | "zero" | "whole" | "delta" | "anchored" (a delta over zeros)
    sha: bytes | None = None
    zdata: bytes | None = None
    raw_len: int = 0
    read: int = 0
    # A delta's header (cut before its data pages: where each page is), and
    # the sources its reference pages come from.
    places: bytes | None = None
    sources: frozenset[bytes] = NO_SOURCES


@dataclass
class _Run:
    """Blocks ``[start, end)`` that are not read: holes, or vouched for by the area cache."""

    start: int
    end: int
    records: list[tuple[int, bytes]]  # (block, cache record) of those holding data
    zero: list[tuple[int, int]]  # ranges listed as zero in the new layer
    length: int  # bytes the run spans


@dataclass(frozen=True)
class Changed:
    """Where a file may differ from its parent's version: sorted byte ranges.

    Outside them the file holds exactly the parent's bytes, as the area
    cache's records say (the caller makes sure they describe the parent).
    ``partial``: the source holds only these ranges (a live save's copies),
    so nothing else of it may be read.
    """

    ranges: list[tuple[int, int]]
    partial: bool = False


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
    # What may have changed since the parent (a dirty bitmap's word); None: read all data.
    changed: Changed | None = None
    # Pages of the images saved before this one in the same save: changed pages
    # found there are stored as references (version-3 deltas).
    index: PageIndex | None = None
    # Bytes of delta headers the whole save may keep for the page index.
    places_budget: Budget | None = None


@dataclass
class SavedLayer:
    """What :func:`save_image` stored for an image, as a page index needs it."""

    blocks: dict[int, LayerBlock]
    zero: list[tuple[int, int]]
    places: dict[bytes, bytes]  # the headers of the deltas it wrote (within the budget)


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


def block_spans(
    byte_ranges: list[tuple[int, int]], block_size: int, nblocks: int
) -> list[tuple[int, int]]:
    """The blocks ``[a, b)`` that sorted byte ranges touch, merged."""
    out: list[tuple[int, int]] = []
    for start, end in byte_ranges:
        a = start // block_size
        b = min((end + block_size - 1) // block_size, nblocks)
        if a >= b:
            continue
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _Ranges:
    """Increasing ``[start, end)`` block ranges, adjacent ones merged."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def add(self, a: int, b: int) -> None:
        if self.items and self.items[-1][1] == a:
            self.items[-1] = (self.items[-1][0], b)
        else:
            self.items.append((a, b))


def _gaps(ranges: list[tuple[int, int]], i: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` that sorted merged ``ranges`` (from index ``i``) leave out."""
    gaps = []
    pos = start
    while i < len(ranges) and ranges[i][0] < end:
        ra, rb = ranges[i]
        if ra > pos:
            gaps.append((pos, ra))
        pos = max(pos, rb)
        i += 1
    if pos < end:
        gaps.append((pos, end))
    return gaps


def fill_partial(
    reader: PackReader,
    pool: Executor,
    path: Path,
    size: int,
    block_size: int,
    parent: ResolvedImage,
    ranges: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Complete a partial copy: what ``ranges`` leave of each block they touch, from the parent.

    A live save copies only the bytes that changed (a dirty cluster is a
    fraction of a block); the rest of each block they touch is the
    parent's, built from the repository into the copy (a hole stays a hole
    where the parent's block is zero).  Returns the whole blocks, as byte
    ranges, that the copy now holds.
    """
    nb = (size + block_size - 1) // block_size
    spans = block_spans(ranges, block_size, nb)
    todo: list[tuple[int, list[tuple[int, int]]]] = []
    i = 0
    for a, b in spans:
        for n in range(a, b):
            start, end = n * block_size, min((n + 1) * block_size, size)
            while i < len(ranges) and ranges[i][1] <= start:
                i += 1
            gaps = _gaps(ranges, i, start, end)
            if gaps:
                todo.append((n, gaps))
    fd = os.open(path, os.O_RDWR)

    def fill(item: tuple[int, list[tuple[int, int]]]) -> None:
        n, gaps = item
        length = min(block_size, size - n * block_size)
        recipe = parent.recipe(n, length)
        if recipe is None:
            raise AreaError(
                f"{path.name}: block {n} was not copied whole and its parent has none", ""
            )
        data = materialize(reader, recipe, length)
        if data is None:
            return  # zeros: the copy's hole says so already
        for ga, gb in gaps:
            off = ga - n * block_size
            os.pwrite(fd, memoryview(data)[off : off + gb - ga], ga)

    try:
        for _ in ordered_map(pool, fill, iter(todo), WINDOW):
            pass
    finally:
        os.close(fd)
    return [(a * block_size, min(b * block_size, size)) for a, b in spans]


def _read_spans(
    fd: int, size: int, block_size: int, inp: SaveInputs, sle: int, data: DataExtents | None
) -> list[tuple[int, int]]:
    """The blocks to read: those holding ``data``, or with a bitmap's word, those it names.

    With ``changed``, every other block is vouched for by the cache's
    records, except where the parent has no block of that length (the file
    grew) and, for a real file, where the cache knows data but the file now
    has none (a hole punched behind the bitmap's back).
    """
    nb = (size + block_size - 1) // block_size
    ch = inp.changed
    if ch is None:
        assert data is not None
        return block_spans(data.data, block_size, nb)
    spans = block_spans(ch.ranges, block_size, nb)
    if sle < nb:
        spans.append((sle, nb))
    if not ch.partial and inp.records is not None:
        holes = _HoleMap(data_ranges(fd, size))
        for n in inp.records.data_blocks():
            if n < sle and not holes.has_data(n * block_size, min((n + 1) * block_size, size)):
                spans.append((n, n + 1))
    return _merge(spans)


class _ImageSave:
    """One image being saved: what to read, what goes in bulk, and what the layer stores."""

    def __init__(self, path: Path, size: int, block_size: int, inp: SaveInputs) -> None:
        self.path = path
        self.size = size
        self.bs = block_size
        self.inp = inp
        self.nblocks = (size + block_size - 1) // block_size
        self.sle = same_length_end(inp.parent, size, block_size)
        self.digests = Digests(size, block_size)
        self.zero = _Ranges()
        self.blocks: dict[int, LayerBlock] = {}
        self.read = 0
        self.sources: set[bytes] = set()
        self.places: dict[bytes, bytes] = {}

    def items(self, spans: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
        """``(start, end, read?)``: runs not read go whole, blocks to read one by one."""
        pos = 0
        for a, b in spans:
            if pos < a:
                yield pos, a, False
            for n in range(a, b):
                yield n, n + 1, True
            pos = b
        if pos < self.nblocks:
            yield pos, self.nblocks, False

    def run(self, a: int, b: int) -> _Run:
        """Blocks ``[a, b)`` not read: holes, or with a list of changes, the parent's bytes."""
        length = min(b * self.bs, self.size) - a * self.bs
        inp = self.inp
        if inp.changed is not None:
            # Vouched for: the parent's bytes, as the cache records them.
            recs = inp.records
            assert recs is not None
            idx = recs.data_blocks()
            found = idx[bisect_left(idx, a) : bisect_left(idx, b)]
            return _Run(a, b, [(n, bytes(recs.stored(n) or b"")) for n in found], [], length)
        zero: list[tuple[int, int]] = []
        if inp.parent is not None:
            # Holes over a parent with data there become zero ranges.
            zero = [(n, n + 1) for n in inp.parent.nonzero_in(a, min(b, self.sle))]
            if b > self.sle:
                zero.append((max(a, self.sle), b))
        return _Run(a, b, [], zero, length)

    def take_run(self, out: _Run, record_out: RecordsWriter | None) -> None:
        """Fold a run into the digest, the records and the zero ranges."""
        for n, rec in out.records:
            self.digests.block(n, rec[:20], rec[20:36])
            if record_out is not None:
                record_out.add(n, rec)
        self.digests.zeros_until(out.end)
        for za, zb in out.zero:
            self.zero.add(za, zb)

    def take_block(
        self, out: _Outcome, writer: PackWriter, record_out: RecordsWriter | None
    ) -> None:
        """Fold a block read into the digest and the records, and store what it needs."""
        n = out.n
        self.digests.block(n, out.digest, out.bhash, zero=out.data is None)
        if record_out is not None and out.data is not None:
            record_out.add(n, out.digest + out.bhash + out.pages)
        self.read += out.read
        if out.kind == "zero":
            # Over a parent that already has zeros here, the block comes
            # out "same", never "zero": a base layer just omits it.
            if self.inp.parent is not None:
                self.zero.add(n, n + 1)
        elif out.kind in ("whole", "delta", "anchored"):
            assert out.sha is not None
            if out.zdata is not None:
                writer.add_compressed(BLOB, out.sha, out.raw_len, out.zdata)
            elif out.sha not in writer:
                self.inp.reused.add(out.sha)
            if out.kind == "anchored":
                self.blocks[n] = Anchored(None, (out.sha,))
            else:
                self.blocks[n] = (out.kind == "delta", out.sha)
            budget = self.inp.places_budget
            if out.places is not None and budget is not None and budget.take(len(out.places)):
                self.places[out.sha] = out.places
            for src in out.sources:
                self.sources.add(src)
                if src not in writer:
                    self.inp.reused.add(src)  # an older block: it must still exist at publishing


def save_image(
    reader: PackReader,
    writer: PackWriter,
    pool: Executor,
    path: Path,
    size: int,
    block_size: int,
    page_size: int,
    inp: SaveInputs,
    record_out: RecordsWriter | None,
    progress: SaveAdvance,
) -> tuple[Tree, Manifest, int, SavedLayer]:
    """Save one image file; returns (image tree, manifest, bytes read, what it stored).

    Only blocks holding data are read, or with ``inp.changed`` only those it
    names; the rest go in bulk, with no work per block: holes and unwritten
    extents are zero (and come back as holes), vouched blocks take the
    cache's records.
    Every object is added to ``writer``; the cache records of the blocks
    holding data go to ``record_out``.
    """
    job = _ImageSave(path, size, block_size, inp)
    if job.nblocks > MAX_BLOCKS:
        raise AreaError(
            f"{path.name} has {job.nblocks} blocks of {block_size >> 10} KiB, more than a block map holds",
            "save it in a repository made with a larger --block-size",
        )
    if inp.changed is not None and (inp.parent is None or inp.records is None):
        raise AreaError(f"{path.name}: a list of changes needs the parent's cache records", "")
    fd = os.open(path, os.O_RDONLY)
    results: Generator[_Outcome | _Run, None, None] | None = None
    try:
        before = stat_signature(os.fstat(fd))
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def work(item: tuple[int, int, bool]) -> _Outcome | _Run:
            a, b, read = item
            if not read:
                return job.run(a, b)
            return _read_block(reader, fd, path, a, size, block_size, page_size, inp, extents)

        # A full scan reads only the data of each block holding some (a disk
        # at rest without a bitmap: its written data, not whole blocks, nor
        # the unwritten extents SEEK_DATA reports once their zeros are cached).
        extents = (
            DataExtents(data_ranges(fd, size, skip_unwritten=True)) if inp.changed is None else None
        )
        spans = _read_spans(fd, size, block_size, inp, job.sle, extents)
        results = ordered_map(pool, work, job.items(spans), WINDOW)
        for out in results:
            if isinstance(out, _Run):
                job.take_run(out, record_out)
                progress(out.length, 0)
            else:
                job.take_block(out, writer, record_out)
                progress(min(block_size, size - out.n * block_size), out.read)
        job.digests.zeros_until(job.nblocks)
        if stat_signature(os.fstat(fd)) != before:
            raise FileChanged(f"{path.name} changed while it was read")
    finally:
        if results is not None:
            results.close()  # workers stop before the file descriptor closes
        os.close(fd)
    manifest = Manifest(
        size=size,
        sha256=job.digests.hash.hexdigest(),
        block_size=block_size,
        page_size=page_size,
        base=inp.parent is None,
        zero=job.zero.items,
    )
    tree = image_tree(
        writer, manifest, job.blocks, job.digests.checks(manifest), sources=frozenset(job.sources)
    )
    return tree, manifest, job.read, SavedLayer(job.blocks, job.zero.items, job.places)


def _read_block(
    reader: PackReader,
    fd: int,
    path: Path,
    n: int,
    size: int,
    block_size: int,
    page_size: int,
    inp: SaveInputs,
    extents: DataExtents | None = None,
) -> _Outcome:
    """Read block ``n``, compare it with the parent's, and prepare what to store.

    Given ``extents``, only the block's data is read (its holes are zeros).
    """
    ppb = block_size // page_size
    off = n * block_size
    length = min(block_size, size - off)
    data: bytes | None
    data, read = read_data(fd, off, length, extents)
    if len(data) != length:
        raise FileChanged(f"{path.name} shrank while it was read")
    if data == zeros(length):
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
            return _Outcome(n, data, bytes(dg), bh, bytes(ppages), "same", read=read)
    if data is None:
        return _Outcome(n, None, block_digest(None, length), bh, pages, "zero", read=read)
    digest = block_digest(data, length)
    pages = page_hashes(data, page_size, ppb)
    # The pages looked up for a delta are not looked up again for a self-contained block.
    looked = Looked()
    if pr is not None and len(pr.deltas) < MAX_DELTA_DEPTH:
        found = _as_delta(
            reader, inp, n, data, pr, ppages, page_size, digest, bh, pages, read, looked
        )
        if found is not None:
            return found
    if inp.index is not None:
        found = _self_contained(
            reader, inp.index, n, data, page_size, digest, bh, pages, read, looked
        )
        if found is not None:
            return found
    sha = digest  # a whole block's blob id is its digest
    z = None if reader.in_packs(sha) else deflate(data)
    return _Outcome(n, data, digest, bh, pages, "whole", sha, z, length, read)


def _as_delta(
    reader: PackReader,
    inp: SaveInputs,
    n: int,
    data: bytes,
    pr: Recipe,
    ppages: bytes,
    page_size: int,
    digest: bytes,
    bh: bytes,
    pages: bytes,
    read: int,
    looked: Looked,
) -> _Outcome | None:
    """Block ``n`` as a page delta over its parent's version ``pr``, if it is worth one.

    Deltas stack on one block across entries; once they would add up to
    half a block, the block is stored whole, so building any block reads
    at most about one and a half blocks.  Pages that became zero carry no
    bytes and do not count: a restore only writes zeros for them.
    """
    length = len(data)
    npages = (length + page_size - 1) // page_size
    changed = _differing(pages, ppages, npages)
    zero_pages = _zero_pages(data, changed, page_size, pages)
    if zero_pages:
        gone = set(zero_pages)
        changed = [k for k in changed if k not in gone]
    # Pages the images saved before this one hold (a guest's page cache
    # holds its disk's blocks) become references: 16 bytes, not a page.
    refs = inp.index.find(data, changed, pages, looked) if inp.index is not None and changed else {}
    if refs:
        changed = [k for k in changed if k not in refs]
    # The stacked deltas' sizes cost a look-up each: only asked
    # when the new delta alone would fit.
    fresh = len(changed) * page_size + 16 * len(refs)
    if fresh > length // 2 or (
        fresh + sum(reader.object_size(d) or length for d in pr.deltas) > length // 2
    ):
        return None
    delta = encode_delta(data, changed, page_size, zero_pages, refs)
    return _delta_outcome(reader, "delta", delta, refs, n, data, digest, bh, pages, read)


def _self_contained(
    reader: PackReader,
    index: PageIndex,
    n: int,
    data: bytes,
    page_size: int,
    digest: bytes,
    bh: bytes,
    pages: bytes,
    read: int,
    looked: Looked,
) -> _Outcome | None:
    """A block to store whole, unless the index finds most of its pages elsewhere.

    Then it is a delta over zeros naming them as references (an anchored
    block ``<c>.r/`` with that one delta): for a block new in the file (the
    qcow2 file grew) or over a parent whose stacked deltas are full.  Its
    bytes stay within half a block, as a delta's do; building it reads
    that delta and, gathered once per image, its sources.
    """
    length = len(data)
    npages = (length + page_size - 1) // page_size
    zero = set(_zero_pages(data, list(range(npages)), page_size, pages))
    nonzero = [k for k in range(npages) if k not in zero]
    refs = index.find(data, nonzero, pages, looked)
    if not refs:
        return None
    own = [k for k in nonzero if k not in refs]
    if len(own) * page_size + 16 * len(refs) > length // 2:
        return None
    delta = encode_delta(data, own, page_size, (), refs)
    return _delta_outcome(reader, "anchored", delta, refs, n, data, digest, bh, pages, read)


def _delta_outcome(
    reader: PackReader,
    kind: str,
    delta: bytes,
    refs: dict[int, Where],
    n: int,
    data: bytes,
    digest: bytes,
    bh: bytes,
    pages: bytes,
    read: int,
) -> _Outcome:
    """Block ``n`` stored as ``delta`` (a page delta, or the one delta of an anchored block)."""
    sha = blob_id(delta)
    z = None if reader.in_packs(sha) else deflate(delta)
    places = delta[: own_data_at(delta, len(refs))]  # what the page index needs of it
    srcs = frozenset(src for src, _ in refs.values())
    return _Outcome(n, data, digest, bh, pages, kind, sha, z, len(delta), read, places, srcs)


def image_tree(
    writer: PackWriter,
    manifest: Manifest,
    blocks: Mapping[int, LayerBlock],
    checks: BlockChecks | None,
    checks_id: bytes | None = None,
    sources: frozenset[bytes] = NO_SOURCES,
) -> Tree:
    """Write an image's manifest, checks, block map and sources; returns its tree.

    ``sources``: every blob the version-3 deltas the layer names may take
    reference pages from; named in a ``sources`` tree (so git reaches them),
    and the manifest then says version 2.

    ``checks`` are the blocks' blob ids and xxh3-128 (None: unknown, as for
    an entry rewritten from one saved before checks existed).  With
    ``checks_id``, a pack holds their blob already (an unchanged image: it
    is named again, not written; the caller makes sure it stays there).
    """
    man = Blob.from_string(dataclasses.replace(manifest, version=2 if sources else 1).encode())
    writer.add_object(man)
    tree = Tree()
    tree.add(MANIFEST_NAME, BLOB_MODE, man.id)
    if sources:
        src = sources_tree(sources)
        writer.add_object(src)
        tree.add(SOURCES_NAME, TREE_MODE, src.id)
    if checks is not None:
        if checks_id is None:
            chk = Blob.from_string(checks.data)
            writer.add_object(chk)
            checks_id = bytes.fromhex(chk.id.decode())
        tree.add(checks.name, BLOB_MODE, ObjectID(checks_id.hex().encode()))
    top, made = block_trees(blocks)
    for t in made:
        writer.add_object(t)
    if top is not None:
        tree.add(BLOCKS_NAME, TREE_MODE, top.id)
    writer.add_object(tree)
    return tree
