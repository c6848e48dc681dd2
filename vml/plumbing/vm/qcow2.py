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
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
_COMPRESSED = 1 << 62
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_EXTL2 = 1 << 4
_BITMAP_ENTRY = struct.Struct(
    ">QIIBBHI"
)  # table offset, table size, flags, type, gran, name, extra


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


def _l1(fd: int, h: Header) -> list[int]:
    return [e for (e,) in struct.iter_unpack(">Q", _pread(fd, 8 * h.l1_size, h.l1_offset))]


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


def _l2_tables(fd: int, h: Header, l1: list[int]) -> dict[int, bytes]:
    return {
        e & _OFFSET_MASK: _pread(fd, h.cluster_size, e & _OFFSET_MASK)
        for e in l1
        if e & _OFFSET_MASK
    }


def _all_data(h: Header, tables: dict[int, bytes]) -> set[tuple[int, int]]:
    """Host ranges of every data cluster some guest cluster maps."""
    entries: set[int] = set()
    for table in tables.values():
        arr = array("Q", table)
        if sys.byteorder == "little":
            arr.byteswap()  # L2 entries are big-endian
        entries.update(arr)  # C speed: the set is as large as the data, not the disk
    entries.discard(0)
    return {r for e in entries if (r := _host_range(h, e)) is not None}


def _dirty_data(
    h: Header, l1: list[int], tables: dict[int, bytes], dirty: list[tuple[int, int]]
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
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def data_clusters(fd: int) -> set[tuple[int, int]]:
    """Host ranges of every data cluster the image maps now (its L2 tables read whole).

    Read before a live save's pause, from a running QEMU's image: QEMU may
    not have written its newest L2 entries yet, so this may lack clusters
    allocated last, never hold one that is not data (clusters never move):
    what it lacks is copied, which costs bytes, never correctness.
    """
    h = read_header(fd)
    return _all_data(h, _l2_tables(fd, h, _l1(fd, h)))


def changed_ranges(
    fd: int, dirty: list[tuple[int, int]], known_data: set[tuple[int, int]] | None = None
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
    if known_data is None:
        tables = _l2_tables(fd, h, l1)
        known_data = _all_data(h, tables)
    else:
        tables = _dirty_tables(fd, h, l1, dirty)
    written = _dirty_data(h, l1, tables, dirty)
    taken = merge_ranges(sorted(known_data | written))
    rest: list[tuple[int, int]] = []
    pos = 0
    for a, b in taken:
        if pos < a:
            rest.append((pos, a))
        pos = max(pos, b)
    size = os.fstat(fd).st_size
    if pos < size:
        rest.append((pos, size))
    return merge_ranges(sorted(written)), rest


def _dirty_tables(
    fd: int, h: Header, l1: list[int], dirty: list[tuple[int, int]]
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
