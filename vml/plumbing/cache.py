"""The area cache: what an area's files looked like when they matched its entry.

It lives in ``<area>/.vml/cache/``: per file its ``stat`` signature and
digest, and per large file a records file with one record for each block
that holds data (the block's git blob id, xxh3-128 of the block, xxh3-64
of each page), so that an unchanged file is not read and a changed one's
changed pages are found without reading the repository.  A block without a
record is all zero: holes and zero blocks cost nothing, so the cache of a
1 TiB disk holding 4 MiB is a few KiB.  The cache is only an accelerator:
when it is missing or stale, VML reads what it needs from the repository
instead, and when it cannot be written (no space left), the command says so
and carries on without it.

A damaged cache must cost a rescan, never a wrong entry (a record's blob id
or page hashes are trusted for blocks the file shares with its entry).  So
``index.json`` carries the xxh3-128 of its own content, and each records
file ``<n>.blocks`` a sidecar ``<n>.blocks.sum`` with the xxh3-128 of its
bytes.  The index is checked when the cache is loaded, a records file when
one of its records is first read (so an unchanged image costs nothing); one
that does not match is ignored as if missing, and a warning says so once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import sys
import threading
from array import array
from bisect import bisect_left
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from vml.plumbing.areas import vml_dir
from vml.plumbing.repository import write_atomic

log = logging.getLogger("vml")

CACHE_NAME = "cache"
CACHE_TMP = "cache.tmp"
# Bumped whenever the record layout changes; older caches are ignored.
# 4: checksums over the index and each records file.
# 5: records only for blocks that hold data, with an index and a trailer.
CACHE_FORMAT = 5
SUM_SUFFIX = ".sum"
# The records file's trailer: magic, version, file size, records, block and page size.
_TRAILER = struct.Struct("<4sIQQII")
_MAGIC = b"VMLR"


def _doc_check(doc: dict[str, Any]) -> str:
    """The checksum of an index document (without its ``check`` key)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return str(xxhash.xxh3_128_hexdigest(canonical))


def _encode_index(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "check"}
    return json.dumps({**body, "check": _doc_check(body)}).encode()


def _damaged(area: Path, what: str) -> None:
    log.warning(
        "the area cache of %s is damaged (%s): VML reads those files again instead", area, what
    )


@dataclass
class CachedFile:
    """The cache's record of one file."""

    kind: str
    size: int
    sha256: str
    stat: list[int]
    pages: str | None = None  # name of the per-block record file (images)


