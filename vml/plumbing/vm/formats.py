"""Disk image formats: read just enough of a header or descriptor to describe a disk.

Every reader here looks at a few KiB at most (a header, or a text descriptor)
and never at the data of an image, so describing a 100 GiB disk costs the same
as describing a 1 MiB one.  Readers return ``None`` (or a ``RawDisk`` with
``None`` fields) for anything they do not understand instead of raising: a VM
folder is full of files VML has no opinion about.

Formats, with the layout each reader relies on:

* VMDK text descriptor: ``# Disk DescriptorFile``, ``createType="..."``,
  ``parentFileNameHint="..."`` and extent lines ``RW 6144 SPARSE "x.vmdk"``.
* VMDK hosted sparse extent (``KDMV``): little-endian ``SparseExtentHeader``;
  capacity (sectors) at 12, descriptorOffset/descriptorSize (sectors) at 28/36.
  monolithicSparse and streamOptimized embed their descriptor there.
* VMDK ESX sparse extent (``COWD``): capacity (sectors) at 12.
* qcow2: big-endian header; ``QFI\\xfb``, version at 4, backing file
  offset/size at 8/16, virtual size at 24; version 3 header extensions
  (after ``header_length`` at 100) may name an external data file.
* VDI: signature ``0xbeda107f`` (LE) at 0x40, version at 0x44; disk size at
  0x170 for version 1.x headers and 0x160 for version 0.
* VHD (``vpc``): 512-byte footer ``conectix`` at the end, current size at 48.
* raw: no header; virtual size is the file size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
#: Largest text descriptor we agree to read; real ones are well under 2 KiB.
MAX_DESCRIPTOR = 64 * 1024
#: Largest embedded descriptor we agree to read out of a sparse VMDK.
MAX_EMBEDDED_DESCRIPTOR = 1024 * 1024

VMDK_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
QCOW2_MAGIC = b"QFI\xfb"
VDI_SIGNATURE = 0xBEDA107F
VHD_COOKIE = b"conectix"
QCOW2_EXT_DATA_FILE = 0x44415441

#: Extension → candidate format, used only to decide which files to probe.
DISK_SUFFIXES = frozenset({".vmdk", ".qcow2", ".qcow", ".img", ".raw", ".vdi", ".vhd"})

_EXTENT_RE = re.compile(
    r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"((?:[^"\\]|\\.)*)")?(?:\s+(\d+))?\s*$'
)
_KEY_RE = re.compile(r'^\s*([A-Za-z][\w.]*)\s*=\s*"?(.*?)"?\s*$')


@dataclass(frozen=True)
class Extent:
    """One extent line of a VMDK descriptor."""

    access: str
    sectors: int
    kind: str
    filename: str | None  # ``None`` for ZERO extents, which have no file


@dataclass
class RawDisk:
    """What one image file says about itself, paths exactly as written in it.

    ``extents`` are the other files holding this disk's data (relative names
    are relative to the image's folder); ``backing`` is the parent image, if
    the image is a delta/overlay.  ``virtual_size`` is in bytes.
    """

    format: str
    virtual_size: int | None = None
    extents: list[str] = field(default_factory=list)
    backing: str | None = None


@dataclass(frozen=True)
class VmdkDescriptor:
    """The parts of a VMDK descriptor VML uses."""

    create_type: str | None
    parent_hint: str | None
    extents: tuple[Extent, ...]

    @property
    def virtual_size(self) -> int | None:
        """Sum of the extents' sizes, in bytes; ``None`` without extents."""
        if not self.extents:
            return None
        return sum(e.sectors for e in self.extents) * SECTOR


