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
from concurrent.futures import Executor

from vml.errors import CorruptRepository, NoSpace
from vml.plumbing.cache import BlockRecords, RecordsWriter, block_hash, page_hashes
from vml.plumbing.chains import ResolvedImage, materialize, ordered_map
from vml.plumbing.images import WINDOW, Digests, block_digest, zeros
from vml.plumbing.packs import PackReader
from vml.plumbing.repository import libc, start_writeback
from vml.progress import Advance

# Start writeback of a file being built every this many blocks written.
_WRITEBACK_BLOCKS = 32
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


def _damaged(n: int) -> str:
    return f"block {n} of a file does not match its check; the repository is damaged"


# (block, bytes written, block id, xxh3-128, cache record or None for a zero block)
_Built = tuple[int, int, bytes, bytes, bytes | None]


def write_image(
    reader: PackReader,
    pool: Executor,
    image: ResolvedImage,
    fd: int,
    old: ResolvedImage | None,
    progress: Advance,
    record_out: RecordsWriter | None = None,
    old_records: BlockRecords | None = None,
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
    """
    m = image.manifest
    bs = m.block_size
    ps = m.page_size
    ppb = bs // ps
    want_records = record_out is not None
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

    def zero(n: int, length: int) -> _Built:
        return n, 0, block_digest(None, length), b"", None

    def keep(n: int, length: int) -> _Built:
        # The file holds this block already; its record says what it is.
        if old_records is not None and old_records.nblocks > n:
            rec = old_records.stored(n)
            if rec is None:
                return zero(n, length)
            return n, 0, bytes(rec[:20]), bytes(rec[20:36]), bytes(rec)
        data = os.pread(fd, length, n * bs)
        if len(data) != length:
            raise CorruptRepository("the area's file is shorter than its entry says")
        if data == zeros(length):
            return zero(n, length)
        dg = block_digest(data, length)
        bh = block_hash(data)
        return n, 0, dg, bh, (dg + bh + page_hashes(data, ps, ppb)) if want_records else None

    def build(n: int) -> _Built:
        # Workers write their own block (pwrite at an offset is thread safe)
        # and hash it, so the ordered consumer below only combines digests.
        length = m.block_length(n)
        recipe = image.recipes[n]
        if old is not None and old.recipe(n, length) == recipe:
            return keep(n, length)
        check = image.check(n)
        # With the entry's checks, each block is checked once, built, with the
        # xxh3 the area cache needs anyway, and its id is read, not hashed;
        # without them, each object is checked by id as it is read.
        built = materialize(reader, recipe, length, verify=check is None)
        if built is None or built == zeros(length):
            # All zero (deltas may zero a whole block): a hole, never data.
            if check is not None and check[0] != block_digest(None, length):
                raise CorruptRepository(_damaged(n))
            if old is not None:
                punch_hole(fd, n * bs, length)
            return zero(n, length)
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
        # The block's id: from its checks, or the block map for a whole block
        # (checked as it was read), else hashed.  The image's digest over
        # these ids is checked at the end.
        if check is not None:
            dg = check[0]
        elif recipe.base is not None and not recipe.deltas:
            dg = recipe.base
        else:
            dg = block_digest(built, length)
        rec = dg + bh + page_hashes(built, ps, ppb) if want_records else None
        return n, length, dg, bh, rec

    digests = Digests(m.size, bs)
    written = 0
    blocks_written = 0
    done = 0
    results = ordered_map(pool, build, iter(todo), WINDOW)
    try:
        for n, nw, dg, bh, rec in results:
            digests.block(n, dg, bh)
            if nw:
                written += nw
                blocks_written += 1
                if blocks_written % _WRITEBACK_BLOCKS == 0:
                    start_writeback(fd)  # the final fsync then waits for little
            if record_out is not None and rec is not None:
                record_out.add(n, rec)
            end = min((n + 1) * bs, m.size)
            progress(end - done)
            done = end
    finally:
        results.close()  # workers stop before the caller closes the file
    digests.zeros_until(m.nblocks)
    if m.size > done:
        progress(m.size - done)
    if digests.hash.hexdigest() != m.sha256:
        raise CorruptRepository(
            "a rebuilt image does not match its digest; the repository is damaged"
        )
    return written