def _record_size(page_size: int, block_size: int) -> int:
    return 36 + 8 * (block_size // page_size)


_ZERO_RECORDS: dict[tuple[int, int, int], bytes] = {}


def zero_block_record(length: int, page_size: int, block_size: int) -> bytes:
    """The record of an all-zero block of ``length`` bytes (never stored: implied)."""
    key = (length, page_size, block_size)
    rec = _ZERO_RECORDS.get(key)
    if rec is None:
        z = bytes(length)
        blob = hashlib.sha1(b"blob %d\0" % length + z).digest()
        rec = blob + block_hash(z) + page_hashes(z, page_size, block_size // page_size)
        _ZERO_RECORDS[key] = rec
    return rec


class BlockRecords:
    """Read-only view of one image's per-block hashes (memory-mapped).

    Only blocks holding data have a record; every other block of the file
    (``nblocks`` of them in all) is all zero and answers the zero record.
    The file's checksum is checked when it is first asked anything: a file
    that does not match answers as if it held no records (every block is
    then read and hashed afresh).
    """

    def __init__(self, path: Path, page_size: int, block_size: int, area: Path) -> None:
        self.rec = _record_size(page_size, block_size)
        self.page_size = page_size
        self.block_size = block_size
        self.path = path
        self._area = area
        self._f = open(path, "rb")  # noqa: SIM115 (lives as long as the mmap)
        self._bytes = os.fstat(self._f.fileno()).st_size
        self._mm: mmap.mmap | None = None
        self._size = 0
        self._nblocks = 0
        self._index = array("I")
        self._checked = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        # Workers of a save ask for records at once: one of them checks.
        with self._lock:
            if self._checked:
                return
            try:
                want = self.path.with_name(self.path.name + SUM_SUFFIX).read_text().strip()
            except (OSError, UnicodeDecodeError):
                want = None
            try:
                if self._bytes:
                    self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
                have = xxhash.xxh3_128_hexdigest(self._mm if self._mm is not None else b"")
                if want != have:
                    _damaged(self._area, f"the block records of {self.path.name}")
                else:
                    self._parse(self._bytes)
            except (ValueError, OSError, struct.error):
                self._index = array("I")
                self._nblocks = 0  # unreadable: answers nothing, as if missing
            self._checked = True

    def _parse(self, size: int) -> None:
        if self._mm is None or size < _TRAILER.size:
            raise ValueError("no trailer")
        magic, version, fsize, count, bs, ps = _TRAILER.unpack_from(self._mm, size - _TRAILER.size)
        if (magic, version, bs, ps) != (_MAGIC, 1, self.block_size, self.page_size):
            raise ValueError("another layout")
        if count * (self.rec + 4) + _TRAILER.size != size:
            raise ValueError("truncated")
        at = count * self.rec
        self._index.frombytes(self._mm[at : at + 4 * count])
        if sys.byteorder == "big":
            self._index.byteswap()
        self._size = fsize
        self._nblocks = (fsize + self.block_size - 1) // self.block_size

    @property
    def nblocks(self) -> int:
        """Blocks of the file the records describe (0 when they cannot be trusted)."""
        if not self._checked:
            self._check()
        return self._nblocks

    @property
    def size(self) -> int:
        """The size of the file the records describe."""
        if not self._checked:
            self._check()
        return self._size

    @property
    def count(self) -> int:
        """Blocks of the file the records describe (zero blocks included)."""
        return self.nblocks

    def data_blocks(self) -> array[int]:
        """The blocks that hold data, in increasing order."""
        if not self._checked:
            self._check()
        return self._index

    def _slot(self, n: int) -> int | None:
        i = bisect_left(self._index, n)
        return i if i < len(self._index) and self._index[i] == n else None

    def _length(self, n: int) -> int:
        return min(self.block_size, self._size - n * self.block_size)

    def record(self, n: int) -> bytes | None:
        """Block ``n``'s whole record (the zero record for a zero block), None beyond the file."""
        if n >= self.nblocks:
            return None
        i = self._slot(n)
        if i is None or self._mm is None:
            return zero_block_record(self._length(n), self.page_size, self.block_size)
        return self._mm[i * self.rec : (i + 1) * self.rec]

    def stored(self, n: int) -> bytes | None:
        """Block ``n``'s record if it holds data (None for a zero block or beyond the file)."""
        if n >= self.nblocks or self._mm is None:
            return None
        i = self._slot(n)
        return None if i is None else self._mm[i * self.rec : (i + 1) * self.rec]

    def block_digest(self, n: int) -> bytes | None:
        """Blob id of block ``n`` as cached, or None beyond the cached file."""
        r = self.record(n)
        return None if r is None else r[:20]

    def block_hash(self, n: int) -> bytes | None:
        """xxh3-128 of block ``n`` as cached, or None beyond the cached file."""
        r = self.record(n)
        return None if r is None else r[20:36]

    def page_hashes_or_none(self, n: int) -> bytes | None:
        """The xxh3-64 of every page of block ``n``, or None beyond the cached file."""
        r = self.record(n)
        return None if r is None else r[36:]

    def page_hashes(self, n: int) -> bytes:
        """The xxh3-64 of every page of block ``n``, concatenated."""
        r = self.record(n)
        assert r is not None
        return r[36:]

    def all_page_hashes(self) -> array[int]:
        """Every data block's page xxh3-64, in the order of :meth:`data_blocks` (native order).

        One bulk copy out of the mapped records (8 bytes a page), not a
        look-up per block: what a save's page index is built from.
        """
        out = array("Q")
        if not self._checked:
            self._check()
        if self._mm is None or not self._index:
            return out
        rec, mm = self.rec, self._mm
        out.frombytes(b"".join(mm[i * rec + 36 : (i + 1) * rec] for i in range(len(self._index))))
        if sys.byteorder == "little":
            out.byteswap()  # the records hold them big-endian
        return out

    def close(self) -> None:
        """Unmap and close."""
        if self._mm is not None:
            self._mm.close()
        self._f.close()


class RecordsWriter:
    """Writes one image's records file: records of the blocks that hold data, in order.

    ``add`` takes block numbers in increasing order; ``close`` writes the
    index and the trailer.  Write errors (no space left) do not stop the
    command: the cache writer is told and drops the cache at the end.
    """

    def __init__(self, owner: CacheWriter, path: Path, size: int) -> None:
        self.owner = owner
        self.path = path
        self.size = size
        self._index = array("I")
        self._f: Any = None
        self._closed = False
        self._sum = xxhash.xxh3_128()
        try:
            self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            owner.failed(e)

    def add(self, n: int, record: bytes | memoryview) -> None:
        """The record of block ``n``, which holds data."""
        if self._f is None or self.owner.problem is not None:
            return
        if len(record) != _record_size(self.owner.page_size, self.owner.block_size):
            # An image cut another way than the cache (a mirror without
            # vml.blockSize): its records would be useless, so none are kept.
            self._f.close()
            self._f = None
            return
        self._index.append(n)
        try:
            self._sum.update(record)
            self._f.write(record)
        except OSError as e:
            self.owner.failed(e)

    def close(self) -> None:
        """Write the index and the trailer (once)."""
        if self._closed:
            return
        self._closed = True
        if self._f is None:
            return
        try:
            if self.owner.problem is None:
                idx = array("I", self._index)
                if sys.byteorder == "big":
                    idx.byteswap()
                o = self.owner
                tail = idx.tobytes() + _TRAILER.pack(
                    _MAGIC, 1, self.size, len(self._index), o.block_size, o.page_size
                )
                self._sum.update(tail)
                self._f.write(tail)
            self._f.close()
            if self.owner.problem is None:
                # The checksum goes last: a records file without it is not trusted.
                self.path.with_name(self.path.name + SUM_SUFFIX).write_text(self._sum.hexdigest())
        except OSError as e:
            self.owner.failed(e)
            with contextlib.suppress(OSError):
                self._f.close()


def records_path(area: Path, name: str) -> Path:
    """Where the area cache keeps the block records file ``name``."""
    return vml_dir(area) / CACHE_NAME / name


@functools.lru_cache(maxsize=16)
def _page_slices(length: int, page_size: int) -> tuple[slice, ...]:
    return tuple(slice(start, start + page_size) for start in range(0, length, page_size))


def page_hashes(block: bytes | memoryview, page_size: int, pages_per_block: int) -> bytes:
    """xxh3-64 of each page, padded with zero hashes to a full record."""
    # Each page's hash is one call made under the GIL: the slices are made
    # once per block length and the loop is a comprehension (a quarter less
    # interpreter time per block than a loop appending to a bytearray).
    mv = memoryview(block)
    digest = xxhash.xxh3_64_digest
    out = b"".join([digest(mv[s]) for s in _page_slices(len(mv), page_size)])
    return out + bytes(8 * pages_per_block - len(out))


@functools.cache
def zero_page_hash(page_size: int) -> bytes:
    """The xxh3-64 of a page of zeros, as :func:`page_hashes` writes it."""
    return bytes(xxhash.xxh3_64_digest(bytes(page_size)))


def block_hash(block: bytes | memoryview) -> bytes:
    """xxh3-128 of a whole block (unchanged-block test)."""
    return bytes(xxhash.xxh3_128_digest(block))


class Cache:
    """The area cache for one entry: read the old one, write the next one."""

    def __init__(self, area: Path, page_size: int, block_size: int) -> None:
        self.area = area
        self.page_size = page_size
        self.block_size = block_size
        self.entry: str | None = None
        self.files: dict[str, CachedFile] = {}
        try:
            raw = (vml_dir(area) / CACHE_NAME / "index.json").read_bytes()
        except OSError:
            return  # no cache: callers fall back to the repository
        try:
            doc = json.loads(raw)
            if doc.get("format") != CACHE_FORMAT:
                return  # written by another version: ignored, rebuilt by the next save
            check = doc.pop("check", None)
            if check != _doc_check(doc):
                _damaged(area, "its index does not match its checksum")
                return
            if doc.get("page_size") == page_size and doc.get("block_size") == block_size:
                files = {p: CachedFile(**v) for p, v in doc.get("files", {}).items()}
                self.entry = doc.get("entry")
                self.files = files
        except (ValueError, TypeError, AttributeError, RecursionError):
            _damaged(area, "its index is not readable")

    @classmethod
    def peek(cls, area: Path) -> Cache:
        """The cache in whatever geometry it was written (for its ``stat`` records only)."""
        try:
            doc = json.loads((vml_dir(area) / CACHE_NAME / "index.json").read_text())
            return cls(area, int(doc["page_size"]), int(doc["block_size"]))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return cls(area, 0, 0)

    def valid_for(self, entry: str | None) -> bool:
        """True when the cache describes the area as it was at ``entry``."""
        return entry is not None and self.entry == entry

    def records(self, path: str) -> BlockRecords | None:
        """Per-block hashes of image ``path``, if cached."""
        cf = self.files.get(path)
        if cf is None or cf.pages is None:
            return None
        p = records_path(self.area, cf.pages)
        if not p.exists():
            return None
        return BlockRecords(p, self.page_size, self.block_size, self.area)


class CacheWriter:
    """Builds the next cache in ``.vml/cache.tmp`` and swaps it in at the end.

    The cache is an accelerator: when it cannot be written (no space left,
    a read-only ``.vml``), ``problem`` says why, nothing more is written,
    and :meth:`commit` drops the old cache (it describes another entry)
    instead of installing a new one; the command itself carries on.
    """

    def __init__(self, area: Path, page_size: int, block_size: int) -> None:
        self.area = area
        self.page_size = page_size
        self.block_size = block_size
        self.dir = vml_dir(area) / CACHE_TMP
        self.files: dict[str, CachedFile] = {}
        self.problem: str | None = None
        self._n = 0
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            # (exist_ok: what rmtree could not remove is overwritten as we go)
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.failed(e)

    def failed(self, e: OSError) -> None:
        """Note that the cache cannot be written (the first reason is kept)."""
        if self.problem is None:
            why = "no space left" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            self.problem = f"the area cache was not written ({why or e}); the next save reads more"

    def new_records(self, size: int) -> tuple[str, RecordsWriter]:
        """Start the records file of an image of ``size`` bytes; returns its name and writer."""
        self._n += 1
        name = f"{self._n:06d}.blocks"
        return name, RecordsWriter(self, self.dir / name, size)

    def reuse_records(self, old: Path) -> str:
        """Carry an unchanged image's records over (a hard link: no copy)."""
        self._n += 1
        name = f"{self._n:06d}.blocks"
        if self.problem is not None:
            return name
        for suffix in ("", SUM_SUFFIX):
            src = old.with_name(old.name + suffix)
            dst = self.dir / (name + suffix)
            try:
                os.link(src, dst)
            except FileNotFoundError:
                continue  # no checksum: the records will not be trusted
            except OSError:
                try:
                    shutil.copyfile(src, dst)
                except OSError as e:
                    self.failed(e)
        return name

    def add(self, path: str, cf: CachedFile) -> None:
        """Record one file."""
        self.files[path] = cf

    def commit(self, entry: str) -> None:
        """Write the index and replace the old cache with this one (or drop both)."""
        doc = {
            "format": CACHE_FORMAT,
            "entry": entry,
            "page_size": self.page_size,
            "block_size": self.block_size,
            "files": {p: asdict(cf) for p, cf in sorted(self.files.items())},
        }
        live = vml_dir(self.area) / CACHE_NAME
        old = vml_dir(self.area) / "cache.old"
        if self.problem is None:
            try:
                # An accelerator: it need not survive a crash, so no fsync.
                write_atomic(self.dir / "index.json", _encode_index(doc), durable=False)
            except OSError as e:
                self.failed(e)
        shutil.rmtree(old, ignore_errors=True)
        if self.problem is not None:
            # The old cache describes the entry the area held before: it must go.
            shutil.rmtree(live, ignore_errors=True)
            self.abort()
            return
        if live.exists():
            os.replace(live, old)
        os.replace(self.dir, live)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop the unfinished cache."""
        shutil.rmtree(self.dir, ignore_errors=True)


def rekey_cache(area: Path, old: str, new: str) -> None:
    """Point the area cache at a rewritten commit: the content it describes is unchanged.

    Only a cache whose checksum holds is carried over (and checksummed again).
    """
    index = vml_dir(area) / CACHE_NAME / "index.json"
    try:
        doc = json.loads(index.read_bytes())
        check = doc.pop("check", None)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(doc, dict) or doc.get("entry") != old or check != _doc_check(doc):
        return
    doc["entry"] = new
    # The cache is an accelerator only: no fsync needed (as in CacheWriter).
    write_atomic(index, _encode_index(doc), durable=False)


def drop_cache(area: Path) -> None:
    """Forget the cache (it no longer describes the area)."""
    shutil.rmtree(vml_dir(area) / CACHE_NAME, ignore_errors=True)
