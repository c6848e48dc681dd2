"""Where a qcow2 image may have changed, given the guest clusters a dirty bitmap marks.

A dirty bitmap counts *guest* offsets; VML stores the image *file*.  The
host clusters that hold the data of *clean* guest clusters (not marked)
cannot have changed: qcow2 writes a data cluster only when the guest
writes its guest cluster (or allocates it for that), and never moves one.
Everything else of the file may have: the dirty clusters' host clusters,
all metadata (header, L1 and L2 tables, refcounts, the persistent bitmaps'
directory, tables and data, which QEMU rewrites when it stores bitmaps at
each migration and close), and clusters freed since (QEMU discards freed
bitmap clusters: their bytes become a hole).  So :func:`changed_ranges`
answers the whole file minus the clean data clusters: small where the data
is clean, since a qcow2 file holds little else.

It reads the header, the L1 table and every L2 table (metadata: 64 KiB per
512 MiB of guest space at 64 KiB clusters; their entries are turned into a
set at C speed), never the data.  Features that break the reasoning above
(an external data file, extended L2 entries, internal snapshots, whose
deletion frees shared clusters) make it raise ``Unmappable`` with the
reason: the caller then reads the whole file.

It also reads the persistent dirty bitmaps an image at rest holds
(:func:`stored_bitmaps`, :func:`stored_dirty_ranges`): the header's bitmaps
extension, the bitmap directory, each bitmap's table and its clusters of
bits, as QEMU stores them when it closes the image.  That is what
``qemu-img info`` and ``qemu-nbd -B`` would answer, without starting them.
"""

from __future__ import annotations

import heapq
import os
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
_COMPRESSED = 1 << 62
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_EXTL2 = 1 << 4
# A bitmap directory entry: table offset, table size, flags, type, granularity
# bits, name size, extra data size (then the extra data and the name).
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")
_EXT_BITMAPS = 0x23852875
_AUTOCLEAR_BITMAPS = 1  # the bitmaps extension is consistent
_BITMAP_IN_USE = 1
_BITMAP_AUTO = 2
_BITMAP_EXTRA_OK = 4
_DIRTY_TRACKING = 1
# QEMU's own limits: a bitmap directory or table beyond them is damaged (and
# is not read into memory).
_MAX_BITMAPS = 65535
_MAX_BITMAP_DIRECTORY = 64 << 20
_MAX_BITMAP_TABLE = 0x8000000  # entries
_MAX_L1_ENTRIES = (32 << 20) // 8  # QEMU's QCOW_MAX_L1_SIZE


class Unmappable(Exception):
    """This image cannot be mapped here (the reason is the message)."""


@dataclass(frozen=True)
class Header:
    """What :func:`changed_ranges` needs of a qcow2 header."""

    version: int
    cluster_bits: int
    size: int
    crypt: int
    l1_size: int
    l1_offset: int
    refcount_offset: int
    refcount_clusters: int
    snapshots: int
    incompatible: int
    header_length: int

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits


def _pread(fd: int, size: int, offset: int) -> bytes:
    # Bounded by the file before anything is allocated: a damaged or crafted
    # header may name a table of gigabytes, and os.pread allocates its size.
    if size < 0 or offset < 0 or offset + size > os.fstat(fd).st_size:
        raise Unmappable("the image is shorter than its metadata says")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise Unmappable("the image is shorter than its metadata says")
    return data


def read_header(fd: int) -> Header:
    """Parse the header; ``Unmappable`` for anything but a plain qcow2 (v2 or v3)."""
    head = os.pread(fd, 112, 0)
    if len(head) < 72 or head[:4] != MAGIC:
        raise Unmappable("not a qcow2 image")
    version, _bfo, _bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_cl, nsnap, _so = (
        struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
    )
    incompat, hlen = 0, 72
    if version >= 3:
        if len(head) < 104:
            raise Unmappable("a truncated qcow2 v3 header")
        incompat = struct.unpack_from(">Q", head, 72)[0]
        hlen = struct.unpack_from(">I", head, 100)[0]
    elif version != 2:
        raise Unmappable(f"qcow2 version {version}")
    h = Header(version, cbits, size, crypt, l1_size, l1_off, rt_off, rt_cl, nsnap, incompat, hlen)
    if not 9 <= cbits <= 21:
        raise Unmappable("an impossible cluster size")
    if incompat & _INCOMPAT_DATA_FILE:
        raise Unmappable("its data lives in an external data file")
    if incompat & _INCOMPAT_EXTL2:
        raise Unmappable("it uses extended L2 entries")
    if crypt:
        raise Unmappable("it is encrypted")
    if nsnap:
        raise Unmappable("it holds internal snapshots")
    return h


