"""Page delta blobs: the changed pages of a block against its parent version.

A 4 KiB write into a 1 MiB block must not cost the whole block.  A delta blob
holds the numbers of the changed pages and their new contents; applying it to
the parent's version of the block (same length) gives the new block.  Format
(all integers big-endian)::

    b"VMLD" | u8 version (1 or 2) | u8 reserved=0 | u16 reserved=0
    u32 page_size | u32 block_length | u32 count
    count x u32 page number (strictly increasing)
    the pages' bytes, in that order (the last page of a block may be short)

Version 2 adds zero pages, which memory images are full of (a guest zeroes
what it frees): a page number with its top bit set names a page that becomes
all zeros and carries no bytes.  So a delta's size counts only the bytes a
restore must read, which is what bounds stacked deltas (see images.py).
Version 1 (no zero pages) is still written when there are none.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence

from vml.errors import CorruptRepository, newer_or_unknown

MAGIC = b"VMLD"
_HEAD = struct.Struct(">4sBBHIII")
ZERO_PAGE = 1 << 31  # flag on a page number: the page becomes zeros, no bytes follow
# No block is ever larger than the largest block size a repository may use.
MAX_LENGTH = 64 << 20


def encode_delta(
    block: bytes | memoryview,
    pages: Sequence[int],
    page_size: int,
    zero_pages: Sequence[int] = (),
) -> bytes:
    """A delta blob carrying ``pages`` of ``block`` (the new content).

    ``zero_pages`` (disjoint from ``pages``) become zeros and cost 4 bytes each.
    """
    length = len(block)
    mv = memoryview(block)
    names = sorted([*pages, *(z | ZERO_PAGE for z in zero_pages)], key=lambda p: p & ~ZERO_PAGE)
    parts = [
        _HEAD.pack(MAGIC, 2 if zero_pages else 1, 0, 0, page_size, length, len(names)),
        struct.pack(f">{len(names)}I", *names),
    ]
    for p in names:
        if not p & ZERO_PAGE:
            start = p * page_size
            parts.append(bytes(mv[start : start + page_size]))
    return b"".join(parts)


def delta_header(blob: bytes) -> tuple[int, int, list[int]]:
    """Parse and check a delta's header: ``(page_size, block_length, pages)``.

    A page number with :data:`ZERO_PAGE` set names a page that becomes zeros.

    Every field is checked before use: a delta from a hostile repository must
    not make us write outside the block or allocate without bound.
    """
    if len(blob) < _HEAD.size:
        raise CorruptRepository("delta blob is truncated")
    magic, version, _r1, _r2, page_size, length, count = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptRepository("delta blob has an unknown format")
    if version not in (1, 2):
        raise newer_or_unknown("delta blob", version, 2)
    if page_size < 512 or page_size & (page_size - 1) or page_size > MAX_LENGTH:
        raise CorruptRepository("delta blob has a bad page size")
    if length == 0 or length > MAX_LENGTH:
        raise CorruptRepository("delta blob claims a block of impossible length")
    npages = (length + page_size - 1) // page_size
    if count > npages:
        raise CorruptRepository("delta blob names more pages than its block has")
    end = _HEAD.size + 4 * count
    if len(blob) < end:
        raise CorruptRepository("delta blob is truncated")
    pages = list(struct.unpack_from(f">{count}I", blob, _HEAD.size))
    # Checked with C-level passes, not a Python loop per page: a block of a
    # long chain may stack thousands of page entries.
    zero = [p for p in pages if p & ZERO_PAGE]
    if zero and version == 1:
        raise CorruptRepository("delta blob has an unknown format")
    numbers = [p & ~ZERO_PAGE for p in pages] if zero else pages
    if numbers and (numbers[-1] >= npages or not all(map(operator.lt, numbers, numbers[1:]))):
        raise CorruptRepository("delta blob names a page outside its block")
    data_pages = count - len(zero)
    data_len = data_pages * page_size
    if data_pages and pages[-1] == npages - 1:  # the block's last page may be short
        data_len -= npages * page_size - length
    if len(blob) != end + data_len:
        raise CorruptRepository("delta blob has the wrong length")
    return page_size, length, pages


def apply_delta(base: bytearray, blob: bytes) -> None:
    """Overwrite the pages named by ``blob`` in ``base``, in place."""
    page_size, length, pages = delta_header(blob)
    if len(base) != length:
        raise CorruptRepository(
            f"delta blob is for a block of {length} bytes, the parent block has {len(base)}"
        )
    pos = _HEAD.size + 4 * len(pages)
    mv = memoryview(blob)
    # Consecutive pages of one kind are one copy (or one fill): a write of
    # 256 KiB is one run, not 64 page copies.
    i = 0
    n = len(pages)
    while i < n:
        p = pages[i]
        j = i + 1
        while j < n and pages[j] == pages[j - 1] + 1:
            j += 1
        start = (p & ~ZERO_PAGE) * page_size
        end = min(((pages[j - 1] & ~ZERO_PAGE) + 1) * page_size, length)
        if p & ZERO_PAGE:
            base[start:end] = bytes(end - start)
        else:
            base[start:end] = mv[pos : pos + end - start]
            pos += end - start
        i = j