def _read_at(path: Path, offset: int, size: int) -> bytes:
    """Read up to ``size`` bytes at ``offset``; empty on any OS error."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError:
        return b""


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def parse_vmdk_descriptor(text: str) -> VmdkDescriptor | None:
    """Parse a VMDK descriptor; ``None`` if ``text`` is not one.

    A text is taken as a descriptor if it has a ``createType`` key or at least
    one extent line: qemu-img and VMware both always write ``createType``.
    """
    create_type: str | None = None
    parent_hint: str | None = None
    extents: list[Extent] = []
    for line in text.splitlines():
        line = line.strip().rstrip("\x00")
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            name = m.group(4)
            if name is not None:
                name = name.replace('\\"', '"')
            extents.append(Extent(m.group(1), int(m.group(2)), m.group(3).upper(), name))
            continue
        k = _KEY_RE.match(line)
        if not k:
            continue
        key, value = k.group(1), k.group(2)
        if key == "createType":
            create_type = value
        elif key == "parentFileNameHint" and value:
            parent_hint = value
    if create_type is None and not extents:
        return None
    return VmdkDescriptor(create_type, parent_hint, tuple(extents))


def _is_text_descriptor(head: bytes) -> bool:
    # A flat extent is arbitrary disk data, so only accept plain text that
    # looks like a descriptor; a NUL byte means binary.
    if b"\x00" in head.rstrip(b"\x00"):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "createType" in text or "Disk DescriptorFile" in text


def read_vmdk(path: Path) -> RawDisk | None:
    """Describe a ``.vmdk`` file: text descriptor, KDMV or COWD sparse extent.

    ``None`` means the file is none of these, which for a ``.vmdk`` usually
    means it is a flat extent (raw data) of another descriptor.
    """
    head = _read_at(path, 0, 512)
    if head[:4] == VMDK_MAGIC and len(head) >= 44:
        capacity, _grain, desc_off, desc_size = struct.unpack_from("<QQQQ", head, 12)
        desc: VmdkDescriptor | None = None
        if desc_off and 0 < desc_size * SECTOR <= MAX_EMBEDDED_DESCRIPTOR:
            blob = _read_at(path, desc_off * SECTOR, desc_size * SECTOR)
            desc = parse_vmdk_descriptor(blob.split(b"\x00", 1)[0].decode("utf-8", "replace"))
        if desc is None:
            # A bare sparse extent (e.g. a twoGbMaxExtentSparse "-s001" file).
            return RawDisk("vmdk-sparseExtent", capacity * SECTOR)
        fmt = "vmdk-" + (desc.create_type or "monolithicSparse")
        own = path.name
        # The embedded descriptor names the file itself as its extent.
        extents = [e.filename for e in desc.extents if e.filename and e.filename != own]
        return RawDisk(fmt, capacity * SECTOR, extents, desc.parent_hint)
    if head[:4] == COWD_MAGIC and len(head) >= 16:
        (capacity,) = struct.unpack_from("<I", head, 12)
        return RawDisk("vmdk-vmfsSparseExtent", capacity * SECTOR)
    size = _file_size(path)
    if size is None or size > MAX_DESCRIPTOR or not _is_text_descriptor(head):
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    desc = parse_vmdk_descriptor(text)
    if desc is None:
        return None
    fmt = "vmdk-" + (desc.create_type or "unknown")
    extents = [e.filename for e in desc.extents if e.filename]
    return RawDisk(fmt, desc.virtual_size, extents, desc.parent_hint)


def read_qcow2(path: Path) -> RawDisk | None:
    """Describe a qcow2 image from its header; ``None`` if it is not qcow2."""
    head = _read_at(path, 0, 4096)
    if head[:4] != QCOW2_MAGIC or len(head) < 32:
        return None
    version, bf_off, bf_size, _cluster_bits, size = struct.unpack_from(">IQIIQ", head, 4)
    disk = RawDisk("qcow2" if version >= 2 else "qcow", size)
    if bf_off and 0 < bf_size <= 1023:
        name = _read_at(path, bf_off, bf_size)
        if len(name) == bf_size:
            disk.backing = name.decode("utf-8", "replace")
    if version >= 3 and len(head) >= 104:
        (header_length,) = struct.unpack_from(">I", head, 100)
        data_file = _qcow2_data_file(head, header_length)
        if data_file:
            disk.extents.append(data_file)
    return disk


def _qcow2_data_file(head: bytes, offset: int) -> str | None:
    """Find the external data file header extension, if the image has one."""
    # Extensions are (type u32, length u32, data padded to 8) until type 0.
    while offset > 0 and offset + 8 <= len(head):
        ext_type, length = struct.unpack_from(">II", head, offset)
        if ext_type == 0:
            return None
        data = head[offset + 8 : offset + 8 + length]
        if ext_type == QCOW2_EXT_DATA_FILE:
            return data.decode("utf-8", "replace") or None
        offset += 8 + (length + 7) // 8 * 8
    return None


def read_vdi(path: Path) -> RawDisk | None:
    """Describe a VirtualBox VDI image; ``None`` if the signature is missing.

    A differencing VDI names its parent by UUID only; the ``.vbox`` file maps
    UUIDs to files, so ``backing`` is left for the caller to fill in.
    """
    head = _read_at(path, 0, 0x180)
    if len(head) < 0x48:
        return None
    signature, version = struct.unpack_from("<II", head, 0x40)
    if signature != VDI_SIGNATURE:
        return None
    major = version >> 16
    size_at = 0x170 if major >= 1 else 0x160
    size: int | None = None
    if len(head) >= size_at + 8:
        (size,) = struct.unpack_from("<Q", head, size_at)
    return RawDisk("vdi", size)


def read_vhd(path: Path) -> RawDisk | None:
    """Describe a fixed or dynamic VHD from its footer; ``None`` if not VHD."""
    size = _file_size(path)
    if size is None or size < 512:
        return None
    # Dynamic disks keep a copy of the footer at offset 0; fixed ones only at the end.
    for at in (0, size - 512):
        footer = _read_at(path, at, 512)
        if footer[:8] == VHD_COOKIE and len(footer) >= 56:
            (current,) = struct.unpack_from(">Q", footer, 48)
            return RawDisk("vpc", current)
    return None


def read_disk(path: Path) -> RawDisk | None:
    """Describe the image at ``path`` by probing its content, guided by its suffix.

    ``None`` means it is not a disk image VML recognises (or cannot be read).
    Content wins over suffix: a qcow2 image named ``.img`` is reported as qcow2.
    """
    suffix = path.suffix.lower()
    if suffix == ".vmdk":
        return read_vmdk(path)
    for reader in (read_qcow2, read_vdi):
        disk = reader(path)
        if disk is not None:
            return disk
    if suffix == ".vhd":
        return read_vhd(path)
    if suffix in (".img", ".raw"):
        head = _read_at(path, 0, 4)
        if head == VMDK_MAGIC:
            return read_vmdk(path)
        size = _file_size(path)
        return RawDisk("raw", size) if size is not None else None
    return None


def is_candidate(name: str) -> bool:
    """Whether a file name has a suffix worth probing as a disk image."""
    return os.path.splitext(name)[1].lower() in DISK_SUFFIXES


#: ``FS_IOC_FIEMAP``: ``_IOWR('f', 11, struct fiemap)``, a 32-byte header
#: followed by ``fm_extent_count`` 56-byte ``struct fiemap_extent``.
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000
#: Extents asked for per ``FIEMAP`` call: a fragmented image of a million
#: extents costs many calls, never a buffer that grows with it (28 KiB).
FIEMAP_BATCH = 512
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
#: An unwritten extent reads as zeros only if it carries no other flag that
#: says where its bytes are (delalloc, unknown, encoded, inline, tail...).
_PLAIN_UNWRITTEN = (
    FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED
)


def data_ranges(fd: int, size: int, *, skip_unwritten: bool = False) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of ``fd`` that hold data (not holes), sorted, disjoint.

    By default these are what ``SEEK_DATA``/``SEEK_HOLE`` report, leaving
    out holes and unwritten extents with no page cached (ext4 and XFS count
    an unwritten extent's cached pages as data, zeros read earlier
    included).  Nothing is written.

    ``skip_unwritten`` also leaves out every *unwritten* extent (fallocated,
    or zeroed with ``FALLOC_FL_ZERO_RANGE``, like ``mke2fs``'s journal):
    they read as zeros.  It is only true after the file's dirty pages are
    written back (a page written into an unwritten extent stays in the page
    cache while the extent is still unwritten on disk), so where the file
    has unwritten extents it asks ``FIEMAP`` with ``FIEMAP_FLAG_SYNC``,
    which writes back the file's dirty pages (no journal commit, no disk
    cache flush; it works on a read-only descriptor).  A file without
    unwritten extents costs one ``FIEMAP`` walk, no write-back.  Where
    ``FIEMAP`` fails (tmpfs, NFS, FUSE), ``SEEK_DATA`` answers; where that
    fails too, the whole file is data.  A write after the flush is not seen:
    callers compare the file's ``stat`` before and after reading it.
    """
    if skip_unwritten and size > 0:
        with contextlib.suppress(OSError):
            written = _written_ranges(fd, size)
            if written is not None:
                return written
    return _seek_ranges(fd, size)


