"""``vml checkout`` and ``vml restore``: build an entry into a working area."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, ConcurrentChange, DirtyArea, VMRunning
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import (
    AREA_DIR,
    AreaState,
    Scan,
    load_state,
    lock_area,
    save_state,
    scan_area,
)
from vml.plumbing.cache import Cache, CacheWriter
from vml.plumbing.chains import read_entry
from vml.plumbing.entries import Entry
from vml.plumbing.layout import check_layout
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository, fsync_dir
from vml.plumbing.restoring import Builder, TempFiles
from vml.plumbing.vm.bitmaps import drop_records
from vml.plumbing.vm.ignore import IgnoreRules
from vml.plumbing.vm.inspect import inspect_area, is_memory, stranded_error, stranded_overlays
from vml.plumbing.vm.qemu import vml_vm
from vml.porcelain.common import (
    ProgressFn,
    check_area_path,
    foreign_folders,
    make_pool,
    no_progress,
)
from vml.porcelain.vminfo import checkout_notes
from vml.records import Record


@dataclass
class CheckoutResult(Record):
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
    # Files in the area that no entry of it holds: never removed or overwritten.
    left_alone: list[str] = field(default_factory=list)
    branch: str | None = None
    # What the user must do for the hypervisor to run the VM here (moved
    # area, files saved from outside it, a crash-consistent entry).
    notes: list[str] = field(default_factory=list)


def _held_entry(
    reader: PackReader, table: refs_mod.RefTable, state: AreaState | None, target: Entry
) -> Entry | None:
    """The entry the area holds, if this repository has it."""
    if state is None or not state.entry:
        return None
    c = bytes.fromhex(state.entry)
    if c not in set(table.entries.values()):
        return None
    # Checking out the entry the area holds: it is read already.
    return target if c == target.commit else read_entry(reader, c)


def _refuse_unsaved(
    area: Path,
    state: AreaState | None,
    held: Entry | None,
    cache: Cache,
    scan: Scan,
) -> None:
    """Refuse to overwrite what no entry holds (the caller skips this for --force)."""
    if state is None or held is None:
        if scan.files:
            raise DirtyArea(
                f"{area} holds files that are in no entry ({scan.files[0].path}, ...)",
                "check out into an empty folder, or pass --force to replace them",
            )
        return
    # Only an area holding an entry is compared (status pulls in the save's
    # image code: not imported for a checkout into a new folder).
    from vml.porcelain.status import area_changes

    dirty = [c.path for c in area_changes(area, state, held, cache, detail=False, scan=scan)]
    if dirty:
        shown = ", ".join(dirty[:5]) + (", ..." if len(dirty) > 5 else "")
        raise DirtyArea(f"{area} has unsaved changes: {shown}")


def _claimed(
    reader: PackReader,
    table: refs_mod.RefTable,
    state: AreaState | None,
    held: Entry | None,
    target: Entry,
) -> set[str]:
    """The paths VML put in the area: the held entry's files, and a killed checkout's.

    Only these (and the target's own) may be removed or overwritten: a file
    the user put in the area is never VML's to delete, ``--force`` or not.
    """
    claimed = {f.path for f in held.meta.files} if held is not None else set()
    if state is not None and state.pending:
        pending = bytes.fromhex(state.pending)
        if pending == target.commit:
            claimed |= {f.path for f in target.meta.files}
        elif pending in set(table.entries.values()):
            claimed |= {f.path for f in read_entry(reader, pending).meta.files}
    return claimed


def _in_the_way(area: Path, target: Entry, removable: set[str]) -> None:
    """Refuse, before anything changes, a target path that a user's file or folder blocks.

    A folder where the entry has a file may go only if everything in it is
    to be removed anyway; a file where the entry needs a folder, only if it
    is a removable file.  A symbolic link on the way is never followed.
    """

    def refuse(where: str, rel: str) -> AreaError:
        return AreaError(
            f"{area / where} is in the way of {rel}, and no entry of this area holds it",
            "move it out of the area and try again",
        )

    needed = {f.path for f in target.meta.files}
    folders = set(target.meta.dirs)
    for rel in needed | folders:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folders.add("/".join(parts[:i]))
    for d in sorted(folders):
        p = area / d
        blocks = os.path.lexists(p) and (p.is_symlink() or not p.is_dir())
        if blocks and (d not in removable or p.is_symlink()):
            raise refuse(d, d)
    for rel in sorted(needed):
        p = area / rel
        if p.is_dir() and not p.is_symlink():
            for root, _dirs, names in os.walk(p):
                for name in names:
                    inner = Path(root, name).relative_to(area).as_posix()
                    if inner not in removable:
                        raise refuse(inner, rel)


def _remove_stale(area: Path, target: Entry, removable: set[str]) -> list[str]:
    """Remove the claimed files the new entry lacks, and folders they leave empty."""
    keep = {f.path for f in target.meta.files}
    removed: list[str] = []
    for p in sorted(removable - keep):
        fp = area / p
        if fp.is_file() and not fp.is_symlink():
            fp.unlink()
            removed.append(p)
    # Folders emptied by the removals go too (unless the entry has them), so
    # a path that was a folder can become a file.
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
    # A folder where a file goes held only removed files (_in_the_way checked):
    # what is left of it are empty folders.
    for rel in sorted(keep):
        where = area / rel
        if where.is_dir() and not where.is_symlink():
            for root, dirs, _names in os.walk(where, topdown=False):
                for sub in dirs:
                    Path(root, sub).rmdir()
            where.rmdir()
    return removed


def _claim(repo: Repository, area: Path, state: AreaState, commit: bytes) -> None:
    """Mark the area as being rewritten to ``commit``, which must still be an entry.

    Before any file is touched, so that an interruption is reported (and
    finished by running checkout again); under the repository lock, so that
    ``rm``, ``convert`` and ``prune`` either see the area taking the entry
    (and leave it alone) or have removed it already (and this refuses).
    """
    with repo.lock():
        now = refs_mod.read_refs(repo)
        named = set(now.entries.values()) | set(now.tags.values()) | set(now.branches.values())
        if commit not in named:
            raise ConcurrentChange(
                f"{commit.hex()[:12]} was removed or rewritten by another command before this "
                "checkout began; nothing was changed"
            )
        state.pending = commit.hex()
        state.repository = str(repo.path.resolve())
        save_state(area, state)
        # The disks are about to be rewritten: no dirty bitmap counts for them.
        drop_records(area)
        repo.register_area(area, locked=True)


@contextmanager
def _folder_made(area: Path) -> Iterator[None]:
    """Make ``area`` (and missing parents); a refusal inside leaves none of them behind.

    A refusal raised before the area's state exists; once the checkout has
    marked the area (``pending``), the folder is the user's to see.
    """
    missing = [p for p in [area, *area.parents] if not p.exists()]
    area.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not (area / AREA_DIR).exists():
            for p in missing:  # the deepest first; stops at the first one not empty
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


@dataclass
class _Plan:
    """What a checkout found before it changes anything."""

    state: AreaState
    claimed: set[str]  # paths VML put in the area (see _claimed)
    left_alone: list[str]
    clean_old: Entry | None  # the held entry, when the cache vouches for its files
    cache: Cache


def _plan(
    repo: Repository,
    reader: PackReader,
    table: refs_mod.RefTable,
    area: Path,
    target: Entry,
    force: bool,
) -> _Plan:
    """Look at the area and refuse what checkout must not do; nothing is changed yet."""
    running = vml_vm(area)
    if running is not None:
        # Its files are QEMU's now: rewriting them would corrupt the guest.
        raise VMRunning(
            f"the VM in {area} runs under `vml run` (QEMU pid {running.pid})",
            "stop it first: `vml stop` (or `vml stop --save`, then commit to keep its state)",
        )
    loaded = load_state(area)
    held = _held_entry(reader, table, loaded, target)
    cache = Cache(area, repo.page_size, repo.block_size)
    scan = scan_area(area, IgnoreRules.load(area).is_ignored, foreign_folders(repo))
    resuming = loaded is not None and loaded.pending is not None
    if not force and not resuming:
        stranded = stranded_overlays(area)
        if stranded:
            raise stranded_error(area, stranded, "a checkout without --force")
        _refuse_unsaved(area, loaded, held, cache, scan)
    claimed = _claimed(reader, table, loaded, held, target)
    # The target's files are written, the claimed ones removed; both may be
    # overwritten.  Everything else stays as it is.
    removable = claimed | {f.path for f in target.meta.files}
    _in_the_way(area, target, removable)
    state = loaded or AreaState()
    # In place only when the area is known to hold the old entry exactly.
    clean = held if (not resuming and cache.valid_for(state.entry)) else None
    left_alone = sorted(af.path for af in scan.files if af.path not in removable)
    return _Plan(state, claimed, left_alone, clean, cache)


def _write(
    repo: Repository,
    reader: PackReader,
    pool: Executor,
    area: Path,
    target: Entry,
    plan: _Plan,
    progress: ProgressFn,
) -> tuple[Builder, list[str]]:
    """Remove the stale files and build the entry's; the area cache follows."""
    cwriter = CacheWriter(area, repo.page_size, repo.block_size)
    temps = TempFiles(area)  # also drops what a killed checkout left
    builder = Builder(
        reader,
        pool,
        area,
        target,
        plan.clean_old,
        plan.cache,
        cwriter,
        progress,
        temps,
    )
    try:
        removed = _remove_stale(area, target, plan.claimed)
        # Memory last, as commit saves it: its pages reference the disks', which
        # a new folder's memory then takes from the disks' build (refpages.py),
        # whatever the files' names (a VMware `vm-564d.vmem` sorts before `vm.vmdk`).
        for rec in sorted(target.meta.files, key=lambda f: is_memory(f.path)):
            builder.build(rec)
        # Files are made durable and put in place in a thread while the next
        # ones are built: all of them are in place before the folders' turn.
        builder.finisher.drain()
        builder.make_dirs(target.meta.dirs)
        builder.finish_folders()
        fsync_dir(area)
    except BaseException:
        builder.finisher.abandon()  # before the temporary files are removed
        cwriter.abort()
        raise
    finally:
        builder.close()  # reference pages planned and not used (after a failure)
        temps.clear()
    cwriter.commit(target.commit.hex())
    return builder, removed


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
    reader = PackReader(repo)
    pool = make_pool()
    try:
        # A malformed or hostile entry is refused before the folder is made.
        target = read_entry(reader, commit)
        check_layout(target.meta, table.label(commit) or commit.hex()[:12], area)
        with _folder_made(area), lock_area(area):
            plan = _plan(repo, reader, table, area, target, force)
            state = plan.state
            _claim(repo, area, state, commit)
            builder, removed = _write(repo, reader, pool, area, target, plan, progress)
            # --force: the overlays rested on the images just replaced.
            for rel in stranded_overlays(area):
                (area / rel).unlink(missing_ok=True)
                removed.append(rel)
            state.entry = commit.hex()
            state.pending = None
            if not keep_branch:
                state.branch = name if name in table.branches else None
                state.branch_at = commit.hex() if state.branch else None
            save_state(area, state)
            return CheckoutResult(
                entry=table.label(commit) or commit.hex(),
                commit=commit.hex(),
                area=str(area),
                in_place=plan.clean_old is not None,
                written_bytes=builder.written,
                logical_bytes=builder.total,
                seconds=time.monotonic() - t0,
                files_written=builder.files_written,
                files_removed=removed,
                left_alone=plan.left_alone,
                branch=state.branch,
                # The notes read the files' description only: no process is
                # looked at (one stat per open file of the host, 30-100 ms).
                notes=checkout_notes(
                    target.meta.vm, target.meta.area, area, inspect_area(area, running=False)
                )
                + ([builder.cache_writer.problem] if builder.cache_writer.problem else []),
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
