"""Building an entry's files into a folder, each written once and checked.

A new file is written under a temporary name, checked (a small file's
SHA-256, an image's blocks and digest) and renamed into place only then, so
a file under its real name is never half-written.  Over a file known to hold
the area's previous entry (the area cache vouches for it), an image is
patched in place, only the blocks that differ; a file whose content is the
same keeps its bytes and gets its metadata only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from pathlib import Path

from vml.errors import AreaError, CorruptRepository, HostileRepository, NoSpace
from vml.plumbing.areas import stat_signature, vml_dir
from vml.plumbing.building import write_all, write_image
from vml.plumbing.cache import Cache, CachedFile, CacheWriter, records_path
from vml.plumbing.chains import ResolvedImage, resolve_image
from vml.plumbing.entries import Entry, FileRecord, check_relpath, small_blob
from vml.plumbing.packreader import BLOB, PackReader
from vml.plumbing.refpages import MEMORY, RefPages
from vml.progress import ProgressFn

# Temporary files live in the area's own .vml folder, where no user file
# can be (scans skip it): a name of the user's can never be taken for one, and
# a name at the file system's length limit needs no room for a suffix.
TMP_DIR = "tmp"
# Beside a destination on another file system than .vml (a mount inside the
# area), where a rename from .vml cannot reach: recorded before it is made.
_STRAY_LIST = "stray"

# (done, total) in bytes of the entry's files.


def safe_target(area: Path, rel: str) -> Path:
    """The file's place in the area, refusing anything that would leave it."""
    check_relpath(rel)
    target = area / rel
    # Parents must be real folders inside the area, never links placed there.
    p = area
    for part in rel.split("/")[:-1]:
        p = p / part
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise AreaError(f"{p} is in the way of {rel}", "move it away and try again")
    return target


