"""A save's page index: pages of the images already saved, found again by content.

A guest's memory holds what its disk holds: the page cache keeps the files
it read and wrote, page for page at 4 KiB alignment.  Measured on a real
guest (issue #12), three quarters of the memory pages a session changes
equal disk pages of the same state.  So while a save stores an image, each
changed page is looked up among the pages of the images saved before it in
the same save (their area-cache records hold every page's xxh3-64); a page
found there becomes a *reference* of a version-3 page delta: the bytes of
the blob that holds that page in the new entry, at their offset.

Equality is decided by the bytes, never by a hash: a candidate is read from
the source image's file and compared, so a guest that crafts colliding
xxh3 values gains nothing.  The file is the one this save read (or whose
records the area cache vouched for); :meth:`PageIndex.check` re-reads every
source's ``stat`` signature before the entry is published, so a file that
changed after it was saved makes the save fail (``FileChanged``) instead of
storing a reference to bytes it no longer holds.

A disk's own previous version can be indexed too while the disk is saved
(data copied within it, a file extracted again where a deleted copy still
lies; off by default, see ``INDEX_PARENT_VERSION``): those pages are
confirmed against the blob that holds them (a small cache of inflated
blobs), since the file itself is what is changing, and retired once the
disk is saved.  Memory images skip it: a guest rarely moves its own pages.

Memory is bounded: 12 bytes per indexed page (an 8-byte hash and a
4-byte page number; 8 per page of an image added but not looked up yet), at most ``max_pages`` pages (then only a
content-defined sample of the rest: a page whose hash is 0 modulo the
sampling rate), so a save's memory stays flat whatever the disk.  Time
too: an image's hashes are copied out of its records in one piece and
put in buckets by one plain loop when the image is first looked up (an
image read again with nothing changed never pays for it); a retired
parent version gives its buckets back.
"""

from __future__ import annotations

import os
import sys
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from operator import and_, itemgetter
from pathlib import Path

from vml.errors import FileChanged
from vml.plumbing.areas import stat_signature
from vml.plumbing.cache import BlockRecords, zero_page_hash
from vml.plumbing.chains import ResolvedImage, SourceReader
from vml.plumbing.deltas import Where, parse_delta
from vml.plumbing.manifests import Anchored, LayerBlock
from vml.plumbing.packreader import BLOB, PackReader

# Index at most this many pages in full (8 GiB of data at 4 KiB pages, 24 MiB).
MAX_PAGES = 1 << 21
# A delta takes references from at most this many sources, each giving at
# least MIN_SOURCE_PAGES of them: a restore reads each source it names, so
# a source must be worth its read.
MAX_DELTA_SOURCES = 16
MIN_SOURCE_PAGES = 4
# A page's bytes are compared with at most this many candidates of its hash:
# equal hashes of unequal pages are collisions (or crafted), never a pattern
# worth more reads.
MAX_CANDIDATES = 8
_BUCKET_BITS = 12  # at most 4096 buckets an image (about 16 pages a bucket below that)
_ALL = (1 << 64) - 1
# The hash bits the index compares (tests clear them all: every page is then
# a candidate for every other, as crafted collisions would make it).
_MASK = _ALL
# A block whose every PROBE-th changed page is unknown is taken as new data
# (found pages come in runs: files cached or copied whole).
PROBE = 8
_PLACES_CACHE = 64  # parsed deltas kept while finding where pages live
# Adjacent candidate pages are read together, at most this many at a time.
RUN_PAGES = 64
# A block in the new entry: its base blob, its deltas (oldest first), and how
# many of the newest this save wrote (their headers are kept, not in a pack yet).
_Chain = tuple[bytes | None, tuple[bytes, ...], int]
BLOB_CACHE = 8 << 20
# Source files kept open for confirming pages (a save may offer hundreds).
OPEN_FILES = 16
# Whether a disk's previous version is offered while the disk is saved (data
# copied within the disk).  Off: measured on W2 (state 6 saved over state 5,
# every file re-read), it stored 11% less (32.5 MB, not 36.6) for +0.2 s of
# a 1.3 s save, +0.3 s of CPU and +15-19 MiB of peak memory (each page is
# confirmed against the blob holding it: 1 MiB inflated and hashed), which
# the later-save and memory targets of issue 12 cannot spare.  The memory
# file's references to the disk (the guest's page cache) are the bulk.
INDEX_PARENT_VERSION = False  # blobs kept while confirming pages of a parent's version


