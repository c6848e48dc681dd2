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

A disk's own previous version is indexed too while the disk is saved
(data copied within it, a file extracted again where a deleted copy still
lies): those pages are confirmed against the blob that holds them (a small
cache of inflated blobs), since the file itself is what is changing, and
retired once the disk is saved.  Memory images skip it: a guest rarely
moves its own pages.

Memory is bounded: 12 bytes per indexed page, at most ``max_pages`` pages
(then only a content-defined sample of the rest: a page whose hash is 0
modulo the sampling rate), so a save's memory stays flat whatever the disk.
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import FileChanged
from vml.plumbing.areas import stat_signature
from vml.plumbing.cache import BlockRecords
from vml.plumbing.chains import ResolvedImage, SourceReader
from vml.plumbing.deltas import Where, parse_delta
from vml.plumbing.manifests import Anchored, LayerBlock
from vml.plumbing.packs import BLOB, PackReader

# Index at most this many pages in full (8 GiB of data at 4 KiB pages, 24 MiB).
MAX_PAGES = 1 << 21
# A delta takes references from at most this many sources, each giving at
# least MIN_SOURCE_PAGES of them: a restore reads each source it names, so
# a source must be worth its read.
MAX_DELTA_SOURCES = 16
MIN_SOURCE_PAGES = 4
_BUCKET_BITS = 12
_REST = (1 << (64 - _BUCKET_BITS)) - 1
# A block whose every PROBE-th changed page is unknown is taken as new data
# (found pages come in runs: files cached or copied whole).
PROBE = 8
_PLACES_CACHE = 64  # parsed deltas kept while finding where pages live
BLOB_CACHE = 8 << 20  # blobs kept while confirming pages of a parent's version


@dataclass
class SavedImage:
    """What a save stored for one image: enough to say where each of its pages lives."""

    source: Path  # the file the save read
    signature: list[int]  # its stat signature as read
    records: BlockRecords  # the new state's records (page hashes of blocks holding data)
    parent: ResolvedImage | None  # the parent entry's version (None: a base layer)
    blocks: dict[int, LayerBlock]  # the new layer's block map
    zero: list[tuple[int, int]]  # the new layer's zero ranges
    # Page places of the deltas this save wrote (not readable from a pack yet).
    places: dict[bytes, dict[int, Where | None]] = field(default_factory=dict)


@dataclass
class _Indexed:
    image: SavedImage
    fd: int | None  # None: a parent's version, confirmed against the blobs themselves
    start: int  # first page number of this image in the index's numbering
    blocks: array[int]  # its blocks holding data, in order (numbering: block index * ppb + page)
    retired: bool = False  # a parent's version whose image is saved: its new version serves