class TempFiles:
    """Where files are written before they are renamed into place.

    Made (and emptied of whatever a killed checkout left) when a checkout
    starts, under the area lock; :meth:`clear` at the end.
    """

    def __init__(self, area: Path) -> None:
        self.area = area
        self.dir = vml_dir(area) / TMP_DIR
        self._n = 0
        self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dev = os.stat(self.dir).st_dev

    def clear(self) -> None:
        """Remove every temporary file, in .vml and the recorded strays elsewhere."""
        stray = self.dir / _STRAY_LIST
        try:
            for line in stray.read_text().splitlines():
                check_relpath(line)
                with suppress(FileNotFoundError):
                    (self.area / line).unlink()
        except (OSError, ValueError, HostileRepository):
            pass  # nothing recorded, or not by us: nothing to remove
        shutil.rmtree(self.dir, ignore_errors=True)

    def new(self, dest: Path) -> Path:
        """A fresh temporary path from which ``dest`` can be renamed into place."""
        self._n += 1
        if os.stat(dest.parent).st_dev == self._dev:
            return self.dir / f"{self._n}"
        tmp = dest.parent / f".vml-tmp-{os.getpid()}-{self._n}"
        with open(self.dir / _STRAY_LIST, "a") as f:
            f.write(tmp.relative_to(self.area).as_posix() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _finish_file(fd: int, tmp: Path | None, target: Path, rec: FileRecord) -> os.stat_result:
    try:
        os.fchmod(fd, rec.permissions)
        os.fsync(fd)
    finally:
        os.close(fd)
    if tmp is not None:
        os.replace(tmp, target)
    os.utime(target, ns=(rec.mtime_ns, rec.mtime_ns))
    return os.stat(target)


# Files written and checked whose fsync and rename may still be under way.
_FINISHING = 8


class _Finisher:
    """Makes written files durable and puts them in place, one at a time, in a thread.

    A file's ``fsync`` waits for the disk (its last steps of write-behind):
    meanwhile the next file is built.  Each file is still checked, made
    durable, then renamed, in that order; the area's folder is synced only
    once :meth:`drain` returned.  At most ``_FINISHING`` files wait (each
    holds an open file).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[os.stat_result], Callable[[os.stat_result], None]]] = (
            deque()
        )

    def submit(
        self,
        fd: int,
        tmp: Path | None,
        target: Path,
        rec: FileRecord,
        then: Callable[[os.stat_result], None],
    ) -> None:
        """Finish the file open as ``fd``; ``then`` gets its ``stat`` (in :meth:`drain`)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="vml-finish")
        while len(self._pending) >= _FINISHING:
            self._settle_one()
        self._pending.append((self._pool.submit(_finish_file, fd, tmp, target, rec), then))

    def _settle_one(self) -> None:
        fut, then = self._pending.popleft()
        then(fut.result())

    def drain(self) -> None:
        """Wait for every file; the first failure is raised (after all were waited for)."""
        try:
            while self._pending:
                self._settle_one()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Wait for the files under way and forget them (after a failure elsewhere)."""
        if self._pending:
            wait([fut for fut, _then in self._pending])
            self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class Builder:
    """Writes the files of ``entry`` into ``area``, and the area cache beside them.

    ``old`` is the entry the area holds when the cache vouches for its files
    (``cache`` valid for it): only then are unchanged files kept and images
    patched in place.
    """

    def __init__(
        self,
        reader: PackReader,
        pool: Executor,
        area: Path,
        entry: Entry,
        old: Entry | None,
        cache: Cache,
        cache_writer: CacheWriter,
        progress: ProgressFn,
        temps: TempFiles,
    ) -> None:
        self.temps = temps
        self.reader = reader
        self.pool = pool
        self.area = area
        self.entry = entry
        self.old = old
        self.old_files = {f.path: f for f in old.meta.files} if old is not None else {}
        self.cache = cache
        self.cache_writer = cache_writer
        self.progress = progress
        self.total = sum(f.size for f in entry.meta.files)
        self.done = 0
        self.written = 0
        self.files_written: list[str] = []
        # The caller calls drain() once every file is built (abandon() on failure).
        self.finisher = _Finisher()
        # Images whose reference pages are taken from the images built
        # before them (planned when the first image is built; see _plan).
        self._planned: dict[str, tuple[ResolvedImage, RefPages, Future[None]]] | None = None
        self._planner: ThreadPoolExecutor | None = None

    def _plan(self) -> None:
        """Plan the reference pages of each image that has them, before any image is built.

        Into a new folder only (every block of every image is built): then
        the blobs each image's build reads and checks give the images built
        after it their pages (a memory image's from the disk's blocks),
        instead of reading and inflating those blobs a second time.  The
        plans (reading the deltas' headers) are made in a thread of their
        own while the first image is built; a blob read before its plan is
        ready is read again later, as without one.
        """
        self._planned = {}
        if self.old is not None:
            return
        todo: list[tuple[str, ResolvedImage]] = []
        for rec in self.entry.meta.files:
            if rec.kind != "image":
                continue
            image = resolve_image(self.reader, self.entry.commit, rec.path)
            if image is None or not any(r.sources for r in image.recipes.values()):
                # Not kept: it is resolved again when built, so that only the
                # images being built and the plans hold block maps at once
                # (a VM's disks can hold ~300k blocks each).  A damaged entry
                # is refused then.
                continue
            todo.append((rec.path, image))
        if not todo:
            return
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="vml-plan")
        for path, image in todo:
            # The stores are held together: one memory budget shared, the
            # rest of their pages in temporary files.
            store = RefPages(self.reader, spill=self.temps.dir, memory=MEMORY // len(todo))
            done = self._planner.submit(store.plan, image, image.checks is None)
            self._planned[path] = (image, store, done)

    def close(self) -> None:
        """Drop the reference pages still planned (after a failure: their temporary files)."""
        if self._planner is not None:
            self._planner.shutdown(wait=True, cancel_futures=True)
            self._planner = None
        for _image, store, _done in (self._planned or {}).values():
            store.close()
        if self._planned:
            self._planned.clear()

    def _advance(self, n: int) -> None:
        self.done += n
        self.progress("write", self.done, self.total)

    def build(self, rec: FileRecord) -> None:
        """Put file ``rec`` of the entry in place (or keep it, if it is there already)."""
        dest = safe_target(self.area, rec.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = self.old_files.get(rec.path)
        cached = self.cache.files.get(rec.path) if self.old is not None else None
        # The file holds the old entry's bytes as the cache recorded them.
        clean = (
            old is not None
            and cached is not None
            and dest.is_file()
            and cached.stat == stat_signature(dest.stat())
        )
        if clean and old is not None and old.sha256 == rec.sha256 and old.size == rec.size:
            assert cached is not None
            self._keep(rec, dest, cached)
            return
        self.files_written.append(rec.path)
        if rec.kind == "small":
            self._write_small(rec, dest)
        else:
            patch = clean and old is not None and old.kind == "image"
            self._write_image(rec, dest, patch)

    def _keep(self, rec: FileRecord, dest: Path, cached: CachedFile) -> None:
        """Same content already there: restore the metadata only."""
        os.chmod(dest, rec.permissions)
        os.utime(dest, ns=(rec.mtime_ns, rec.mtime_ns))
        st = dest.stat()
        pages = None
        if cached.pages:
            pages = self.cache_writer.reuse_records(records_path(self.area, cached.pages))
        self.cache_writer.add(
            rec.path, CachedFile(rec.kind, rec.size, rec.sha256, stat_signature(st), pages)
        )
        self._advance(rec.size)

    def _write_small(self, rec: FileRecord, dest: Path) -> None:
        blob = small_blob(self.reader.data, self.entry, rec.path)
        if blob is None:
            raise CorruptRepository(f"entry lacks the data of {rec.path}")
        data = self.reader.read(blob, BLOB)[1]
        if hashlib.sha256(data).hexdigest() != rec.sha256 or len(data) != rec.size:
            raise CorruptRepository(f"the saved {rec.path} does not match its SHA-256")
        tmp = self.temps.new(dest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data, 0)
            if os.fstat(fd).st_size != rec.size:
                raise NoSpace(f"{rec.path} could not be written whole")
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.finisher.submit(
            fd,
            tmp,
            dest,
            rec,
            lambda st: self.cache_writer.add(
                rec.path, CachedFile("small", rec.size, rec.sha256, stat_signature(st))
            ),
        )
        self.written += rec.size
        self._advance(rec.size)

    def _write_image(self, rec: FileRecord, dest: Path, patch: bool) -> None:
        if self._planned is None:
            self._plan()
        assert self._planned is not None
        planned = self._planned.pop(rec.path, None)
        store: RefPages | None = None
        image: ResolvedImage | None = None
        if planned is not None:
            image, store, done = planned
            try:
                done.result()  # its plan is made
            except BaseException:
                store.close()
                raise
        else:
            image = resolve_image(self.reader, self.entry.commit, rec.path)
        try:
            self._write_resolved(rec, dest, patch, image, store)
        finally:
            if store is not None:
                store.close()

    def _write_resolved(
        self,
        rec: FileRecord,
        dest: Path,
        patch: bool,
        image: ResolvedImage | None,
        store: RefPages | None,
    ) -> None:
        if image is None or image.manifest.sha256 != rec.sha256:
            raise CorruptRepository(f"entry lacks the blocks of {rec.path}")
        assert self._planned is not None
        old_img: ResolvedImage | None = None
        if patch and self.old is not None:
            # Blocks are patched in place only over a file known to hold the
            # old entry's bytes; one changed since (--force) is rebuilt.
            old_img = resolve_image(self.reader, self.old.commit, rec.path)
        # The unchanged blocks' digests and records come from the cache: an
        # in-place checkout then costs the changed blocks.
        old_recs = self.cache.records(rec.path) if old_img is not None else None
        name, out = self.cache_writer.new_records(rec.size)
        try:
            tmp = None if old_img is not None else self.temps.new(dest)
            if tmp is None:
                fd = os.open(dest, os.O_RDWR)
            else:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self.written += write_image(
                    self.reader,
                    self.pool,
                    image,
                    fd,
                    old_img,
                    self._advance,
                    out,
                    old_recs,
                    spill=self.temps.dir,
                    planned=store,
                    capture=[later for _img, later, _done in self._planned.values()],
                )
            except BaseException:
                os.close(fd)
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                raise
        finally:
            out.close()
            if old_recs is not None:
                old_recs.close()
        self.finisher.submit(
            fd,
            tmp,
            dest,
            rec,
            lambda st: self.cache_writer.add(
                rec.path, CachedFile("image", rec.size, rec.sha256, stat_signature(st), name)
            ),
        )

    def make_dirs(self, dirs: list[str]) -> None:
        """Create the entry's empty folders."""
        for d in dirs:
            safe_target(self.area, d + "/x").parent.mkdir(parents=True, exist_ok=True)

    def finish_folders(self) -> None:
        """Give every folder, and the area, the permissions and time the entry records.

        Last, deepest first: writing a file changes its folder's time, and a
        folder without write permission could take no more files.  Every
        file is in place first (the finisher drained).
        """
        self.finisher.drain()
        meta = self.entry.meta
        for rec in sorted(meta.folders, key=lambda f: f.path.count("/"), reverse=True):
            where = safe_target(self.area, rec.path + "/x").parent
            if where.is_dir() and not where.is_symlink():
                os.chmod(where, rec.perm)
                os.utime(where, ns=(rec.mtime_ns, rec.mtime_ns))
        if meta.root_perm is not None:
            os.chmod(self.area, meta.root_perm)
