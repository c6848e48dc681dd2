"""``vml checkout`` and ``vml restore``: build an entry into a working area."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, CorruptRepository, DirtyArea, NoSpace
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import (
    AREA_DIR,
    AreaState,
    load_state,
    lock_area,
    save_state,
    scan_area,
    stat_signature,
)
from vml.plumbing.cache import Cache, CachedFile, CacheWriter, records_path
from vml.plumbing.chains import ResolvedImage, resolve_image
from vml.plumbing.entries import Entry, FileRecord, check_relpath, small_blob
from vml.plumbing.images import write_all, write_image
from vml.plumbing.packs import BLOB, PackReader
from vml.plumbing.repository import Repository, fsync_dir
from vml.plumbing.vm.ignore import IgnoreRules
from vml.plumbing.vm.inspect import inspect_area
from vml.porcelain.common import (
    ProgressFn,
    check_area_path,
    label,
    make_pool,
    no_progress,
    read_entry,
)
from vml.porcelain.status import area_changes
from vml.porcelain.vminfo import checkout_notes

TMP_SUFFIX = ".vml-tmp"


@dataclass
class CheckoutResult:
    """What ``vml checkout`` did."""

    entry: str
    commit: str
    area: str
    in_place: bool
    written_bytes: int
    logical_bytes: int
    seconds: float
    files_written: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)
    branch: str | None = None
    # What the user must do for the hypervisor to run the VM here (moved
    # area, files saved from outside it, a crash-consistent entry).
    notes: list[str] = field(default_factory=list)


def _safe_target(area: Path, rel: str) -> Path:
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


def _is_tmp(rel: str) -> bool:
    """A temporary file checkout writes before renaming it into place."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _finish_file(fd: int, tmp: Path | None, target: Path, rec: FileRecord) -> os.stat_result:
    os.fchmod(fd, rec.mode & 0o7777)
    os.fsync(fd)
    os.close(fd)
    if tmp is not None:
        os.replace(tmp, target)
    os.utime(target, ns=(rec.mtime_ns, rec.mtime_ns))
    return os.stat(target)


