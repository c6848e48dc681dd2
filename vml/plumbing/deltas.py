"""Page delta blobs: the changed pages of a block against its parent version.

A 4 KiB write into a 1 MiB block must not cost the whole block.  A delta blob
holds the numbers of the changed pages and their new contents; applying it to
the parent's version of the block (same length) gives the new block.  Format
(all integers big-endian)::

    b"VMLD" | u8 version (1, 2 or 3) | u8 reserved=0 | u16 nsources (0 below 3)
    u32 page_size | u32 block_length | u32 count
    nsources x 20 bytes: source blob ids, strictly increasing (version 3)
    count x u32 page number (strictly increasing, flags in the top two bits)
    for each reference page, in order: u32 source index | u64 byte offset
    the data pages' bytes, in that order (the last page of a block may be short)

Version 2 adds zero pages, which memory images are full of (a guest zeroes
what it frees): a page number with its top bit set names a page that becomes
all zeros and carries no bytes.  So a delta's size counts only the bytes a
restore must read, which is what bounds stacked deltas (see images.py).
Version 1 (no zero pages) is still written when there are none.

Version 3 adds *reference* pages (issue #12): a page number with bit 30 set
names a page whose bytes are those of a source blob at a byte offset, so a
memory image's page holding what a disk block holds (the guest's page
cache) costs 16 bytes, not a page.  Every source must be named by the
``sources`` tree of the image layer that names the delta, so git reaches it
(see docs/FORMAT.md); version 3 is written only when a delta has references.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from itertools import compress

from vml.errors import CorruptRepository, newer_or_unknown

MAGIC = b"VMLD"
_HEAD = struct.Struct(">4sBBHIII")
_REF = struct.Struct(">IQ")
ZERO_PAGE = 1 << 31  # flag on a page number: the page becomes zeros, no bytes follow
REF_PAGE = 1 << 30  # flag on a page number (version 3): the page's bytes are in a source
_FLAGS = ZERO_PAGE | REF_PAGE
# A page's kind, from its number's top byte (``Delta.kinds``).
DATA, REF, ZERO, _BOTH = 0, 1, 2, 3
_KIND = bytes(b >> 6 for b in range(256))
_CLEAR = bytes(b & 0x3F for b in range(256))
_IS_REF = bytes(int(k == REF) for k in range(4)) + bytes(252)
# No block is ever larger than the largest block size a repository may use.
MAX_LENGTH = 64 << 20
# A version 3 delta names at most this many sources (restore reads each).
MAX_SOURCES = 64
NEWEST = 3

# (source blob id, byte offset): where a reference page's bytes are.
Where = tuple[bytes, int]
# Reads ``length`` bytes of source ``id`` at ``offset`` (a reference page).
SourceRead = Callable[[bytes, int, int], bytes | memoryview]


def encode_delta(
    block: bytes | memoryview,
    pages: Sequence[int],
    page_size: int,
    zero_pages: Sequence[int] = (),
    refs: Mapping[int, Where] | None = None,
) -> bytes:
    """A delta blob carrying ``pages`` of ``block`` (the new content).

    ``zero_pages`` (disjoint from ``pages``) become zeros and cost 4 bytes
    each; ``refs`` (page -> (source id, offset), disjoint from both) take
    their bytes from a source and cost 16 bytes each (version 3).
    """
    length = len(block)
    mv = memoryview(block)
    refs = refs or {}
    sources = sorted({src for src, _ in refs.values()})
    if len(sources) > MAX_SOURCES:
        raise ValueError("a delta names at most MAX_SOURCES sources")
    slot = {src: i for i, src in enumerate(sources)}
    names = sorted(
        [*pages, *(z | ZERO_PAGE for z in zero_pages), *(r | REF_PAGE for r in refs)],
        key=lambda p: p & ~_FLAGS,
    )
    version = 3 if refs else 2 if zero_pages else 1
    parts = [
        _HEAD.pack(MAGIC, version, 0, len(sources), page_size, length, len(names)),
        *sources,
        struct.pack(f">{len(names)}I", *names),
    ]
    for p in names:
        if p & REF_PAGE:
            src, off = refs[p & ~REF_PAGE]
            parts.append(_REF.pack(slot[src], off))
    for p in names:
        if not p & _FLAGS:
            start = p * page_size
            parts.append(bytes(mv[start : start + page_size]))
    return b"".join(parts)


def own_data_at(blob: bytes, nrefs: int) -> int:
    """Where the data pages begin in a delta :func:`encode_delta` just wrote with
    ``nrefs`` references (what :func:`parse_delta` finds, without its checks:
    the save that encoded it needs its header, not a re-parse of it)."""
    _magic, _version, _r1, nsrc, _ps, _length, count = _HEAD.unpack_from(blob)
    return int(_HEAD.size + 20 * nsrc + 4 * count + _REF.size * nrefs)


@dataclass(frozen=True)
class Delta:
    """A parsed, checked delta header: where each page it names gets its bytes."""

    version: int
    page_size: int
    length: int
    numbers: list[int]  # the page numbers it names, increasing (no flags)
    kinds: bytes  # one per page: DATA, ZERO or REF
    sources: tuple[bytes, ...]
    refs: list[tuple[int, int]]  # (source index, offset) per reference page, in order
    data_at: int  # offset in the blob of the first data page's bytes
    ref_pages: list[int]  # the reference pages' numbers, in order: one per ``refs``

    @property
    def pages(self) -> list[int]:
        """The page numbers with their ZERO_PAGE / REF_PAGE flags, as stored."""
        flag = (0, REF_PAGE, ZERO_PAGE)
        return [n | flag[k] for n, k in zip(self.numbers, self.kinds, strict=True)]

    def page_length(self, p: int) -> int:
        """Bytes of page ``p`` (flags cleared): the block's last page may be short."""
        return min(self.page_size, self.length - p * self.page_size)

    def places(self) -> dict[int, Where | None]:
        """Page -> where its new bytes are: ``(source, offset)`` for a reference,
        ``(b"", offset in this blob)`` for a data page, None for a zero page."""
        out: dict[int, Where | None] = {}
        pos = self.data_at
        r = 0
        for n, k in zip(self.numbers, self.kinds, strict=True):
            if k == ZERO:
                out[n] = None
            elif k == REF:
                i, off = self.refs[r]
                r += 1
                out[n] = (self.sources[i], off)
            else:
                out[n] = (b"", pos)
                pos += self.page_length(n)
        return out


