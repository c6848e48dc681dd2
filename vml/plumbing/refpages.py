"""The reference pages an image needs, each source read once, in pack order.

A version-3 page delta takes some pages from other blobs (a memory image's
pages from the disk blocks the guest cached).  Building block by block and
reading each referenced blob as it comes would read a blob once per block
that names it: a memory image's blocks reference disk blocks all over the
disk, so a bounded cache thrashes (measured on a real guest: 3 GiB of
sources read to restore 256 MiB of memory through a 8 MiB cache).  So
before an image is built, :class:`RefPages` reads the headers of the deltas
that may hold references, then reads each source blob **once**, in pack
order, and keeps just the pages needed: in memory up to a budget, then in
an unnamed temporary file.  Building then takes them from there.  Restore
cost follows what the image holds: the sources once each, plus one copy of
the referenced pages, whatever the order of the blocks.

A checkout into a new folder does better still: each image's needs are
planned before the images are built (:meth:`RefPages.plan`), and the
blobs an earlier image's build reads and checks (a memory image's sources
are the disk's blocks) give up their pages as they are read
(:meth:`RefPages.capture`); :meth:`RefPages.complete` then reads only the
sources nothing captured.
"""

from __future__ import annotations

import os
import tempfile
import threading
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, wait
from contextlib import closing
from pathlib import Path
from typing import IO, TypeVar

from vml.errors import CorruptRepository, HostileRepository
from vml.plumbing.chains import ResolvedImage, SourceReader
from vml.plumbing.deltas import header_bound, overwritten, parse_delta
from vml.plumbing.packreader import BLOB, PackReader

MEMORY = 16 << 20  # referenced pages kept in memory; beyond, in a temporary file