class PageIndex:
    """Pages of the images saved so far in this save, by xxh3-64, confirmed byte for byte.

    Built between images (by the saving thread); :meth:`find` is called by
    the workers of the next image and only reads.
    """

    def __init__(
        self, reader: PackReader, page_size: int, block_size: int, max_pages: int = MAX_PAGES
    ) -> None:
        self.reader = reader
        self.ps = page_size
        self.ppb = block_size // page_size
        self.max_pages = max_pages
        self.indexed = 0  # pages in the buckets
        self._keys = [array("Q") for _ in range(1 << _BUCKET_BITS)]
        self._idx = [array("L") for _ in range(1 << _BUCKET_BITS)]
        self._images: list[_Indexed] = []
        self._starts: list[int] = []
        self._next = 0
        self._places: OrderedDict[bytes, dict[int, Where | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._blobs = SourceReader(reader, budget=BLOB_CACHE)

    def add(self, image: SavedImage, *, parent_view: bool = False) -> int:
        """Index ``image``'s pages (zero pages never), from its records.

        ``parent_view``: the records describe ``image.parent`` (the version
        the image being saved replaces), whose file is changing: its pages
        are confirmed against the blobs that hold them, never the file.
        """
        recs = image.records
        blocks = array("L", recs.data_blocks())
        if not blocks:
            recs.close()
            return -1
        fd = None if parent_view else os.open(image.source, os.O_RDONLY)
        start = self._next
        self._images.append(_Indexed(image, fd, start, blocks))
        self._starts.append(start)
        self._next += len(blocks) * self.ppb
        total = self.indexed + len(blocks) * self.ppb
        rate = 1 if total <= self.max_pages else -(-total // self.max_pages)
        unpack = struct.Struct(f">{self.ppb}Q").unpack
        zero = _zero_hash(self.ps)
        keys, idx = self._keys, self._idx
        for i, n in enumerate(blocks):
            hashes = unpack(recs.page_hashes(n))
            base = start + i * self.ppb
            for k, h in enumerate(hashes):
                if h == zero or (rate > 1 and h % rate):
                    continue
                b, rest = _key(h)
                keys[b].append(rest)
                idx[b].append(base + k)
                self.indexed += 1
        return len(self._images) - 1

    def retire(self, handle: int) -> None:
        """Stop offering the pages ``add`` returned ``handle`` for (a parent's version, once
        its image is saved: the new version's pages, confirmed by a cheap read, serve)."""
        if handle >= 0:
            self._images[handle].retired = True

    def find(self, data: bytes, pages: list[int], hashes: bytes) -> dict[int, Where]:
        """References for those ``pages`` of a block (``data``) found in the index.

        ``hashes`` are the block's page xxh3-64, as the area cache records
        them.  A page is referenced only when its bytes equal the candidate's
        in the source file and the candidate's place in the new entry is
        known; the sources are then limited to what is worth a read.
        """
        if not self._images:
            return {}
        if len(pages) > 4 * PROBE and not any(self._present(hashes, k) for k in pages[::PROBE]):
            return {}  # new data (most changed disk blocks): a few probes, not every page
        out: dict[int, Where] = {}
        mv = memoryview(data)
        for k in pages:
            b, rest = _key(int.from_bytes(hashes[8 * k : 8 * k + 8], "big"))
            keys = self._keys[b]
            page = bytes(mv[k * self.ps : (k + 1) * self.ps])  # bytes compare as memcmp
            at = 0
            while True:
                try:
                    at = keys.index(rest, at)
                except ValueError:
                    break
                where = self._confirm(self._idx[b][at], page)
                if where is not None:
                    out[k] = where
                    break
                at += 1
        return _limit(out)

    def _present(self, hashes: bytes, k: int) -> bool:
        """Whether page ``k``'s hash is indexed at all (no confirmation)."""
        b, rest = _key(int.from_bytes(hashes[8 * k : 8 * k + 8], "big"))
        return rest in self._keys[b]

    def _confirm(self, number: int, page: bytes) -> Where | None:
        i = bisect_right(self._starts, number) - 1
        img = self._images[i]
        if img.retired:
            return None
        j, k = divmod(number - img.start, self.ppb)
        if img.fd is None:
            where = self._where(img.image, img.blocks[j], k)
            if where is None or self._blobs.read(where[0], where[1], len(page)) != page:
                return None
            return where
        q = img.blocks[j] * self.ppb + k
        if os.pread(img.fd, len(page), q * self.ps) != page:
            return None  # an xxh3 collision (or crafted): bytes decide
        return self._where(img.image, img.blocks[j], k)

    def _where(self, img: SavedImage, n: int, k: int) -> Where | None:
        """Where page ``k`` of block ``n`` of ``img`` lives in the new entry (None: unknown)."""
        entry = img.blocks.get(n)
        deltas: tuple[bytes, ...] = ()
        base: bytes | None = None
        if isinstance(entry, Anchored):
            base, deltas = entry.base, entry.deltas
        elif entry is not None:
            is_delta, sha = entry
            if not is_delta:
                return sha, k * self.ps
            if img.parent is None:
                return None
            recipe = img.parent.recipes[n]
            base, deltas = recipe.base, (*recipe.deltas, sha)
        else:
            if img.parent is None or any(a <= n < b for a, b in img.zero):
                return None
            recipe = img.parent.recipes[n]
            base, deltas = recipe.base, recipe.deltas
        for d in reversed(deltas):
            places = img.places.get(d)
            if places is None:
                places = self._delta_places(d)
            if k in places:
                return _resolve(d, places[k])
        return None if base is None else (base, k * self.ps)

    def _delta_places(self, sha: bytes) -> dict[int, Where | None]:
        with self._lock:
            found = self._places.get(sha)
            if found is not None:
                self._places.move_to_end(sha)
                return found
        places = parse_delta(self.reader.read(sha, BLOB)[1]).places()
        with self._lock:
            self._places[sha] = places
            if len(self._places) > _PLACES_CACHE:
                self._places.popitem(last=False)
        return places

    def check(self) -> None:
        """Every source file is as it was saved; else the save must not be published."""
        for ix in self._images:
            img = ix.image
            if ix.fd is None:
                continue  # confirmed against blobs, which never change
            if (
                stat_signature(os.fstat(ix.fd)) != img.signature
                or stat_signature(os.stat(img.source)) != img.signature
            ):
                raise FileChanged(f"{img.source.name} changed while the save was under way")

    def close(self) -> None:
        """Close the source files and the records."""
        for ix in self._images:
            if ix.fd is not None:
                os.close(ix.fd)
            ix.image.records.close()
        self._images = []
        self._starts = []


def _key(h: int) -> tuple[int, int]:
    """A page hash's bucket and the bits kept in it."""
    return h >> (64 - _BUCKET_BITS), h & _REST


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
    count: dict[bytes, int] = {}
    for src, _ in refs.values():
        count[src] = count.get(src, 0) + 1
    worth = sorted((c, s) for s, c in count.items() if c >= MIN_SOURCE_PAGES)
    keep = {s for _, s in worth[-MAX_DELTA_SOURCES:]}
    return {k: w for k, w in refs.items() if w[0] in keep}


_ZERO_HASH: dict[int, int] = {}


def _zero_hash(page_size: int) -> int:
    h = _ZERO_HASH.get(page_size)
    if h is None:
        import xxhash

        h = _ZERO_HASH[page_size] = xxhash.xxh3_64_intdigest(bytes(page_size))
    return h
