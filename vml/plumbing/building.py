"""Building an image back into a file: each block that holds data written once, checked.

Only blocks that are not all zero are built and written; the rest of a new
file stays a hole (``ftruncate``), and over a file known to hold another
entry only blocks whose recipe differs are touched.  So writing an image
costs what it holds, not its size: a 1 TiB disk holding 4 MiB writes
4 MiB.  Each built block is checked against the entry's checks (or, for
an entry saved before checks existed, every object id as it is read), and
the image's digest (a hash list of its blocks' ids) at the end; zero blocks
enter the digest in bulk.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

from vml.errors import CorruptRepository, HostileRepository, NoSpace
from vml.plumbing.cache import BlockRecords, RecordsWriter, block_hash, page_hashes
from vml.plumbing.chains import (
    WINDOW,
    Recipe,
    Recipes,
    ResolvedImage,
    SourceReader,
    Sources,
    materialize,
    ordered_map,
)
from vml.plumbing.digests import Digests, block_digest, zeros
from vml.plumbing.packreader import PackReader
from vml.plumbing.refpages import RefPages
from vml.plumbing.repository import WriteBehind, libc
from vml.progress import Advance

# Send a file being built to the disk, and out of the page cache, this many
# bytes at a time (see WriteBehind).
_WRITE_BEHIND = 32 << 20
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


#: Zeros this long inside a block are left (or made) a hole, not written.
HOLE_GRAIN = 4096


def zero_pages(data: bytes, grain: int = HOLE_GRAIN) -> set[int]:
    """The indices of ``data``'s whole ``grain``-byte pages that are all zero.

    Cheap on data without them: only pages whose first and last bytes are
    zero are compared (one in 65536 of random pages).
    """
    z = zeros(grain)
    firsts = data[: len(data) - len(data) % grain : grain]
    lasts = data[grain - 1 :: grain]
    out: set[int] = set()
    k = firsts.find(0)
    while k >= 0:
        if lasts[k] == 0 and data[k * grain : (k + 1) * grain] == z:
            out.add(k)
        k = firsts.find(0, k + 1)
    return out


def write_sparse(fd: int, data: bytes, offset: int, fresh: bool) -> int:
    """Write a block, leaving its zero ``HOLE_GRAIN`` pages as holes; bytes written.

    A block holding a little data (a file system's metadata in a big disk)
    comes back taking that data's space, as it was saved.  ``fresh``: the
    range is a hole already (a new file); otherwise its zero runs are
    punched, since they may hold the file's old bytes.
    """
    g = HOLE_GRAIN
    zero = zero_pages(data, g)
    if not zero:
        write_all(fd, data, offset)
        return len(data)
    mv = memoryview(data)
    pages = -(-len(data) // g)
    written = 0
    k = 0
    while k < pages:
        is_zero = k in zero
        e = k
        while e < pages and (e in zero) == is_zero:
            e += 1
        a, b = k * g, min(e * g, len(data))
        if not is_zero:
            write_all(fd, mv[a:b], offset + a)
            written += b - a
        elif not fresh:
            punch_hole(fd, offset + a, b - a)
        k = e
    return written


def _damaged(n: int) -> str:
    return f"block {n} of a file does not match its check; the repository is damaged"


# (block, bytes written, block id, xxh3-128, cache record or None for a zero block)
_Built = tuple[int, int, bytes, bytes, bytes | None]


class _ImageBuild:
    """Builds the blocks of one image into an open file (workers call :meth:`build`)."""

    def __init__(
        self,
        reader: PackReader,
        image: ResolvedImage,
        fd: int,
        old: ResolvedImage | None,
        old_records: BlockRecords | None,
        want_records: bool,
        sources: Sources | None = None,
        capture: Sequence[RefPages] = (),
    ) -> None:
        self.reader = reader
        self.image = image
        self.m = image.manifest
        self.fd = fd
        self.old = old
        self.old_records = old_records
        self.want_records = want_records
        # Reference pages of version-3 deltas, gathered before (each source read once).
        self.sources = sources
        # Stores of images built later that keep pages of the blobs read here.
        self.capture = capture

    def zero(self, n: int, length: int) -> _Built:
        return n, 0, block_digest(None, length), b"", None

    def keep(self, n: int, length: int) -> _Built:
        """The file holds this block already; its record (or its bytes) says what it is."""
        recs = self.old_records
        if recs is not None and recs.nblocks > n:
            rec = recs.stored(n)
            if rec is None:
                return self.zero(n, length)
            return n, 0, bytes(rec[:20]), bytes(rec[20:36]), bytes(rec)
        data = os.pread(self.fd, length, n * self.m.block_size)
        if len(data) != length:
            raise CorruptRepository("the area's file is shorter than its entry says")
        if data == zeros(length):
            return self.zero(n, length)
        dg = block_digest(data, length)
        bh = block_hash(data)
        if not self.want_records:
            return n, 0, dg, bh, None
        ps = self.m.page_size
        return n, 0, dg, bh, dg + bh + page_hashes(data, ps, self.m.block_size // ps)

    def _verified(
        self, n: int, recipe: Recipe, length: int, check: tuple[bytes, bytes]
    ) -> bytes | None:
        """Block ``n`` built again checking every object id; data must match its check.

        For damage somewhere: this passes over a damaged copy when another
        pack holds a good one.  None or zeros: the caller checks the zero block.
        """
        built = materialize(self.reader, recipe, length, sources=SourceReader(self.reader))
        if built is not None and built != zeros(length) and block_hash(built) != check[1]:
            raise CorruptRepository(_damaged(n))
        return built

    def build(self, n: int) -> _Built:
        """Build block ``n``, check it, write it (or punch a hole); its id and record."""
        # Workers write their own block (pwrite at an offset is thread safe)
        # and hash it, so the ordered consumer only combines digests.
        m = self.m
        length = m.block_length(n)
        recipe = self.image.recipes[n]
        if self.old is not None and self.old.recipe(n, length) == recipe:
            return self.keep(n, length)
        check = self.image.check(n)
        # With the entry's checks, each block is checked once, built, with the
        # xxh3 the area cache needs anyway, and its id is read, not hashed;
        # without them, each object is checked by id as it is read.
        seen: list[tuple[bytes, bytes]] | None = [] if self.capture else None
        try:
            built = materialize(
                self.reader, recipe, length, verify=check is None, sources=self.sources, seen=seen
            )
        except (CorruptRepository, HostileRepository):
            if check is None:
                raise  # every object was checked by id: the damage is real
            # Objects read unchecked (their streams' Adler-32 not computed
            # either): a damaged copy may fail to apply; read them verified.
            built = self._verified(n, recipe, length, check)
            seen = None
        if built is None or built == zeros(length):
            # All zero (deltas may zero a whole block): a hole, never data.
            if check is not None and check[0] != block_digest(None, length):
                raise CorruptRepository(_damaged(n))
            if self.old is not None:
                punch_hole(self.fd, n * m.block_size, length)
            return self.zero(n, length)
        bh = block_hash(built) if check is not None or self.want_records else b""
        if check is not None and bh != check[1]:
            # Damage somewhere (data where the check says zeros is damage too).
            built = self._verified(n, recipe, length, check)
            if built is None or built == zeros(length):
                raise CorruptRepository(_damaged(n))
            bh = check[1]
            seen = None  # what was read first is not to be trusted
        if seen:
            # Later images take their reference pages from these blobs, not
            # from reading them again.  Each object's id was checked, or the
            # block built from them passed its check: a damaged copy fails
            # that nearly always, and otherwise (damage only in bytes a delta
            # overwrote) the later image's own block check fails, and that
            # block is built again from objects read checked; an image with
            # no checks takes only objects read checked.
            for sha, blob in seen:
                for store in self.capture:
                    store.capture(sha, blob, checked=check is None)
        written = write_sparse(self.fd, built, n * m.block_size, fresh=self.old is None)
        # The block's id: from its checks, or the block map for a whole block
        # (checked as it was read), else hashed.  The image's digest over
        # these ids is checked at the end.
        if check is not None:
            dg = check[0]
        elif recipe.base is not None and not recipe.deltas:
            dg = recipe.base
        else:
            dg = block_digest(built, length)
        if not self.want_records:
            return n, written, dg, bh, None
        return (
            n,
            written,
            dg,
            bh,
            dg + bh + page_hashes(built, m.page_size, m.block_size // m.page_size),
        )


def _to_build(image: ResolvedImage, old: ResolvedImage, todo: list[int]) -> ResolvedImage:
    """``image`` with only the blocks an in-place build writes (their recipe differs)."""
    keep = Recipes()
    m = image.manifest
    for n in todo:
        r = image.recipes[n]
        if r.sources and old.recipe(n, m.block_length(n)) != r:
            keep[n] = r
    return ResolvedImage(m, keep)


def write_image(
    reader: PackReader,
    pool: Executor,
    image: ResolvedImage,
    fd: int,
    old: ResolvedImage | None,
    progress: Advance,
    record_out: RecordsWriter | None = None,
    old_records: BlockRecords | None = None,
    spill: Path | None = None,
    planned: RefPages | None = None,
    capture: Sequence[RefPages] = (),
) -> int:
    """Write ``image`` into the open file ``fd`` and check its digest.

    With ``old`` (what the file holds now, known to be clean), only blocks
    whose recipe differs are written; the others are taken as they are, with
    their digests from ``old_records`` (the area cache) or, without it, read
    back and hashed.  Without ``old``, ``fd`` must be an empty file: the
    blocks holding data are written, the rest stays a hole.  Blocks are
    built, written and hashed by the pool's workers; the area cache's
    records of the blocks holding data go to ``record_out``.  Returns the
    bytes written.

    ``planned``: this image's reference pages, planned (see
    :class:`RefPages`) before earlier images were built and partly
    captured from them (a new file only: it holds every block's pages);
    ``capture``: the stores of images built later, which keep pages of
    the blobs this build reads.
    """
    m = image.manifest
    try:
        os.ftruncate(fd, m.size)  # sparse: unwritten blocks stay holes
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL):
            raise NoSpace(f"cannot make a file of {m.size} bytes here ({e.strerror})") from None
        raise
    # Blocks zero in the image (and, in place, in the old file too) hold
    # zeros already: only the others are visited.
    todo = image.nonzero()
    if old is not None:
        # (blocks beyond the new size went with the ftruncate)
        todo = sorted(set(todo).union(old.nonzero_in(0, m.nblocks)))
    # Only the blocks to build need their reference pages.
    wanted = image if old is None else _to_build(image, old, todo)
    if planned is not None and old is None:
        planned.complete(pool)
        refs: RefPages | None = planned
    else:
        if planned is not None:
            planned.close()
        refs = RefPages.gather(reader, wanted, verify=image.checks is None, spill=spill, pool=pool)
    job = _ImageBuild(reader, image, fd, old, old_records, record_out is not None, refs, capture)
    digests = Digests(m.size, m.block_size)
    written = done = 0
    behind = WriteBehind(fd, max(_WRITE_BEHIND, m.block_size))
    results = ordered_map(pool, job.build, iter(todo), WINDOW)
    try:
        for n, nw, dg, bh, rec in results:
            digests.block(n, dg, bh)
            written += nw
            # Results come in block order: every block up to n is written.
            behind.advance((n + 1) * m.block_size)
            if record_out is not None and rec is not None:
                record_out.add(n, rec)
            end = min((n + 1) * m.block_size, m.size)
            progress(end - done)
            done = end
    finally:
        results.close()  # workers stop before the caller closes the file
        if refs is not None:
            refs.close()
    digests.zeros_until(m.nblocks)
    if m.size > done:
        progress(m.size - done)
    if digests.hash.hexdigest() != m.sha256:
        raise CorruptRepository(
            "a rebuilt image does not match its digest; the repository is damaged"
        )
    return written