def _l1(fd: int, h: Header) -> array[int]:
    if h.l1_size > _MAX_L1_ENTRIES:
        raise Unmappable("an impossible L1 table")
    return _words(_pread(fd, 8 * h.l1_size, h.l1_offset))


def _words(data: bytes) -> array[int]:
    """Big-endian 64-bit entries (L1 and L2 tables), at C speed."""
    arr = array("Q", data)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr


def _host_range(h: Header, e: int) -> tuple[int, int] | None:
    """The host bytes an L2 entry points at (None: no cluster)."""
    if e & _COMPRESSED:
        x = 62 - (h.cluster_bits - 8)
        off = e & ((1 << x) - 1)
        sectors = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return off, (off & ~511) + 512 * sectors
    if e & _OFFSET_MASK:
        return e & _OFFSET_MASK, (e & _OFFSET_MASK) + h.cluster_size
    return None


class DataMap:
    """The host clusters of a qcow2 file that hold guest data: one byte per cluster of the file.

    Memory follows the file (16 KiB per GiB at 64 KiB clusters), never the
    number of clusters mapped: a 100 GiB image with every cluster mapped
    (``preallocation=metadata``, or a full disk) once took 650 MiB and 8 s
    as a set of ranges.  Compressed clusters, which share host clusters,
    are kept as merged byte ranges (a compressed image's are written in
    order: few runs).
    """

    def __init__(self, h: Header, size: int) -> None:
        self.cluster_bits = h.cluster_bits
        self.size = size
        self.plain = bytearray((size + h.cluster_size - 1) >> h.cluster_bits)
        self.packed: list[tuple[int, int]] = []

    def add_table(self, h: Header, table: bytes) -> None:
        """Mark the data clusters one L2 table maps."""
        cbits, plain, packed = h.cluster_bits, self.plain, []
        entries = _words(table)
        if (run := _one_run(h, entries)) is not None:
            a, b = run
            plain[a:b] = b"\1" * len(plain[a:b])  # past the file's end: nothing to read
            return
        for e in set(entries):  # distinct entries: a table maps each cluster once
            if e & _COMPRESSED:
                r = _host_range(h, e)
                if r is not None:
                    packed.append(r)
                continue
            off = e & _OFFSET_MASK
            # Cluster 0 is the header; an unaligned offset is damage (QEMU
            # refuses it): neither is clean data, so both stay to be read.
            if off and not off & (h.cluster_size - 1) and (i := off >> cbits) < len(plain):
                plain[i] = 1  # past the file's end: nothing there to read
        if packed:
            self.packed = merge_ranges(self.packed + merge_ranges(packed))

    def runs(self) -> Iterator[tuple[int, int]]:
        """The data's host ranges, sorted and merged."""
        cbits, plain = self.cluster_bits, self.plain
        packed = iter(self.packed)

        def clusters() -> Iterator[tuple[int, int]]:
            pos = 0
            while (a := plain.find(1, pos)) >= 0:
                b = plain.find(0, a)
                pos = len(plain) if b < 0 else b
                yield a << cbits, min(pos << cbits, self.size)

        return _union(heapq.merge(clusters(), packed))


def _one_run(h: Header, entries: array[int]) -> tuple[int, int] | None:
    """The host clusters ``[a, b)`` of an L2 table that maps consecutive clusters in order, if so.

    What a disk written front to back, or preallocated, mostly holds: such
    a table is compared whole at C speed instead of entry by entry.
    """
    first, n, cs = entries[0], len(entries), h.cluster_size
    off = first & _OFFSET_MASK
    if not off or off & (cs - 1) or first & _COMPRESSED:
        return None
    last = first + (n - 1) * cs
    if entries[-1] != last or last & ~_OFFSET_MASK != first & ~_OFFSET_MASK:
        return None  # not one run (most tables fail here), or offsets running into the flags
    if entries != array("Q", range(first, last + 1, cs)):
        return None
    return off >> h.cluster_bits, (off >> h.cluster_bits) + n


