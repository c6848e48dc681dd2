"""The area cache: what an area's files looked like when they matched its entry.

It lives in ``<area>/.vml/cache/``: per file its ``stat`` signature and
digest, and per large file one record per block (the block's git blob id,
xxh3-128 of the block, xxh3-64 of each page), so that an unchanged file is
not read and a changed one's changed pages are found without reading the
repository.  The cache is only an accelerator: when it is missing or stale,
VML reads what it needs from the repository instead.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from vml.plumbing.areas import vml_dir
from vml.plumbing.repository import write_atomic

CACHE_NAME = "cache"
CACHE_TMP = "cache.tmp"
# Bumped whenever the record layout changes; older caches are ignored.
CACHE_FORMAT = 3


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
    """Read-only view of one image's per-block hashes (memory-mapped)."""

    def __init__(self, path: Path, page_size: int, block_size: int) -> None:
        self.rec = _record_size(page_size, block_size)
        self._f = open(path, "rb")  # noqa: SIM115 (lives as long as the mmap)
        size = os.fstat(self._f.fileno()).st_size
        self.count = size // self.rec
        self._mm: mmap.mmap | None = (
            mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        )

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
            doc = json.loads((vml_dir(area) / CACHE_NAME / "index.json").read_text())
            if (
                doc.get("format") == CACHE_FORMAT
                and doc.get("page_size") == page_size
                and doc.get("block_size") == block_size
            ):
                self.entry = doc.get("entry")
                self.files = {p: CachedFile(**v) for p, v in doc.get("files", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # no usable cache: callers fall back to the repository

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
        return BlockRecords(p, self.page_size, self.block_size)


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
        """Open a new per-block record file; returns its name and a binary file."""
        self._n += 1
        name = f"{self._n:06d}.blocks"
        return name, open(self.dir / name, "wb")

    def reuse_records(self, old: Path) -> str:
        """Carry an unchanged image's records over (a hard link: no copy)."""
        self._n += 1
        name = f"{self._n:06d}.blocks"
        try:
            os.link(old, self.dir / name)
        except OSError:
            shutil.copyfile(old, self.dir / name)
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
        write_atomic(self.dir / "index.json", json.dumps(doc).encode(), durable=False)
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


def drop_cache(area: Path) -> None:
    """Forget the cache (it no longer describes the area)."""
    shutil.rmtree(vml_dir(area) / CACHE_NAME, ignore_errors=True)
