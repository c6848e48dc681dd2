"""The area cache: what an area's files looked like when they matched its entry.

It lives in ``<area>/.vml/cache/``: per file its ``stat`` signature and
digest, and per large file one record per block (the block's git blob id,
xxh3-128 of the block, xxh3-64 of each page), so that an unchanged file is
not read and a changed one's changed pages are found without reading the
repository.  The cache is only an accelerator: when it is missing or stale,
VML reads what it needs from the repository instead.

A damaged cache must cost a rescan, never a wrong entry (a record's blob id
or page hashes are trusted for blocks the file shares with its entry).  So
``index.json`` carries the xxh3-128 of its own content, and each records
file ``<n>.blocks`` a sidecar ``<n>.blocks.sum`` with the xxh3-128 of its
bytes.  The index is checked when the cache is loaded, a records file when
one of its records is first read (so an unchanged image costs nothing); one
that does not match is ignored as if missing, and a warning says so once.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import threading
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
CACHE_FORMAT = 4
SUM_SUFFIX = ".sum"


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


class BlockRecords:
    """Read-only view of one image's per-block hashes (memory-mapped).

    The file's checksum is checked when a record is first asked for: a
    file that does not match answers as if it held no records (every block
    is then read and hashed afresh).
    """

    def __init__(self, path: Path, page_size: int, block_size: int, area: Path) -> None:
        self.rec = _record_size(page_size, block_size)
        self.path = path
        self._area = area
        self._f = open(path, "rb")  # noqa: SIM115 (lives as long as the mmap)
        size = os.fstat(self._f.fileno()).st_size
        self._records = size // self.rec
        self._count = 0  # until the checksum is checked (_check)
        self._checked = False
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = (
            mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        )

    def _check(self) -> None:
        # Workers of a save ask for records at once: one of them checks.
        with self._lock:
            if self._checked:
                return
            try:
                want = self.path.with_name(self.path.name + SUM_SUFFIX).read_text().strip()
            except (OSError, UnicodeDecodeError):
                want = None
            have = xxhash.xxh3_128_hexdigest(self._mm if self._mm is not None else b"")
            if want == have:
                self._count = self._records
            else:
                _damaged(self._area, f"the block records of {self.path.name}")
            self._checked = True

    @property
    def count(self) -> int:
        """Blocks with a record (none when the file does not match its checksum)."""
        if not self._checked:
            self._check()
        return self._count

    def block_digest(self, n: int) -> bytes | None:
        """Blob id of block ``n`` as cached, or None beyond the cached file."""
        if n >= self.count or self._mm is None:
            return None
        off = n * self.rec
        return self._mm[off : off + 20]

    def block_hash(self, n: int) -> bytes | None:
        """xxh3-128 of block ``n`` as cached, or None beyond the cached file."""
        if n >= self.count or self._mm is None:
            return None
        off = n * self.rec + 20
        return self._mm[off : off + 16]

    def page_hashes(self, n: int) -> bytes:
        """The xxh3-64 of every page of block ``n``, concatenated."""
        assert self._mm is not None
        off = n * self.rec + 36
        return self._mm[off : off + self.rec - 36]

    def record(self, n: int) -> bytes:
        """The whole cached record of block ``n``."""
        assert self._mm is not None
        off = n * self.rec
        return self._mm[off : off + self.rec]

    def close(self) -> None:
        """Unmap and close."""
        if self._mm is not None:
            self._mm.close()
        self._f.close()


def records_path(area: Path, name: str) -> Path:
    """Where the area cache keeps the block records file ``name``."""
    return vml_dir(area) / CACHE_NAME / name


def page_hashes(block: bytes | memoryview, page_size: int, pages_per_block: int) -> bytes:
    """xxh3-64 of each page, padded with zero hashes to a full record."""
    mv = memoryview(block)
    out = bytearray()
    for start in range(0, len(mv), page_size):
        out += xxhash.xxh3_64_digest(mv[start : start + page_size])
    out += bytes(8 * pages_per_block - len(out))
    return bytes(out)


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
    """Builds the next cache in ``.vml/cache.tmp`` and swaps it in at the end."""

    def __init__(self, area: Path, page_size: int, block_size: int) -> None:
        self.area = area
        self.page_size = page_size
        self.block_size = block_size
        self.dir = vml_dir(area) / CACHE_TMP
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.files: dict[str, CachedFile] = {}
        self._n = 0

    def new_records(self) -> tuple[str, object]:
        """Open a new per-block record file; returns its name and a binary file.

        The file takes ``write`` and ``close``; closing writes its checksum.
        """
        self._n += 1
        name = f"{self._n:06d}.blocks"
        return name, _SummedFile(self.dir / name)

    def reuse_records(self, old: Path) -> str:
        """Carry an unchanged image's records over with their checksum (hard links: no copy)."""
        self._n += 1
        name = f"{self._n:06d}.blocks"
        for suffix in ("", SUM_SUFFIX):
            src = old.with_name(old.name + suffix)
            dst = self.dir / (name + suffix)
            try:
                os.link(src, dst)
            except FileNotFoundError:
                continue  # no checksum: the records will not be trusted
            except OSError:
                shutil.copyfile(src, dst)
        return name

    def add(self, path: str, cf: CachedFile) -> None:
        """Record one file."""
        self.files[path] = cf

    def commit(self, entry: str) -> None:
        """Write the index and replace the old cache with this one."""
        doc = {
            "format": CACHE_FORMAT,
            "entry": entry,
            "page_size": self.page_size,
            "block_size": self.block_size,
            "files": {p: asdict(cf) for p, cf in sorted(self.files.items())},
        }
        # The cache is an accelerator: it need not survive a crash, so no fsync.
        write_atomic(self.dir / "index.json", _encode_index(doc), durable=False)
        live = vml_dir(self.area) / CACHE_NAME
        old = vml_dir(self.area) / "cache.old"
        shutil.rmtree(old, ignore_errors=True)
        if live.exists():
            os.replace(live, old)
        os.replace(self.dir, live)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop the unfinished cache."""
        shutil.rmtree(self.dir, ignore_errors=True)


class _SummedFile:
    """A records file being written; its checksum goes beside it when it is closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._sum = xxhash.xxh3_128()

    def write(self, data: bytes) -> int:
        self._sum.update(data)
        return self._f.write(data)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        self.path.with_name(self.path.name + SUM_SUFFIX).write_text(self._sum.hexdigest())


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
