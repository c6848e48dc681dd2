"""Working areas: the folder a VM lives in, and VML's one hidden folder in it.

``.vml/`` inside an area holds:

- ``area.json``: the repository the area uses, the entry it holds, the branch
  it follows, and ``pending`` while a checkout is rewriting it;
- ``lock``: an ``flock`` held by the one vml command that may change the
  area (commit, checkout, restore); it dies with its process;
- ``cache/``: what the area's files looked like when they matched that entry:
  per file its ``stat`` signature and digest, and per large file one record
  per block (the block's git blob id, xxh3-128 of the block, xxh3-64 of
  each page), so that an
  unchanged file is not read and a changed one's changed pages are found
  without reading the repository.  The cache is only an accelerator: when it
  is missing or stale, VML reads what it needs from the repository instead.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import stat as stat_mod
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from vml.errors import AreaError
from vml.plumbing.repository import hold_flock, write_atomic

AREA_DIR = ".vml"
STATE_NAME = "area.json"
CACHE_NAME = "cache"
CACHE_TMP = "cache.tmp"
# Bumped whenever the record layout changes; older caches are ignored.
CACHE_FORMAT = 3
LOCK_NAME = "lock"


@dataclass
class AreaState:
    """The contents of ``.vml/area.json``."""

    area_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    repository: str | None = None
    entry: str | None = None  # hex commit id of the entry the area holds
    branch: str | None = None  # branch that saving in this area advances
    pending: str | None = None  # hex commit id of an interrupted checkout


def vml_dir(area: Path) -> Path:
    """The area's ``.vml`` folder."""
    return area / AREA_DIR


def load_state(area: Path) -> AreaState | None:
    """The area's state, or None for a folder VML has never used."""
    try:
        doc = json.loads((vml_dir(area) / STATE_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AreaError(
            f"{area}/.vml/area.json is unreadable ({e})",
            "remove the .vml folder to start the area afresh (its entries stay in the repository)",
        ) from None
    hexid = re.compile(r"^[0-9a-f]{40}$")
    ok = isinstance(doc, dict) and isinstance(doc.get("area_id", ""), str)
    for key in ("entry", "pending"):
        v = doc.get(key) if ok else None
        ok = ok and (v is None or (isinstance(v, str) and bool(hexid.match(v))))
    for key in ("repository", "branch"):
        ok = ok and isinstance(doc.get(key), str | None)
    if not ok:
        raise AreaError(
            f"{area}/.vml/area.json is malformed",
            "remove the .vml folder to start the area afresh (its entries stay in the repository)",
        )
    known = {k: doc.get(k) for k in AreaState.__dataclass_fields__ if k in doc}
    return AreaState(**known)


def save_state(area: Path, state: AreaState) -> None:
    """Write the area's state atomically and durably."""
    d = vml_dir(area)
    d.mkdir(exist_ok=True)
    write_atomic(d / STATE_NAME, json.dumps(asdict(state), indent=1).encode() + b"\n")


@contextmanager
def lock_area(area: Path, timeout: float = 0.0) -> Iterator[None]:
    """Hold the area's lock, so one vml command at a time changes the area.

    Raises :class:`RepositoryBusy` when another command holds it (after
    ``timeout`` seconds).  A folder VML has not used yet gets no lasting
    ``.vml`` folder from a command that fails: when there is no ``area.json``
    on release, the lock file and the then empty ``.vml`` are removed.
    """
    d = vml_dir(area)
    d.mkdir(exist_ok=True)
    lock = d / LOCK_NAME
    with hold_flock(lock, timeout, f"the area {area} is in use by another vml command"):
        try:
            yield
        finally:
            if not (d / STATE_NAME).exists():
                # Still locked: a waiter re-checks the file it locked (hold_flock).
                lock.unlink(missing_ok=True)
                with suppress(OSError):
                    d.rmdir()


def stat_signature(st: os.stat_result) -> list[int]:
    """What must stay equal for a file to count as unchanged without reading it."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


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


@dataclass
class AreaFile:
    """A regular file found in an area."""

    path: str  # relative, posix separators
    stat: os.stat_result


def scan_area(
    area: Path, is_ignored: Callable[[str, bool], bool]
) -> tuple[list[AreaFile], list[str]]:
    """The area's regular files and its empty folders, sorted, without ``.vml``.

    Symbolic links and special files are refused: an entry must rebuild to
    exactly what was saved, and a link could point anywhere.
    """
    files: list[AreaFile] = []
    empty_dirs: list[str] = []

    def walk(d: Path, rel: str) -> bool:
        found = False
        try:
            items = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError:
            raise AreaError(f"cannot read folder {d}", "check its permissions") from None
        for it in items:
            r = f"{rel}{it.name}"
            if r == AREA_DIR:
                continue
            st = it.stat(follow_symlinks=False)
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            if is_ignored(r, is_dir):
                continue
            found = True
            if stat_mod.S_ISLNK(st.st_mode):
                raise AreaError(
                    f"{r} is a symbolic link; VML saves regular files only",
                    "replace the link with the file it points to, or list it in .vmlignore",
                )
            if is_dir:
                if not walk(Path(it.path), r + "/"):
                    empty_dirs.append(r)
            elif stat_mod.S_ISREG(st.st_mode):
                if "\\" in r or "\0" in r:
                    raise AreaError(f"cannot save a file named {r!r}", "rename it")
                files.append(AreaFile(r, st))
            else:
                raise AreaError(f"{r} is not a regular file", "remove it or list it in .vmlignore")
        return found

    walk(area, "")
    return files, empty_dirs