def checkout(
    repo: Repository,
    name: str,
    area: Path,
    *,
    force: bool = False,
    keep_branch: bool = False,
    progress: ProgressFn = no_progress,
) -> CheckoutResult:
    """Build entry ``name`` into ``area`` (created if missing).

    An area holding another entry is rewritten in place, only the files and
    blocks that differ.  An area with unsaved changes is refused unless
    ``force``.  With ``keep_branch`` (``vml restore``) the area keeps the
    branch it follows, so its next save branches the tree at this entry.
    """
    t0 = time.monotonic()
    table = refs_mod.read_refs(repo)
    commit = refs_mod.resolve_name(repo, name, table)
    if area.exists() and not area.is_dir():
        raise AreaError(f"{area} is a file, not a folder", "choose a folder for the area")
    check_area_path(repo, area)
    area.mkdir(parents=True, exist_ok=True)
    with lock_area(area):
        state = load_state(area)
        reader = PackReader(repo)
        pool = make_pool()
        try:
            target = read_entry(reader, commit)
            old_entry: Entry | None = None
            if state is not None and state.entry:
                c = bytes.fromhex(state.entry)
                if c in set(table.entries.values()):
                    # Checking out the entry the area holds: it is read already.
                    old_entry = target if c == commit else read_entry(reader, c)
            cache = Cache(area, repo.page_size, repo.block_size)
            rules = IgnoreRules.load(area)
            present, _dirs = scan_area(area, rules.is_ignored)
            resuming = state is not None and state.pending is not None
            if not force and not resuming:
                if state is None or old_entry is None:
                    if present:
                        raise DirtyArea(
                            f"{area} holds files that are in no entry ({present[0].path}, ...)",
                            "check out into an empty folder, or pass --force to replace them",
                        )
                else:
                    dirty = [
                        c.path
                        for c in area_changes(
                            area, state, old_entry, cache, detail=False, files=present
                        )
                    ]
                    if dirty:
                        shown = ", ".join(dirty[:5]) + (", ..." if len(dirty) > 5 else "")
                        raise DirtyArea(f"{area} has unsaved changes: {shown}")
            state = state or AreaState()
            # Say that the area is being rewritten before touching it, so that an
            # interruption is reported (and finished by running checkout again).
            state.pending = commit.hex()
            state.repository = str(repo.path.resolve())
            save_state(area, state)

            # In place only when the area is known to hold the old entry exactly.
            clean_old = old_entry if (not resuming and cache.valid_for(state.entry)) else None
            old_files = {f.path: f for f in clean_old.meta.files} if clean_old else {}
            total = sum(f.size for f in target.meta.files)
            done = 0
            written = 0
            cwriter = CacheWriter(area, repo.page_size, repo.block_size)
            files_written: list[str] = []
            try:
                keep = {f.path for f in target.meta.files}
                removed: list[str] = []
                # The area was checked to hold the old entry's files (with or
                # without a cache), so those go; --force drops whatever is there.
                gone = {f.path for f in old_entry.meta.files} if old_entry is not None else set()
                if force:
                    gone |= {af.path for af in present}
                if resuming:
                    # A killed checkout leaves its half-written ".<name>.vml-tmp"
                    # files; finishing with another entry must not keep them.
                    gone |= {af.path for af in present if _is_tmp(af.path)}
                for p in sorted(gone - keep):
                    fp = area / p
                    if fp.is_file() and not fp.is_symlink():
                        fp.unlink()
                        removed.append(p)
                # Folders emptied by the removals go too (unless the entry has
                # them), so a path that was a folder can become a file.
                wanted_dirs = set(target.meta.dirs)
                for f in keep:
                    parts = f.split("/")[:-1]
                    wanted_dirs |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
                for d in sorted({str(Path(p).parent) for p in removed}, key=len, reverse=True):
                    while d not in (".", "") and d not in wanted_dirs:
                        try:
                            (area / d).rmdir()
                        except OSError:
                            break  # not empty: something else lives there
                        d = str(Path(d).parent)
                for rec in target.meta.files:
                    dest = _safe_target(area, rec.path)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    old = old_files.get(rec.path)
                    cached = cache.files.get(rec.path) if clean_old else None
                    if (
                        old is not None
                        and cached is not None
                        and old.sha256 == rec.sha256
                        and old.size == rec.size
                        and dest.is_file()
                        and cached.stat == stat_signature(dest.stat())
                    ):
                        # Same content already there: restore metadata only.
                        os.chmod(dest, rec.mode & 0o7777)
                        os.utime(dest, ns=(rec.mtime_ns, rec.mtime_ns))
                        st = dest.stat()
                        pages = None
                        if cached.pages:
                            pages = cwriter.reuse_records(records_path(area, cached.pages))
                        cwriter.add(
                            rec.path,
                            CachedFile(rec.kind, rec.size, rec.sha256, stat_signature(st), pages),
                        )
                        done += rec.size
                        progress("write", done, total)
                        continue
                    files_written.append(rec.path)
                    if rec.kind == "small":
                        blob = small_blob(reader.data, target, rec.path)
                        if blob is None:
                            raise CorruptRepository(f"entry lacks the data of {rec.path}")
                        data = reader.read(blob, BLOB)[1]
                        if hashlib.sha256(data).hexdigest() != rec.sha256 or len(data) != rec.size:
                            raise CorruptRepository(
                                f"the saved {rec.path} does not match its SHA-256"
                            )
                        tmp = dest.with_name(f".{dest.name}{TMP_SUFFIX}")
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        try:
                            write_all(fd, data, 0)
                            if os.fstat(fd).st_size != rec.size:
                                raise NoSpace(f"{rec.path} could not be written whole")
                        except BaseException:
                            os.close(fd)
                            tmp.unlink(missing_ok=True)
                            raise
                        st = _finish_file(fd, tmp, dest, rec)
                        cwriter.add(
                            rec.path, CachedFile("small", rec.size, rec.sha256, stat_signature(st))
                        )
                        written += rec.size
                    else:
                        image = resolve_image(reader, commit, rec.path)
                        if image is None or image.manifest.sha256 != rec.sha256:
                            raise CorruptRepository(f"entry lacks the blocks of {rec.path}")
                        old_img: ResolvedImage | None = None
                        # Blocks are patched in place only over a file known to hold
                        # the old entry's bytes; one changed since (--force) is rebuilt.
                        if (
                            old is not None
                            and old.kind == "image"
                            and clean_old
                            and cached is not None
                            and dest.is_file()
                            and cached.stat == stat_signature(dest.stat())
                        ):
                            old_img = resolve_image(reader, clean_old.commit, rec.path)
                        # The unchanged blocks' digests and records come from the
                        # cache: an in-place checkout then costs the changed blocks.
                        old_recs = cache.records(rec.path) if old_img is not None else None
                        name_rec, out = cwriter.new_records()

                        def tick(n: int) -> None:
                            nonlocal done
                            done += n
                            progress("write", done, total)

                        try:
                            if old_img is not None:
                                fd = os.open(dest, os.O_RDWR)
                                tmp = None
                            else:
                                tmp = dest.with_name(f".{dest.name}{TMP_SUFFIX}")
                                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                            try:
                                written += write_image(
                                    reader,
                                    pool,
                                    image,
                                    fd,
                                    old_img,
                                    tick,
                                    out,  # type: ignore[arg-type]
                                    old_recs,
                                )
                            except BaseException:
                                os.close(fd)
                                if tmp is not None:
                                    tmp.unlink(missing_ok=True)
                                raise
                        finally:
                            out.close()  # type: ignore[attr-defined]
                            if old_recs is not None:
                                old_recs.close()
                        st = _finish_file(fd, tmp, dest, rec)
                        cwriter.add(
                            rec.path,
                            CachedFile("image", rec.size, rec.sha256, stat_signature(st), name_rec),
                        )
                for d in target.meta.dirs:
                    _safe_target(area, d + "/x").parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(area)
            except BaseException:
                cwriter.abort()
                raise
            cwriter.commit(commit.hex())
            state.entry = commit.hex()
            state.pending = None
            if not keep_branch:
                state.branch = name if name in table.branches else None
            save_state(area, state)
            repo.register_area(area)
            return CheckoutResult(
                entry=label(table, commit) or commit.hex(),
                commit=commit.hex(),
                area=str(area),
                in_place=clean_old is not None,
                written_bytes=written,
                logical_bytes=total,
                seconds=time.monotonic() - t0,
                files_written=files_written,
                files_removed=removed,
                branch=state.branch,
                notes=checkout_notes(target.meta.vm, target.meta.area, area, inspect_area(area)),
            )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            reader.close()


def restore(
    repo: Repository,
    name: str,
    area: Path,
    *,
    force: bool = False,
    progress: ProgressFn = no_progress,
) -> CheckoutResult:
    """Go back to entry ``name`` in ``area``; the next save becomes its child."""
    if not (area / AREA_DIR).is_dir():
        raise AreaError(
            f"{area} is not a VML working area",
            "restore works in an area you saved from; use `vml checkout` for a new folder",
        )
    return checkout(repo, name, area, force=force, keep_branch=True, progress=progress)