class Budget:
    """Bytes a whole save may keep of something per page, shared by its images."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int) -> bool:
        """Take ``n`` bytes if they are left (the saving thread alone calls it)."""
        if n > self.left:
            return False
        self.left -= n
        return True


#: The headers of the deltas a save wrote (4 bytes a page they name, 12 a
#: reference) are kept so the images saved after can tell where a page lives
#: (they are not readable from a pack before the save ends): at most this
#: many bytes (4 Mi pages, 16 GiB of changed pages); the deltas past it are
#: simply not referenced, so memory stays flat whatever the change.
PLACES_BUDGET = 16 << 20


@dataclass
class SavedImage:
    """What a save stored for one image: enough to say where each of its pages lives."""

    source: Path  # the file the save read
    signature: list[int]  # its stat signature as read
    # Opens the new state's records (page hashes of blocks holding data), or
    # None when they cannot serve: opened only while the image is indexed, so
    # a save of hundreds of images holds no file of each.
    records: Callable[[], BlockRecords | None]
    parent: ResolvedImage | None  # the parent entry's version (None: a base layer)
    blocks: dict[int, LayerBlock]  # the new layer's block map
    zero: list[tuple[int, int]]  # the new layer's zero ranges
    # Headers of the deltas this save wrote (not readable from a pack yet),
    # within the save's budget: a delta of ``blocks`` missing here is unknown.
    places: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Looked:
    """The pages of one block looked up so far, and those found (before limiting)."""

    pages: set[int] = field(default_factory=set)
    refs: dict[int, Where] = field(default_factory=dict)


@dataclass
class _Indexed:
    image: SavedImage
    file: bool  # False: a parent's version, confirmed against the blobs themselves
    blocks: array[int]  # its blocks holding data, in order (page p: blocks[p // ppb], p % ppb)
    rate: int  # 1: every non-zero page; else those whose hash is 0 modulo it
    hashes: array[int] | None  # every page's hash until the buckets are built
    shift: int = 64  # bucket of a (masked) hash: hash >> shift
    keys: list[array[int]] = field(default_factory=list)  # per bucket: masked hashes
    pages: list[array[int]] = field(default_factory=list)  # per bucket: their page numbers
    retired: bool = False  # a parent's version whose image is saved: its new version serves


class PageIndex:
    """Pages of the images saved so far in this save, by xxh3-64, confirmed byte for byte.

    Images are added between images (by the saving thread) and indexed
    when first looked up (an image read whole with nothing changed never
    pays for it); :meth:`find` is called by the workers of the next image.
    """

    def __init__(
        self, reader: PackReader, page_size: int, block_size: int, max_pages: int | None = None
    ) -> None:
        self.reader = reader
        self.ps = page_size
        self.ppb = block_size // page_size
        self.max_pages = MAX_PAGES if max_pages is None else max_pages
        self.indexed = 0  # pages in the buckets (or to be: counted when added)
        self._images: list[_Indexed] = []
        self._pending = False  # an image added but not indexed yet
        self._places: OrderedDict[bytes, dict[int, Where | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._build_lock = threading.Lock()
        self._blobs = SourceReader(reader, budget=BLOB_CACHE)

    def add(self, image: SavedImage, *, parent_view: bool = False) -> int:
        """Offer ``image``'s pages (zero pages never), from its records.

        ``parent_view``: the records describe ``image.parent`` (the version
        the image being saved replaces), whose file is changing: its pages
        are confirmed against the blobs that hold them, never the file.
        """
        recs = image.records()
        if recs is None:
            return -1
        try:
            blocks = array("L", recs.data_blocks())
            if not blocks:
                return -1
            hashes = recs.all_page_hashes()
        finally:
            recs.close()
        total = self.indexed + len(hashes)
        rate = 1 if total <= self.max_pages else -(-total // self.max_pages)
        ix = _Indexed(image, not parent_view, blocks, rate, hashes)
        self._images.append(ix)
        if rate == 1:
            self.indexed += len(hashes) - hashes.count(_zero_hash(self.ps))
            self._pending = True
        else:
            self.indexed += self._build(ix)  # the next image's rate depends on the count
        return len(self._images) - 1

    def _ready(self) -> None:
        """Build the buckets of the images added since the last look-up (once, for all workers)."""
        with self._build_lock:
            if self._pending:
                for ix in self._images:
                    if ix.hashes is not None:
                        self._build(ix)
                self._pending = False

    def _build(self, ix: _Indexed) -> int:
        """Put ``ix``'s non-zero (sampled) pages in buckets by hash, in page order; their count."""
        hashes = ix.hashes
        assert hashes is not None
        ix.hashes = None
        bits = min(_BUCKET_BITS, (len(hashes) // 16).bit_length())
        shift = ix.shift = 64 - bits
        keys = ix.keys = [array("Q") for _ in range(1 << bits)]
        code = "I" if len(hashes) < 1 << 32 else "Q"  # 4-byte page numbers below 16 TiB
        pages = ix.pages = [array(code) for _ in range(1 << bits)]
        zero = _zero_hash(self.ps)
        masked = hashes if _MASK == _ALL else array("Q", map(and_, hashes, repeat(_MASK)))
        if ix.rate == 1:
            # The hot loop: one bucket append per page, nothing else.
            for p, h in enumerate(masked):
                b = h >> shift
                keys[b].append(h)
                pages[b].append(p)
            # Zero pages (every zero page has one hash) sit in one bucket: drop them there.
            zb = (zero & _MASK) >> shift
            keep = [j for j, p in enumerate(pages[zb]) if hashes[p] != zero]
            if len(keep) < len(pages[zb]):
                keys[zb] = array("Q", (keys[zb][j] for j in keep))
                pages[zb] = array(code, (pages[zb][j] for j in keep))
        else:
            for p, (h, m) in enumerate(zip(hashes, masked, strict=True)):
                if h == zero or h % ix.rate:
                    continue
                b = m >> shift
                keys[b].append(m)
                pages[b].append(p)
        return sum(map(len, keys))

    def retire(self, handle: int) -> None:
        """Stop offering the pages ``add`` returned ``handle`` for (a parent's version, once
        its image is saved: the new version's pages, confirmed by a cheap read, serve)."""
        if handle >= 0:
            ix = self._images[handle]
            ix.retired = True
            ix.hashes, ix.keys, ix.pages = None, [], []  # its memory back
            ix.shift = 64  # (looked up nowhere: every image's loop skips it)

    def find(
        self, data: bytes, pages: list[int], hashes: bytes, known: Looked | None = None
    ) -> dict[int, Where]:
        """References for those ``pages`` of a block (``data``) found in the index.

        ``known``: what an earlier call for the same block looked up (filled
        by it when given): those pages are not looked up again.  A page's
        look-up does not depend on the others asked with it, so the answer
        is the one a single call over all ``pages`` gives.

        ``hashes`` are the block's page xxh3-64, as the area cache records
        them.  A page is referenced only when its bytes equal the candidate's
        in the source file and the candidate's place in the new entry is
        known; the sources are then limited to what is worth a read.
        Candidates are tried in the order the images were added, each
        image's in page order; the first whose bytes match is taken.

        Each page's first candidate is confirmed in bulk (the candidates'
        bytes read in runs of adjacent pages: a guest caches files in runs,
        so a block's found pages take a fifth of the reads); a page whose
        first candidate differs tries the others one by one.
        """
        if not self._images:
            return {}
        if self._pending:
            self._ready()
        hs = _page_hashes(hashes)
        if len(pages) > 4 * PROBE and not any(self._present(hs[k]) for k in pages[::PROBE]):
            return {}  # new data (most changed disk blocks): a few probes, not every page
        if known is None:
            out = self._look_up(data, pages, hs)
        else:
            rest = [k for k in pages if k not in known.pages]
            out = self._look_up(data, rest, hs) if rest else {}
            asked = set(pages)
            out.update((k, w) for k, w in known.refs.items() if k in asked)
            known.pages.update(rest)
            known.refs.update(out)
        return _limit(out) if out else out

    def _look_up(self, data: bytes, pages: list[int], hs: array[int]) -> dict[int, Where]:
        """Every page of ``pages`` found, before the sources are limited (see :meth:`find`)."""
        images = self._images
        live = [(i, ix.keys, ix.pages, ix.shift) for i, ix in enumerate(images) if not ix.retired]
        mask = _MASK
        # Per image: (page, its first candidate's number), the candidates read in bulk.
        by_image: dict[int, list[tuple[int, int]]] = {}
        for k in pages:
            h = hs[k] & mask
            for i, keys, numbers, shift in live:
                b = h >> shift
                try:
                    at = keys[b].index(h)  # one scan of the bucket: most pages asked are there
                except ValueError:
                    continue
                got = by_image.get(i)
                if got is None:
                    by_image[i] = [(k, numbers[b][at])]
                else:
                    got.append((k, numbers[b][at]))
                break
        out: dict[int, Where] = {}
        wrong: list[int] = []
        for i, items in by_image.items():
            found = self._confirm_many(images[i], items, data)
            for (k, _), where in zip(items, found, strict=True):
                if where is None:
                    wrong.append(k)
                else:
                    out[k] = where
        ps = self.ps
        for k in wrong:
            # The first candidate differs (a collision, or a crafted one): the others.
            h = hs[k] & mask
            for i, keys, _, shift in live:
                bucket = keys[h >> shift]
                if h in bucket:
                    page = data[k * ps : (k + 1) * ps]
                    where = self._others(page, h, i, bucket.index(h) + 1, MAX_CANDIDATES - 1)
                    if where is not None:
                        out[k] = where
                    break
        return out

    def _others(self, page: bytes, h: int, i: int, at: int, left: int) -> Where | None:
        """The first candidate after image ``i``'s position ``at`` whose bytes are ``page``'s,
        trying at most ``left`` of them (colliding hashes, crafted ones: a bounded number
        of reads a page)."""
        for ix in self._images[i:]:
            if left <= 0:
                break
            if ix.retired:
                continue
            keys = ix.keys[h >> ix.shift]
            if h in keys:
                where, left = self._first(ix, keys, h, page, left, at)
                if where is not None:
                    return where
            at = 0
        return None

    def _first(
        self, ix: _Indexed, keys: array[int], h: int, page: bytes, left: int, at: int = 0
    ) -> tuple[Where | None, int]:
        """The first of ``ix``'s pages with hash ``h`` from position ``at`` whose bytes are
        ``page``'s, trying at most ``left`` of them; and how many more may be tried."""
        numbers = ix.pages[h >> ix.shift]
        while left:
            try:
                at = keys.index(h, at)
            except ValueError:
                break
            left -= 1
            where = self._confirm_many(ix, [(0, numbers[at])], page)[0]
            if where is not None:
                return where, left
            at += 1
        return None, left

    def _present(self, h: int) -> bool:
        """Whether a page's hash is indexed at all (no confirmation)."""
        h &= _MASK
        return any(h in ix.keys[h >> ix.shift] for ix in self._images if not ix.retired)

    def _confirm_many(
        self, ix: _Indexed, items: list[tuple[int, int]], data: bytes
    ) -> list[Where | None]:
        """For each ``(k, number)``: where ``ix``'s page ``number`` lives in the new entry,
        if its bytes are page ``k`` of ``data`` (None: they differ, or its place is unknown)."""
        ps = self.ps
        out: list[Where | None] = [None] * len(items)
        if not ix.file:
            for i, (k, number) in enumerate(items):
                j, q = divmod(number, self.ppb)
                where = self._where(ix.image, ix.blocks[j], q)
                page = data[k * ps : (k + 1) * ps]
                if where is not None and self._blobs.read(where[0], where[1], ps) == page:
                    out[i] = where
            return out
        ppb = self.ppb
        blocks = ix.blocks
        # (offset in the source file, position in items, page k, block, page in it), in
        # file order: adjacent candidates are read together.
        order = []
        for j, (k, number) in enumerate(items):
            n, q = blocks[number // ppb], number % ppb
            order.append(((n * ppb + q) * ps, j, k, n, q))
        order.sort()
        chains: dict[int, _Chain | None] = {}
        memo: dict[bytes, dict[int, Where | None] | None] = {}
        img = ix.image
        for start, buf, i0, i1 in self._pread_runs(img.source, [o[0] for o in order]):
            for off, j, k, n, q in order[i0:i1]:
                at = off - start
                if buf[at : at + ps] != data[k * ps : (k + 1) * ps]:
                    continue  # an xxh3 collision (or crafted): bytes decide
                if n in chains:
                    chain = chains[n]
                else:
                    chain = chains[n] = self._chain(img, n)
                if chain is not None and not chain[1]:
                    # No deltas: the page is in the block's base (what _place finds, inline).
                    out[j] = None if chain[0] is None else (chain[0], q * ps)
                else:
                    out[j] = self._place(img, chain, q, memo)
        return out

    def _where(self, img: SavedImage, n: int, k: int) -> Where | None:
        """Where page ``k`` of block ``n`` of ``img`` lives in the new entry (None: unknown)."""
        return self._place(img, self._chain(img, n), k, {})

    def _chain(self, img: SavedImage, n: int) -> _Chain | None:
        """Block ``n`` of ``img`` in the new entry: its base and deltas, oldest first, and
        how many of the newest this save wrote (None: its pages are not known)."""
        entry = img.blocks.get(n)
        if isinstance(entry, Anchored):
            return entry.base, entry.deltas, len(entry.deltas)
        if entry is not None:
            is_delta, sha = entry
            if not is_delta:
                return sha, (), 0
            if img.parent is None:
                return None
            recipe = img.parent.recipes[n]
            return recipe.base, (*recipe.deltas, sha), 1
        if img.parent is None or any(a <= n < b for a, b in img.zero):
            return None
        recipe = img.parent.recipes[n]
        return recipe.base, recipe.deltas, 0

    def _place(
        self,
        img: SavedImage,
        chain: _Chain | None,
        k: int,
        memo: dict[bytes, dict[int, Where | None] | None],
    ) -> Where | None:
        """Where page ``k`` of a block built by ``chain`` lives (``memo``: the deltas'
        places found so far by the caller)."""
        if chain is None:
            return None
        base, deltas, new = chain
        for i, d in enumerate(reversed(deltas)):
            if d in memo:
                places = memo[d]
            else:
                places = memo[d] = self._delta_places(d, img.places.get(d), own=i < new)
            if places is None:
                return None  # a delta of this save past the budget: not known
            if k in places:
                return _resolve(d, places[k])
        return None if base is None else (base, k * self.ps)

    def _delta_places(
        self, sha: bytes, head: bytes | None, *, own: bool
    ) -> dict[int, Where | None] | None:
        """Where each page of delta ``sha`` is: from ``head`` (a delta this save wrote,
        ``own``) or its blob (a parent's); a few parsed deltas are kept."""
        with self._lock:
            found = self._places.get(sha)
            if found is not None:
                self._places.move_to_end(sha)
                return found
        if own:
            if head is None:
                return None
            places = parse_delta(head, header_only=True).places()
        else:
            places = parse_delta(self.reader.read(sha, BLOB)[1]).places()
        with self._lock:
            self._places[sha] = places
            if len(self._places) > _PLACES_CACHE:
                self._places.popitem(last=False)
        return places

    def _pread_runs(self, path: Path, offsets: list[int]) -> list[tuple[int, bytes, int, int]]:
        """The pages at sorted ``offsets`` in ``path``, read in runs of adjacent pages (at
        most RUN_PAGES each) through a few descriptors kept open: ``(offset, bytes, i, j)``
        per run, whose bytes hold the pages of ``offsets[i:j]``.

        Under the lock: a descriptor closed by another worker's eviction
        could be reused for another file between taking it and reading.
        """
        ps = self.ps
        spans: list[list[int]] = []  # [start, end, i, j]
        for i, off in enumerate(offsets):
            last = spans[-1] if spans else None
            if last is not None and off < last[1]:
                last[3] = i + 1  # the same page again
            elif last is not None and off == last[1] and last[1] - last[0] < RUN_PAGES * ps:
                last[1] += ps
                last[3] = i + 1
            else:
                spans.append([off, off + ps, i, i + 1])
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if len(self._fds) >= OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd  # the most recently used last
            return [(a, os.pread(fd, b - a, a), i, j) for a, b, i, j in spans]

    def check(self) -> None:
        """Every source file is as it was saved; else the save must not be published."""
        for ix in self._images:
            img = ix.image
            if not ix.file:
                continue  # confirmed against blobs, which never change
            try:
                now = stat_signature(os.stat(img.source))
            except FileNotFoundError:
                now = []
            if now != img.signature:
                raise FileChanged(f"{img.source.name} changed while the save was under way")

    def close(self) -> None:
        """Close the source files."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._images = []


def _resolve(sha: bytes, place: Where | None) -> Where | None:
    """A delta's page place as a reference: its own bytes, or the reference it holds."""
    if place is None:
        return None  # a zero page: zero pages are never referenced
    src, off = place
    return (sha, off) if not src else (src, off)


def _limit(refs: dict[int, Where]) -> dict[int, Where]:
    """Keep references from at most MAX_DELTA_SOURCES sources giving MIN_SOURCE_PAGES each."""
    if not refs:
        return refs
    count = Counter(map(itemgetter(0), refs.values()))
    if len(count) <= MAX_DELTA_SOURCES and min(count.values()) >= MIN_SOURCE_PAGES:
        return refs  # every source is worth its read (the usual case)
    worth = sorted((c, s) for s, c in count.items() if c >= MIN_SOURCE_PAGES)
    keep = {s for _, s in worth[-MAX_DELTA_SOURCES:]}
    return {k: w for k, w in refs.items() if w[0] in keep}


def _page_hashes(hashes: bytes) -> array[int]:
    """A block's page hashes (big-endian, as the records hold them) as integers."""
    out = array("Q", hashes)
    if sys.byteorder == "little":
        out.byteswap()
    return out


def _zero_hash(page_size: int) -> int:
    """A zero page's xxh3-64 as the records' big-endian integers read it."""
    return int.from_bytes(zero_page_hash(page_size), "big")