def _union(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Sorted ``ranges`` merged where they touch or overlap, one at a time."""
    cur: tuple[int, int] | None = None
    for a, b in ranges:
        if cur is not None and a <= cur[1]:
            cur = (cur[0], max(cur[1], b))
        else:
            if cur is not None and cur[0] < cur[1]:
                yield cur
            cur = (a, b)
    if cur is not None and cur[0] < cur[1]:
        yield cur


def _data_map(fd: int, h: Header, l1: array[int]) -> DataMap:
    """Every data cluster the image maps, its L2 tables read one at a time."""
    found = DataMap(h, os.fstat(fd).st_size)
    read: set[int] = set()  # a table two L1 entries name is read once
    for e in l1:
        off = e & _OFFSET_MASK
        if off and off not in read:
            read.add(off)
            found.add_table(h, _pread(fd, h.cluster_size, off))
    return found


def _dirty_data(
    h: Header, l1: array[int], tables: dict[int, bytes], dirty: list[tuple[int, int]]
) -> set[tuple[int, int]]:
    """Host ranges of the data clusters of the dirty guest ranges."""
    cs = h.cluster_size
    per_l2 = cs // 8
    out: set[tuple[int, int]] = set()
    for start, end in dirty:
        for cluster in range(start // cs, (min(end, h.size) + cs - 1) // cs):
            i1, i2 = divmod(cluster, per_l2)
            if i1 >= len(l1) or not l1[i1] & _OFFSET_MASK:
                continue  # no L2 table: nothing allocated there
            e = struct.unpack_from(">Q", tables[l1[i1] & _OFFSET_MASK], 8 * i2)[0]
            r = _host_range(h, e)
            if r is not None:
                out.add(r)
    return out


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``[start, end)`` ranges (empty ones dropped)."""
    return list(_union(sorted(r for r in ranges if r[0] < r[1])))


def data_clusters(fd: int) -> DataMap:
    """Every data cluster the image maps now (its L2 tables read one at a time).

    Read before a live save's pause, from a running QEMU's image: QEMU may
    not have written its newest L2 entries yet, so this may lack clusters
    allocated last, never hold one that is not data (clusters never move):
    what it lacks is copied, which costs bytes, never correctness.
    """
    h = read_header(fd)
    return _data_map(fd, h, _l1(fd, h))


def changed_ranges(
    fd: int, dirty: list[tuple[int, int]], known_data: DataMap | None = None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """File ranges of a qcow2 image that may differ where only ``dirty`` guest ranges were written.

    ``dirty`` are guest ``[start, end)`` ranges; the answer is the whole
    file but the clean guest clusters' data (see the module doc), in two
    parts: the dirty clusters' data (written by the guest), and the rest
    (metadata, bitmaps, freed clusters: mostly unchanged, worth comparing
    page by page before copying).  ``known_data`` is :func:`data_clusters`
    read a moment before (so a pause reads only the L2 tables of the dirty
    clusters).  Raises ``Unmappable`` with the reason for an image this
    cannot map.
    """
    h = read_header(fd)
    l1 = _l1(fd, h)
    data = _data_map(fd, h, l1) if known_data is None else known_data
    written = merge_ranges(sorted(_dirty_data(h, l1, _dirty_tables(fd, h, l1, dirty), dirty)))
    rest: list[tuple[int, int]] = []
    pos = 0
    for a, b in _union(heapq.merge(data.runs(), written)):
        if pos < a:
            rest.append((pos, a))
        pos = max(pos, b)
    size = os.fstat(fd).st_size
    if pos < size:
        rest.append((pos, size))
    return written, rest


def _dirty_tables(
    fd: int, h: Header, l1: array[int], dirty: list[tuple[int, int]]
) -> dict[int, bytes]:
    """The L2 tables that map the dirty guest ranges."""
    span = h.cluster_size * (h.cluster_size // 8)  # guest bytes one L2 table maps
    wanted = {
        l1[i] & _OFFSET_MASK
        for start, end in dirty
        for i in range(start // span, min((end + span - 1) // span, len(l1)))
        if l1[i] & _OFFSET_MASK
    }
    return {off: _pread(fd, h.cluster_size, off) for off in wanted}


# --- persistent dirty bitmaps ---------------------------------------------------


@dataclass(frozen=True)
class StoredBitmap:
    """One persistent bitmap of a qcow2 image at rest, as its bitmap directory lists it.

    ``in_use``: a QEMU had the image open with it and did not store it back
    (it crashed, or still runs): its bits are not to be trusted.  So is every
    bitmap of an image whose bitmaps extension is not flagged consistent (a
    program that does not know bitmaps wrote the image since).
    """

    name: str
    in_use: bool
    auto: bool  # recording: QEMU updates it with every write
    granularity: int
    table_offset: int
    table_size: int


def _extensions(fd: int, h: Header) -> Iterator[tuple[int, bytes]]:
    """The header extensions of a v3 image: ``(type, data)``, within the first cluster."""
    area = os.pread(fd, h.cluster_size - h.header_length, h.header_length)
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == 0:
            return
        data = area[pos + 8 : pos + 8 + length]
        if len(data) != length:
            raise Unmappable("a header extension runs past the first cluster")
        yield kind, data
        pos += 8 + (length + 7) // 8 * 8
    raise Unmappable("the header extensions have no end")


def stored_bitmaps(fd: int) -> list[StoredBitmap]:
    """The persistent bitmaps of a qcow2 image at rest (its bitmap directory, read here).

    What ``qemu-img info`` lists, without starting it.  Raises
    ``Unmappable`` for an image whose bitmap directory cannot be read.
    """
    head = os.pread(fd, 104, 0)
    if len(head) < 104 or head[:4] != MAGIC:
        raise Unmappable("not a qcow2 image")
    version, cbits = struct.unpack_from(">I", head, 4)[0], struct.unpack_from(">I", head, 20)[0]
    if version < 3:
        return []  # bitmaps need qcow2 v3
    if not 9 <= cbits <= 21:
        raise Unmappable("an impossible cluster size")
    autoclear = struct.unpack_from(">Q", head, 88)[0]
    hlen = struct.unpack_from(">I", head, 100)[0]
    if not 104 <= hlen < 1 << cbits:
        raise Unmappable("an impossible header length")
    h = Header(3, cbits, 0, 0, 0, 0, 0, 0, 0, 0, hlen)
    ext = next((d for kind, d in _extensions(fd, h) if kind == _EXT_BITMAPS), None)
    if ext is None:
        return []
    if len(ext) < 24:
        raise Unmappable("a truncated bitmaps extension")
    count, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", ext)
    if count > _MAX_BITMAPS or dir_size > _MAX_BITMAP_DIRECTORY:
        raise Unmappable("an impossible bitmap directory")
    directory = _pread(fd, dir_size, dir_offset)
    consistent = bool(autoclear & _AUTOCLEAR_BITMAPS)
    out = []
    pos = 0
    for _ in range(count):
        if pos + _BITMAP_ENTRY.size > len(directory):
            raise Unmappable("a truncated bitmap directory")
        t_off, t_size, flags, kind, gbits, nlen, extra = _BITMAP_ENTRY.unpack_from(directory, pos)
        start = pos + _BITMAP_ENTRY.size + extra
        name = directory[start : start + nlen]
        if len(name) != nlen or kind != _DIRTY_TRACKING or not 9 <= gbits <= 31:
            raise Unmappable("an impossible bitmap directory entry")
        if extra and not flags & _BITMAP_EXTRA_OK:
            raise Unmappable("a bitmap with extra data this reader does not know")
        out.append(
            StoredBitmap(
                name.decode("utf-8", errors="replace"),
                bool(flags & _BITMAP_IN_USE) or not consistent,
                bool(flags & _BITMAP_AUTO),
                1 << gbits,
                t_off,
                t_size,
            )
        )
        pos = (start + nlen + 7) // 8 * 8
    return out


def stored_dirty_ranges(fd: int, bitmap: StoredBitmap) -> list[tuple[int, int]]:
    """The guest ``[start, end)`` ranges a stored bitmap marks dirty, merged.

    Its bitmap table names one cluster of bits per ``cluster_size * 8``
    chunks of ``granularity`` bytes (an entry of 0: none set, 1: all set);
    bit ``k`` of the bitmap (least significant bit of each byte first)
    covers guest bytes ``[k * granularity, (k + 1) * granularity)``.
    """
    head = _pread(fd, 32, 0)
    cbits, size = struct.unpack_from(">IQ", head, 20)
    cs = 1 << cbits
    gran = bitmap.granularity
    nbits = (size + gran - 1) // gran
    per_cluster = cs * 8  # bits one data cluster holds
    if bitmap.table_size != (nbits + per_cluster - 1) // per_cluster:
        raise Unmappable(f"bitmap {bitmap.name} does not cover the disk")
    if bitmap.table_size > _MAX_BITMAP_TABLE:
        raise Unmappable(f"bitmap {bitmap.name} has an impossible table")
    raw = _pread(fd, 8 * bitmap.table_size, bitmap.table_offset)
    out: list[tuple[int, int]] = []

    def mark(first: int, last: int) -> None:  # bits [first, last), merged with the last run
        a, b = first * gran, min(last, nbits) * gran
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))

    for i, (e,) in enumerate(struct.iter_unpack(">Q", raw)):
        base = i * per_cluster
        off = e & _OFFSET_MASK
        if e & ~(_OFFSET_MASK | 1) or (off and e & 1) or off & (cs - 1):
            raise Unmappable(f"bitmap {bitmap.name} has a damaged table entry")
        if not off:
            if e & 1:  # every bit of this cluster set
                mark(base, base + per_cluster)
            continue
        words = array("Q", _pread(fd, cs, off))
        if sys.byteorder != "little":
            words.byteswap()  # the bits are stored least significant byte first
        for k, w in [(k, w) for k, w in enumerate(words) if w]:
            at = base + 64 * k
            while w:
                low = (w & -w).bit_length() - 1  # the first set bit
                run = (~(w >> low) & ((w >> low) + 1)).bit_length() - 1  # how many follow it
                mark(at + low, at + low + run)
                w &= ~(((1 << run) - 1) << low)
    # Clip to the disk: bits past its end (the last cluster's) mark nothing.
    return [(a, min(b, size)) for a, b in out if a < size]