class RefPages:
    """Every reference page of one image, gathered before it is built (see the module).

    Built in three steps: :meth:`__init__` (an empty store), :meth:`plan`
    (which pages the image needs), then :meth:`complete` (read the sources
    not captured yet).  In between, :meth:`capture` takes the pages from
    blobs another image's build has just read and checked (a memory
    image's pages from the disk's blocks): those are not read again.
    """

    def __init__(
        self,
        reader: PackReader,
        image: ResolvedImage | None = None,
        *,
        verify: bool = True,
        spill: Path | None = None,
        memory: int = MEMORY,
        pool: Executor | None = None,
    ) -> None:
        self.reader = reader
        self.ps = image.manifest.page_size if image is not None else 0
        self.read_bytes = 0  # source bytes read (inflated), for tests and benchmarks
        self.captured_bytes = 0  # source bytes whose pages were captured, for the same
        self._fallback = SourceReader(reader, budget=0)
        # Per source: its first slot, the sorted offsets of its pages, its length.
        self._slots: dict[bytes, tuple[int, array[int], int]] = {}
        self._wanted: dict[bytes, array[int]] = {}
        self._nslots = 0
        self._lock = threading.Lock()
        self._mem = bytearray()
        self._file: IO[bytes] | None = None
        self._memory = memory
        self._spill = spill
        self._verify = verify
        if image is not None:
            self.plan(image, verify)
            self.complete(pool)

    def plan(self, image: ResolvedImage, verify: bool) -> None:
        """Note the pages ``image`` needs (reads its deltas' headers); nothing is gathered yet."""
        self.ps = image.manifest.page_size
        self._verify = verify
        wanted = self._needed(image)
        with self._lock:
            # Published whole: until then, capture() takes nothing.
            self._wanted = wanted

    def capture(self, sha: bytes, data: bytes, checked: bool) -> None:
        """Keep the needed pages of blob ``sha``, whose bytes are ``data`` (checked by the caller).

        ``checked``: ``data`` was read checking its id.  When not (the block
        built from it passed the block's check instead), the bytes a newer
        delta overwrote were never looked at: only an image with block
        checks of its own, which catch such a page, takes them.
        Thread safe; a blob not needed, or captured already, costs a look-up.
        """
        if sha not in self._wanted or (self._verify and not checked):
            return
        with self._lock:
            found = self._wanted.pop(sha, None)
        if found is None:
            return  # another worker took it
        offsets = array("Q", sorted(set(found)))
        chunk = _pages(data, offsets, self.ps)
        with self._lock:
            self._store(sha, offsets, len(data), chunk)
            self.captured_bytes += len(data)

    def complete(self, pool: Executor | None = None) -> None:
        """Read every needed source not captured, once each, in pack order."""
        reader = self.reader
        verify = self._verify
        with self._lock:
            needed, self._wanted = self._wanted, {}

        def todo() -> Iterator[tuple[bytes, array[int]]]:
            for src in sorted(needed, key=reader.position):
                # One source's offsets sorted at a time (a source holds at
                # most 64 MiB of pages): no list over the whole image.
                yield src, array("Q", sorted(set(needed.pop(src))))

        def take(item: tuple[bytes, array[int]]) -> tuple[bytes, array[int], int, bytes]:
            src, offsets = item
            data = reader.read(src, BLOB, verify=verify)[1]
            return src, offsets, len(data), _pages(data, offsets, self.ps)

        # Sources are inflated by the pool's workers, a few MiB ahead, and
        # their pages stored here in pack order.
        sized = ((item, reader.object_size(item[0]) or self.ps) for item in todo())
        with closing(_in_order(pool, take, sized, _AHEAD)) as gathered:
            for src, offsets, size, chunk in gathered:
                with self._lock:
                    self._store(src, offsets, size, chunk)
                self.read_bytes += size
        if self._file is not None:
            self._file.flush()  # read back with pread by the workers

    def _store(self, src: bytes, offsets: array[int], size: int, chunk: bytes) -> None:
        """Give ``src``'s pages the next slots (the caller holds the lock)."""
        self._slots[src] = (self._nslots, offsets, size)
        self._nslots += len(offsets)
        self._put(chunk)

    @classmethod
    def gather(
        cls,
        reader: PackReader,
        image: ResolvedImage,
        *,
        verify: bool,
        spill: Path | None = None,
        pool: Executor | None = None,
    ) -> RefPages | None:
        """The reference pages ``image`` needs, gathered; None when its layers name no sources."""
        if not any(r.sources for r in image.recipes.values()):
            return None
        return cls(reader, image, verify=verify, spill=spill, pool=pool)

    def _needed(self, image: ResolvedImage) -> dict[bytes, array[int]]:
        """Source -> the offsets of the pages the image's blocks take from it (repeats kept).

        A reference page that a newer delta of the same block names again is
        not needed: building never reads it.  8 bytes a referenced page (a set
        per source cost ~70): memory follows the pages an image references.
        Only each delta's header is inflated, unchecked: a plan says what to
        gather, and a page is gathered from its source, checked, by its
        place there, whatever the plan.  A block whose deltas do not parse
        is left out (its build reads what it needs, or says it is damaged).
        """
        needed: dict[bytes, array[int]] = {}
        m = image.manifest
        # Block by block (in the order saves wrote them): a delta belongs to one
        # block, so only one block's parsed deltas are held at a time.
        for n in image.nonzero():
            r = image.recipes[n]
            if not r.sources:
                continue
            bound = header_bound(m.block_length(n), m.page_size)
            try:
                chain = [
                    parse_delta(self.reader.read_head(d, bound), header_only=True) for d in r.deltas
                ]
            except (CorruptRepository, HostileRepository):
                continue
            for delta, skip in zip(chain, overwritten(chain), strict=True):
                if not delta.refs:
                    continue
                per = [needed.get(src) for src in delta.sources]
                for k, (i, off) in zip(delta.ref_pages, delta.refs, strict=True):
                    if k in skip:
                        continue
                    found = per[i]
                    if found is None:
                        found = per[i] = needed[delta.sources[i]] = array("Q")
                    found.append(off)
        return needed

    def _put(self, pages: bytes) -> None:
        """Store whole pages (slots) after the ones stored: in memory up to the budget, then in the file."""
        room = 0 if self._file is not None else max(0, self._memory - len(self._mem))
        room -= room % self.ps
        if room:
            self._mem += pages[:room]
        if len(pages) > room:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._spill)  # noqa: SIM115 (closed by close())
            self._file.write(pages[room:])

    def read(self, sha: bytes, offset: int, length: int, verify: bool = True) -> bytes:
        """``length`` bytes of source ``sha`` at ``offset`` (fewer when it does not hold them).

        Several pages at once when they were gathered as adjacent pages of
        the source (a run of reference pages): their slots are adjacent too.
        """
        found = self._slots.get(sha)
        if found is not None:
            start, offsets, size = found
            ps = self.ps
            k = max(1, -(-length // ps))
            i = bisect_left(offsets, offset)
            if (
                (i < len(offsets) and offsets[i] == offset)
                if k == 1
                else offsets[i : i + k] == array("Q", range(offset, offset + k * ps, ps))
            ):
                return self._slot_bytes(start + i, k, max(0, min(length, size - offset)))
        # Not gathered (a delta read differently the second time?): read it.
        return self._fallback.read(sha, offset, length, verify)

    def _slot_bytes(self, slot: int, k: int, n: int) -> bytes:
        """The first ``n`` bytes of ``k`` slots from ``slot`` on."""
        ps = self.ps
        mem_slots = len(self._mem) // ps
        if slot + k <= mem_slots:
            return bytes(self._mem[slot * ps : slot * ps + n])
        if slot >= mem_slots:
            assert self._file is not None
            return os.pread(self._file.fileno(), n, (slot - mem_slots) * ps)
        head = bytes(self._mem[slot * ps : slot * ps + n])  # the budget ends inside the run
        return head + self._slot_bytes(mem_slots, slot + k - mem_slots, n - len(head))

    def close(self) -> None:
        """Drop the pages (and the temporary file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()


# Bytes of sources being inflated ahead of the one whose pages are stored.
_AHEAD = 8 << 20


def _pages(data: bytes, offsets: array[int], ps: int) -> bytes:
    """The pages of ``data`` at ``offsets``, each a whole slot (a short one padded with zeros)."""
    mv = memoryview(data)
    parts: list[bytes | memoryview] = [mv[off : off + ps] for off in offsets]
    i = len(parts) - 1
    while i >= 0 and len(parts[i]) < ps:  # offsets are sorted: only the last ones run short
        parts[i] = bytes(parts[i]) + bytes(ps - len(parts[i]))
        i -= 1
    return b"".join(parts)


T = TypeVar("T")
R = TypeVar("R")


def _in_order(
    pool: Executor | None, fn: Callable[[T], R], items: Iterable[tuple[T, int]], ahead: int
) -> Generator[R, None, None]:
    """``fn`` over ``items`` (each with its size), in order, on ``pool``, at most ``ahead`` bytes in flight.

    At least one item is always in flight, whatever its size.  Without a
    pool, in this thread.  When the consumer stops, queued items are
    cancelled and running ones waited for.
    """
    if pool is None:
        for item, _size in items:
            yield fn(item)
        return
    queue: deque[tuple[Future[R], int]] = deque()
    held = 0
    try:
        for item, size in items:
            while queue and held + size > ahead:
                fut, done = queue.popleft()
                held -= done
                yield fut.result()
            queue.append((pool.submit(fn, item), size))
            held += size
        while queue:
            yield queue.popleft()[0].result()
    finally:
        for fut, _size in queue:
            fut.cancel()
        wait([fut for fut, _size in queue])