def parse_delta(blob: bytes | memoryview, *, header_only: bool = False) -> Delta:
    """Parse and check a delta's header (every version).

    Every field is checked before use: a delta from a hostile repository must
    not make us write outside the block or allocate without bound.
    ``header_only``: ``blob`` is the start of a delta, at least up to its
    first data page (what a save keeps of the deltas it wrote, what a
    restore's plan reads): its length is not checked.
    """
    if len(blob) < _HEAD.size:
        raise CorruptRepository("delta blob is truncated")
    magic, version, _r1, nsrc, page_size, length, count = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptRepository("delta blob has an unknown format")
    if version not in (1, 2, 3):
        raise newer_or_unknown("delta blob", version, NEWEST)
    if _r1 or (nsrc and version < 3):
        raise CorruptRepository("delta blob has an unknown format")
    if page_size < 512 or page_size & (page_size - 1) or page_size > MAX_LENGTH:
        raise CorruptRepository("delta blob has a bad page size")
    if length == 0 or length > MAX_LENGTH:
        raise CorruptRepository("delta blob claims a block of impossible length")
    npages = (length + page_size - 1) // page_size
    if count > npages:
        raise CorruptRepository("delta blob names more pages than its block has")
    if nsrc > MAX_SOURCES:
        raise CorruptRepository("delta blob names too many sources")
    at = _HEAD.size + 20 * nsrc
    end = at + 4 * count
    if len(blob) < end:
        raise CorruptRepository("delta blob is truncated")
    sources = tuple(
        bytes(blob[_HEAD.size + 20 * i : _HEAD.size + 20 * (i + 1)]) for i in range(nsrc)
    )
    if not all(map(operator.lt, sources, sources[1:])):
        raise CorruptRepository("delta blob names its sources out of order")
    # Checked with C-level passes over the bytes, not a Python loop per page:
    # a block of a long chain may stack thousands of page entries (numbers
    # with a flag set are two-digit ints: masking each cost 0.25 us).
    raw = bytes(blob[at:end])
    tops = raw[0::4]  # each page number's top byte: its flags
    kinds = tops.translate(_KIND)
    nref, nzero = kinds.count(REF), kinds.count(ZERO)
    if kinds.count(_BOTH) or (nzero and version == 1) or (nref and version < 3):
        raise CorruptRepository("delta blob has an unknown format")
    if nref or nzero:
        clean = bytearray(raw)
        clean[0::4] = tops.translate(_CLEAR)
        raw = bytes(clean)
    numbers = list(struct.unpack(f">{count}I", raw))
    if numbers and (numbers[-1] >= npages or not all(map(operator.lt, numbers, numbers[1:]))):
        raise CorruptRepository("delta blob names a page outside its block")
    if len(blob) < end + _REF.size * nref:
        raise CorruptRepository("delta blob is truncated")
    data_at = end + _REF.size * nref
    # One C-level pass each (a memory image's block names hundreds of references).
    refs = list(_REF.iter_unpack(memoryview(blob)[end:data_at]))
    used = set(map(operator.itemgetter(0), refs))
    if (used and max(used) >= nsrc) or (version == 3 and not nref):
        raise CorruptRepository("delta blob names a source it does not list")
    if version == 3 and len(used) != nsrc:
        raise CorruptRepository("delta blob lists a source it does not use")
    data_pages = count - nref - nzero
    data_len = data_pages * page_size
    if data_pages and kinds[-1] == DATA and numbers[-1] == npages - 1:  # the last page may be short
        data_len -= npages * page_size - length
    if len(blob) != data_at + data_len and not header_only:
        raise CorruptRepository("delta blob has the wrong length")
    ref_pages = list(compress(numbers, kinds.translate(_IS_REF))) if nref else []
    return Delta(version, page_size, length, numbers, kinds, sources, refs, data_at, ref_pages)


