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
"""

from __future__ import annotations

import os
import tempfile
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import IO

from vml.errors import CorruptRepository, HostileRepository
from vml.plumbing.chains import ResolvedImage, SourceReader
from vml.plumbing.deltas import Delta, overwritten, parse_delta
from vml.plumbing.packs import BLOB, PackReader

MEMORY = 16 << 20  # referenced pages kept in memory; beyond, in a temporary file


class RefPages:
    """Every reference page of one image, gathered before it is built (see the module)."""

    def __init__(
        self,
        reader: PackReader,
        image: ResolvedImage,
        *,
        verify: bool,
        spill: Path | None = None,
        memory: int = MEMORY,
    ) -> None:
        self.reader = reader
        self.ps = image.manifest.page_size
        self.read_bytes = 0  # source bytes read (inflated), for tests and benchmarks
        self._fallback = SourceReader(reader, budget=0)
        # Per source: its first slot, the sorted offsets of its pages, its length.
        self._slots: dict[bytes, tuple[int, array[int], int]] = {}
        self._mem = bytearray()
        self._file: IO[bytes] | None = None
        self._memory = memory
        self._spill = spill
        needed = self._needed(image, verify)
        n = 0
        for src in sorted(needed, key=reader.position):
            # One source's offsets sorted at a time (a source holds at most
            # 64 MiB of pages): no list over the whole image.
            offsets = array("Q", sorted(set(needed.pop(src))))
            data = reader.read(src, BLOB, verify=verify)[1]
            self._slots[src] = (n, offsets, len(data))
            n += len(offsets)
            self.read_bytes += len(data)
            for off in offsets:
                self._put(data[off : off + self.ps])
        if self._file is not None:
            self._file.flush()  # read back with pread by the workers

    @classmethod
    def gather(
        cls, reader: PackReader, image: ResolvedImage, *, verify: bool, spill: Path | None = None
    ) -> RefPages | None:
        """The reference pages ``image`` needs, gathered; None when its layers name no sources."""
        if not any(r.sources for r in image.recipes.values()):
            return None
        return cls(reader, image, verify=verify, spill=spill)

    def _needed(self, image: ResolvedImage, verify: bool) -> dict[bytes, array[int]]:
        """Source -> the offsets of the pages the image's blocks take from it (repeats kept).

        A reference page that a newer delta of the same block names again is
        not needed: building never reads it.  8 bytes a referenced page (a set
        per source cost ~70): memory follows the pages an image references.
        """
        needed: dict[bytes, array[int]] = {}
        # Block by block (in the order saves wrote them): a delta belongs to one
        # block, so only one block's parsed deltas are held at a time.
        for n in image.nonzero():
            r = image.recipes[n]
            if not r.sources:
                continue
            chain = [self._parsed(d, verify) for d in r.deltas]
            for delta, skip in zip(chain, overwritten(chain), strict=True):
                if not delta.refs:
                    continue
                for page, place in delta.places().items():
                    if place is not None and place[0] and page not in skip:
                        found = needed.get(place[0])
                        if found is None:
                            found = needed[place[0]] = array("Q")
                        found.append(place[1])
        return needed

    def _parsed(self, delta: bytes, verify: bool) -> Delta:
        """Delta ``delta`` parsed; read again checking its id if it does not parse unchecked.

        An unchecked read (the block check comes later) may meet a damaged
        copy; the checked one passes over it to a good copy, or says it is damaged.
        """
        try:
            return parse_delta(self.reader.read(delta, BLOB, verify=verify)[1])
        except (CorruptRepository, HostileRepository):
            if verify:
                raise
            return parse_delta(self.reader.read(delta, BLOB)[1])

    def _put(self, page: bytes) -> None:
        slot = page + bytes(self.ps - len(page))
        if self._file is None and len(self._mem) + self.ps > self._memory:
            self._file = tempfile.TemporaryFile(dir=self._spill)  # noqa: SIM115 (closed by close())
        if self._file is None:
            self._mem += slot
        else:
            self._file.write(slot)

    def read(self, sha: bytes, offset: int, length: int, verify: bool = True) -> bytes:
        """``length`` bytes of source ``sha`` at ``offset`` (fewer when it does not hold them)."""
        found = self._slots.get(sha)
        if found is not None:
            start, offsets, size = found
            i = bisect_left(offsets, offset)
            if i < len(offsets) and offsets[i] == offset and length <= self.ps:
                slot = start + i
                n = max(0, min(length, size - offset))
                mem_slots = len(self._mem) // self.ps
                if slot < mem_slots:
                    return bytes(self._mem[slot * self.ps : slot * self.ps + n])
                assert self._file is not None
                return os.pread(self._file.fileno(), n, (slot - mem_slots) * self.ps)
        # Not gathered (a delta read differently the second time?): read it.
        return self._fallback.read(sha, offset, length, verify)

    def close(self) -> None:
        """Drop the pages (and the temporary file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()