def _seek_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after pos
            return out
        return [(0, size)]  # filesystem without SEEK_DATA: everything is data
    return out


def _written_ranges(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The data of ``fd`` without its unwritten extents; None if it has none.

    A first walk without the flush looks for an unwritten extent (and stops
    at the first): without one there is nothing to leave out, ``SEEK_DATA``
    is exact, and nothing needs writing back (a save's staged copies, or a
    file written by ``write``, are all written or delalloc).
    """
    if not any(plain_unwritten(f) for _, _, f in fiemap_extents(fd, size, 0)):
        return None
    out: list[tuple[int, int]] = []
    for a, b, flags in fiemap_extents(fd, size, FIEMAP_FLAG_SYNC):
        if plain_unwritten(flags):
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def plain_unwritten(flags: int) -> bool:
    """Whether an extent with these ``FIEMAP`` flags reads as zeros (once flushed)."""
    return bool(flags & FIEMAP_EXTENT_UNWRITTEN) and not flags & ~_PLAIN_UNWRITTEN


def fiemap_extents(fd: int, size: int, flags: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, fe_flags)`` of each extent of ``fd`` within ``[0, size)``, in order.

    ``FIEMAP_BATCH`` extents per call; ``flags`` (``FIEMAP_FLAG_SYNC``) go
    with the first call only: a write after it changes the file's ``stat``.
    Raises ``OSError`` where the file system has no ``FIEMAP``.
    """
    buf = bytearray(_FIEMAP_HEAD.size + FIEMAP_BATCH * _FIEMAP_EXTENT.size)
    pos = 0
    while pos < size:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, size - pos, flags, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        flags = 0
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if mapped == 0:
            return
        end = pos
        for i in range(mapped):
            logical, _, length, fe_flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            )
            end = min(logical + length, size)
            if end > pos:
                yield max(logical, pos), end, fe_flags
            if fe_flags & FIEMAP_EXTENT_LAST or end >= size:
                return
        if end <= pos:  # no progress: a file system answering oddly
            raise OSError(errno.EIO, "FIEMAP made no progress")
        pos = end