def header_bound(length: int, page_size: int) -> int:
    """The most bytes the header of a delta on a block of ``length`` bytes may take."""
    return _HEAD.size + 20 * MAX_SOURCES + (4 + _REF.size) * -(-length // page_size)


def overwritten(deltas: Sequence[Delta]) -> list[set[int]]:
    """For each delta (oldest first), its reference pages that a newer one names again.

    Those are never read: building applies the newer delta over them.
    """
    out: list[set[int]] = [set() for _ in deltas]
    later: set[int] = set()
    for i in range(len(deltas) - 1, -1, -1):
        d = deltas[i]
        if d.ref_pages and later:
            out[i] = later.intersection(d.ref_pages)
        if i:
            later.update(d.numbers)
    return out


def delta_header(blob: bytes) -> tuple[int, int, list[int]]:
    """Parse and check a delta's header: ``(page_size, block_length, pages)``.

    A page number with :data:`ZERO_PAGE` set names a page that becomes zeros,
    one with :data:`REF_PAGE` a page whose bytes are in a source.
    """
    d = parse_delta(blob)
    return d.page_size, d.length, d.pages


def apply_delta(
    base: bytearray,
    blob: bytes,
    source: SourceRead | None = None,
    skip: set[int] | frozenset[int] = frozenset(),
    parsed: Delta | None = None,
) -> None:
    """Overwrite the pages named by ``blob`` in ``base``, in place.

    ``source`` reads a reference page's bytes (version 3); a delta with
    references and no ``source`` is refused.  Reference pages in ``skip``
    (a newer delta overwrites them) are not read.  ``parsed``: ``blob``'s
    header as :func:`parse_delta` returned it (so a caller that parsed it
    already does not parse it again).
    """
    d = parse_delta(blob) if parsed is None else parsed
    length = d.length
    if len(base) != length:
        raise CorruptRepository(
            f"delta blob is for a block of {length} bytes, the parent block has {len(base)}"
        )
    page_size = d.page_size
    numbers, kinds = d.numbers, d.kinds
    pos = d.data_at
    mv = memoryview(blob)
    # The pages of one delta are distinct: its data and zero pages first,
    # then its reference pages.  Consecutive pages of one kind are one copy
    # (or one fill): a write of 256 KiB is one run, not 64 page copies.
    i = 0
    n = len(numbers)
    while i < n:
        kind = kinds[i]
        if kind == REF:
            i += 1
            continue
        j = i + 1
        while j < n and kinds[j] == kind and numbers[j] == numbers[j - 1] + 1:
            j += 1
        start = numbers[i] * page_size
        end = min((numbers[j - 1] + 1) * page_size, length)
        if kind == ZERO:
            base[start:end] = bytes(end - start)
        else:
            base[start:end] = mv[pos : pos + end - start]
            pos += end - start
        i = j
    if d.ref_pages:
        _apply_refs(base, d, source, skip)


def _apply_refs(base: bytearray, d: Delta, source: SourceRead | None, skip: Set[int]) -> None:
    """Copy the reference pages of ``d`` not in ``skip`` into ``base``."""
    pages, refs, ps = d.ref_pages, d.refs, d.page_size
    live: Sequence[int] = (
        range(len(pages)) if not skip else [j for j, k in enumerate(pages) if k not in skip]
    )
    if not live:
        return
    if source is None:
        raise CorruptRepository("a page delta references a blob nobody can read here")
    i, n = 0, len(live)
    while i < n:
        j = live[i]
        k = pages[j]
        si, off = refs[j]
        # A run of reference pages taking adjacent bytes of one source (a
        # file's pages cached in a row) is one read.
        run = 1
        while (
            i + run < n
            and live[i + run] == j + run
            and pages[j + run] == k + run
            and refs[j + run][0] == si
            and refs[j + run][1] == off + run * ps
        ):
            run += 1
        i += run
        src = d.sources[si]
        start = k * ps
        want = min(run * ps, d.length - start)
        got = source(src, off, want)
        if len(got) != want:
            raise CorruptRepository(
                f"a page delta references bytes {off}-{off + want} of {src.hex()}, "
                "which it does not hold"
            )
        base[start : start + want] = got
