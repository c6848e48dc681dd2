"""``vml commit``: save the area's VM as a new entry."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import (
    AreaError,
    CorruptRepository,
    NothingToCommit,
    UsageError,
    VMControlError,
    VMLError,
)
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import (
    AreaFile,
    AreaState,
    load_state,
    lock_area,
    same_folder,
    save_state,
    scan_area,
    stat_signature,
)
from vml.plumbing.cache import Cache
from vml.plumbing.chains import read_entry
from vml.plumbing.entries import (
    PERM_BITS,
    Entry,
    EntryMeta,
    FileRecord,
    FolderRecord,
    folder_changes,
    folder_record,
    now_iso,
)
from vml.plumbing.images import Changed
from vml.plumbing.packreader import PackReader
from vml.plumbing.publish import Published, publish_entry
from vml.plumbing.repack import RepackResult, auto_consolidate
from vml.plumbing.repository import Repository
from vml.plumbing.saving import Baseline, Saver, SourceFile, data_estimate
from vml.plumbing.vm.description import find_spec
from vml.plumbing.vm.ignore import IgnoreRules
from vml.plumbing.vm.info import VMInfo
from vml.plumbing.vm.inspect import check_saveable, is_memory
from vml.plumbing.vm.qemu import vml_vm
from vml.plumbing.vm.saves import FOREIGN, Snapshot, foreign_source
from vml.porcelain.common import (
    ProgressFn,
    check_area_path,
    foreign_folders,
    make_pool,
    no_progress,
)
from vml.porcelain.vminfo import (
    ExternalFile,
    entry_vm,
    external_sources,
    plan_externals,
    saved_externals,
)
from vml.records import Record


@dataclass
class CommitResult(Record):
    """What ``vml commit`` made."""

    entry: str
    commit: str
    kind: str
    parent: str | None
    read_bytes: int
    stored_bytes: int
    logical_bytes: int
    seconds: float
    changed_files: list[str]
    tag: str | None
    branch: str | None
    crash_consistent: bool = False  # saved running, with --force-running
    external: list[ExternalFile] = field(default_factory=list)  # saved from outside the area
    repacked: RepackResult | None = None  # small packs rolled up after the save
    repack_problem: str | None = None  # why that failed (the entry is saved all the same)
    branch_moved_on: str | None = None  # the branch another area moved on: left, no longer followed
    live: dict[str, object] | None = None  # saved while running under `vml run` (vm.live)
    # What the user should know about how the save went (the area cache not
    # written, a dirty bitmap not used and why); the entry is saved all the same.
    notes: list[str] = field(default_factory=list)


def _chain_root(reader: PackReader, commit: bytes) -> bytes:
    """The full entry at the root of ``commit``'s dependency chain."""
    seen = 0
    while True:
        e = read_entry(reader, commit)
        if e.parent is None:
            return commit
        commit = e.parent
        seen += 1
        if seen > 1 << 20:
            raise CorruptRepository("entry chain has no root (a cycle?)")


def check_kind(kind: str | None, base: str | None) -> str | None:
    """The entry kind asked for, refusing combinations that make no sense."""
    if kind not in (None, "full", "incremental", "differential"):
        raise UsageError(
            f"unknown entry kind {kind!r}", "use --full, --incremental or --differential"
        )
    if base is not None and kind not in (None, "differential"):
        raise UsageError("--base goes with --differential", "add --differential or drop --base")
    return "differential" if base is not None else kind


@dataclass
class Plan:
    """Which entry the new one sits on, and what the area holds."""

    kind: str
    parent: Entry | None
    held: Entry | None  # the entry the area holds (its cache describes it)

    @property
    def parent_id(self) -> bytes | None:
        return self.parent.commit if self.parent is not None else None

    @property
    def held_id(self) -> bytes | None:
        return self.held.commit if self.held is not None else None


def choose_parent(
    repo: Repository,
    reader: PackReader,
    table: refs_mod.RefTable,
    state: AreaState,
    kind: str | None,
    base: str | None,
) -> Plan:
    """The kind and parent of the new entry: an area's first save is full."""
    held_id = bytes.fromhex(state.entry) if state.entry else None
    if held_id is not None and held_id not in set(table.entries.values()):
        held_id = None  # the area was built from another repository
    if held_id is None:
        if base is not None:
            raise UsageError("the area has no entry yet, so its first save is full", "drop --base")
        kind = "full"
    kind = kind or "incremental"
    parent_id: bytes | None
    if kind == "full":
        parent_id = None
    elif kind == "incremental":
        parent_id = held_id
    else:
        assert held_id is not None
        parent_id = (
            refs_mod.resolve_name(repo, base, table)
            if base is not None
            else _chain_root(reader, held_id)
        )
    parent = read_entry(reader, parent_id) if parent_id is not None else None
    # Usually the same entry (an incremental save): read it once.
    held = parent if held_id == parent_id else None
    if held is None and held_id is not None:
        held = read_entry(reader, held_id)
    return Plan(kind, parent, held)


def _area_state(repo: Repository, area: Path, move: bool) -> AreaState:
    """The area's state, refusing an area a checkout left half-written.

    An area saved to another repository moves to this one only on request
    (``move``): its entries are elsewhere, so its next save here is full, and
    saving it here by mistake (another ``--repo`` or ``$VML_REPO``) would
    silently split its history in two.
    """
    state = load_state(area) or AreaState()
    if state.pending:
        raise AreaError(
            f"a checkout of {state.pending[:12]} into {area} was interrupted",
            f"run `vml checkout {state.pending[:12]} {area}` to finish it first",
        )
    if state.repository and not move and not same_folder(Path(state.repository), repo.path):
        gone = "" if Path(state.repository).is_dir() else " (no longer there)"
        raise UsageError(
            f"the area {area} was saved to {state.repository}{gone}, not to {repo.path}",
            f"pass --move to save it to {repo.path} from now on, "
            f"or --repo {state.repository} to keep saving it there",
        )
    return state


@dataclass
class Listing:
    """What a save reads: the files, the empty folders, and which files came from outside."""

    files: list[SourceFile]
    dirs: list[str]
    externals: list[ExternalFile]
    folders: list[FolderRecord]
    root_perm: int


def list_files(
    repo: Repository,
    area: Path,
    plan: Plan,
    sources: list[str],
    read_from: Mapping[str, Path] | None = None,
) -> Listing:
    """The files to save (with those from outside the area) and the empty folders.

    ``read_from`` maps area paths to the files to read instead (a live
    save's copies); a path the area lacks is added.
    """
    rules = IgnoreRules.load(area)
    scan = scan_area(area, rules.is_ignored, foreign_folders(repo))
    externals, found = _add_externals(sources, scan.files, plan.parent, plan.held)
    outside = {e.path: Path(e.source) for e in externals}
    files = [SourceFile(f.path, outside.get(f.path, area / f.path), f.stat) for f in found]
    if read_from:
        files = [f for f in files if f.path not in read_from]
        files += [SourceFile(rel, src, os.stat(src)) for rel, src in read_from.items()]
        files.sort(key=lambda f: f.path)
    folders = [folder_record(f.path, f.stat) for f in scan.folders]
    return Listing(files, scan.empty_dirs, externals, folders, scan.root.st_mode & PERM_BITS)


@dataclass
class _Ask:
    """What the user asked of this save."""

    message: str
    tag: str | None
    allow_empty: bool
    kind: str | None
    base: str | None
    force_running: bool
    include_external: bool
    move: bool
    live: dict[str, object] | None = None  # a live save's record (vm.live)
    # What may have changed in each file (dirty bitmaps, a live save's copies).
    changes: dict[str, Changed] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the save read the disks


def _baseline(repo: Repository, area: Path, plan: Plan, state: AreaState) -> Baseline:
    cache: Cache | None = Cache(area, repo.page_size, repo.block_size)
    if plan.held is None or cache is None or not cache.valid_for(state.entry):
        cache = None  # it describes no entry this save knows
    return Baseline(
        parent=plan.parent_id,
        parent_files={f.path: f for f in plan.parent.meta.files} if plan.parent else {},
        held=plan.held_id,
        held_files={f.path: f for f in plan.held.meta.files} if plan.held else {},
        cache=cache,
    )


def _listing_order(records: list[FileRecord], listing: Listing) -> list[FileRecord]:
    """``records`` in the order of ``listing``'s files."""
    at = {f.path: i for i, f in enumerate(listing.files)}
    return sorted(records, key=lambda r: at.get(r.path, len(at)))


def _describe(
    plan: Plan, area: Path, state: AreaState, ask: _Ask, saver: Saver, listing: Listing, vm: VMInfo
) -> EntryMeta:
    """The new entry's metadata."""
    return EntryMeta(
        kind=plan.kind,
        parent=plan.parent_id.hex() if plan.parent_id else None,
        area=str(area.resolve()),
        area_id=state.area_id,
        created=now_iso(),
        message=ask.message,
        # In the listing's order, whatever order they were saved in.
        files=_listing_order(saver.records, listing),
        dirs=listing.dirs,
        vm=_with_live(entry_vm(vm, listing.externals), ask.live),
        stats={"read_bytes": saver.read_bytes, "stored_bytes": 0, "logical_bytes": saver.total},
        folders=listing.folders,
        root_perm=listing.root_perm,
    )


def _with_live(doc: dict[str, object], live: dict[str, object] | None) -> dict[str, object]:
    """An entry saved live holds a consistent running state, not a crash-consistent one."""
    if live is not None:
        doc["crash_consistent"] = False
        doc["live"] = live
    return doc


def _settle_area(
    repo: Repository, area: Path, state: AreaState, saver: Saver, made: Published
) -> None:
    """The area holds the new entry now: its cache and state say so."""
    saver.cache_writer.commit(made.commit.hex())
    state.entry = made.commit.hex()
    state.branch = made.branch
    state.branch_at = made.commit.hex() if made.branch else None
    state.repository = str(repo.path.resolve())
    save_state(area, state)
    repo.register_area(area)


def _consolidate(repo: Repository, progress: ProgressFn) -> tuple[RepackResult | None, str | None]:
    """Roll small packs up past the limit; the entry is saved, so this never fails it."""
    try:
        return auto_consolidate(repo, progress), None
    except VMLError as e:
        return None, e.message
    except OSError as e:
        return None, f"packs were not consolidated: {e.strerror or e}"


def commit(
    repo: Repository,
    area: Path,
    *,
    message: str = "",
    kind: str | None = None,
    base: str | None = None,
    tag: str | None = None,
    allow_empty: bool = False,
    force_running: bool = False,
    include_external: bool = False,
    move: bool = False,
    progress: ProgressFn = no_progress,
    sources: Mapping[str, Path] | None = None,
    live: dict[str, object] | None = None,
    qmp: Path | None = None,
    libvirt_uri: str | None = None,
) -> CommitResult:
    """Save ``area`` as a new entry of ``repo``.

    ``kind`` is "full", "incremental" (the default) or "differential"
    (against ``base``, by default the full entry at the root of the area's
    chain).  An area's first save is always full.

    A VM that runs under ``vml run`` is saved live (``live_snapshot``): its
    memory, device state and disks are copied aside while it is paused, and
    ``sources`` (area path -> file to read instead) points the save at the
    copies; ``live`` is recorded as the entry's ``vm.live``.  So is a QEMU
    VML did not start, through its QMP socket ``qmp``, and a running libvirt
    domain (``libvirt_uri``, default ``qemu:///system``): ``saves.live_source``.
    """
    t0 = time.monotonic()
    ask = _Ask(message, tag, allow_empty, kind, base, force_running, include_external, move, live)
    if not area.is_dir():
        raise AreaError(
            f"no working area at {area}", "check the path, or `vml checkout` into it first"
        )
    check_area_path(repo, area)
    if qmp is not None and force_running:
        raise UsageError("--qmp and --force-running exclude each other", "choose one")
    # One command at a time may change an area (a checkout must not rewrite
    # files a commit is reading); held to the end, so the area state is ours.
    with lock_area(area):
        if sources is None and not force_running:
            if qmp is None and vml_vm(area) is not None and find_spec(area) is not None:
                return _commit_live(repo, area, ask, progress, t0)
            source = foreign_source(area, qmp=qmp, libvirt_uri=libvirt_uri)
            if source is not None:
                return _commit_foreign(repo, area, ask, progress, source, t0)
        return _commit_locked(repo, area, ask, progress, sources, t0)


def _commit_foreign(
    repo: Repository,
    area: Path,
    ask: _Ask,
    progress: ProgressFn,
    source: AbstractContextManager[Snapshot],
    t0: float,
) -> CommitResult:
    """Save through QMP or libvirt; the overlays are merged back when ``source`` closes."""
    res: CommitResult | None = None
    try:
        with source as snap:
            ask.live = snap.record()
            res = _commit_locked(repo, area, ask, progress, snap.files, t0)
    except VMControlError as e:
        first = e.__context__
        if res is None and isinstance(first, VMLError) and first is not e:
            # The save failed, then merging back failed too: the save's own
            # error is what to read first; the merge is said after it.
            first.message += f" (then: {e.message})"
            first.args = (first.message,)
            raise first from None
        if res is None:
            raise
        # The entry is published: a failure to merge back is said, not an
        # error (a script retrying the save would make a second entry).
        res.notes.append(f"{e.message}; {e.remedy}" if e.remedy else e.message)
    assert res is not None
    return res


def _held_for_changes(repo: Repository, area: Path, ask: _Ask) -> str | None:
    """The entry an incremental save would sit on (what dirty bitmaps count from), or None."""
    state = load_state(area)
    if state is None or not state.entry or ask.kind not in (None, "incremental"):
        return None
    if ask.base is not None or ask.move:
        return None
    table = refs_mod.read_refs(repo)
    return state.entry if bytes.fromhex(state.entry) in set(table.entries.values()) else None


def _commit_live(
    repo: Repository, area: Path, ask: _Ask, progress: ProgressFn, t0: float
) -> CommitResult:
    """Save a VM running under ``vml run``: pause, copy what changed, continue, then save.

    The disks' dirty bitmaps are rotated in the pause; once the save is
    published (or failed) they are settled and recorded for the next one.
    """
    # Only a live save needs these (a save at rest does not pay for importing them).
    from vml.plumbing import dirty
    from vml.plumbing.vm.live import live_snapshot, settle_rotations

    spec = find_spec(area)
    assert spec is not None
    held = _held_for_changes(repo, area, ask)
    refs = dirty.live_refs(area, spec, Cache(area, repo.page_size, repo.block_size), held)
    try:
        with live_snapshot(area, refs.refs) as snap:
            ask.live = snap.record()
            ask.changes = {rel: Changed(r, partial=True) for rel, r in snap.changed.items()}
            ask.notes = refs.notes + snap.notes
            saved: str | None = None
            try:
                res = _commit_locked(repo, area, ask, progress, snap.files, t0)
                saved = res.commit
                return res
            finally:
                settled = settle_rotations(area, snap.rotations, saved is not None)
                dirty.settle_live(area, spec, snap.rotations, settled, saved)
    finally:
        refs.close()


def _at_rest_changes(repo: Repository, area: Path, ask: _Ask, plan: Plan, listing: Listing) -> None:
    """Where a VM at rest keeps dirty bitmaps (qcow2), read only what they mark."""
    spec = find_spec(area)
    if spec is None or plan.held is None or plan.parent_id != plan.held_id:
        return
    # QEMU's bitmaps and qcow2 code: a VM of another hypervisor does not import them.
    from vml.plumbing import dirty

    cache = Cache(area, repo.page_size, repo.block_size)
    read = set()
    for f in listing.files:
        cf = cache.files.get(f.path)
        if cf is None or cf.stat != stat_signature(f.stat):
            read.add(f.path)
    changes, notes = dirty.at_rest(area, spec, cache, plan.held.commit.hex(), read)
    ask.changes.update(changes)
    ask.notes += notes


def _commit_locked(
    repo: Repository,
    area: Path,
    ask: _Ask,
    progress: ProgressFn,
    sources: Mapping[str, Path] | None,
    t0: float,
) -> CommitResult:
    """The save itself, the area lock held: choose the parent, list, save, publish, settle."""
    if ask.live is not None:  # vm.live says through what it was saved
        ask.live = {"via": "vml run", "resume_file": None, "domain": None, **ask.live}
    kind = check_kind(ask.kind, ask.base)
    table = refs_mod.read_refs(repo)
    if ask.tag is not None:
        refs_mod.check_name("tag", ask.tag)
        if ask.tag in table.tags:
            raise UsageError(f"tag {ask.tag!r} exists already", "choose another name")
    state = _area_state(repo, area, ask.move)
    # A QEMU saved through its QMP socket or libvirt holds the area's images
    # (the save checked they are the ones it writes): its locks are expected.
    foreign = ask.live is not None and ask.live.get("via") in FOREIGN
    vm = check_saveable(
        area,
        force_running=ask.force_running or foreign,
        include_external=ask.include_external,
        live=ask.live is not None,
    )
    # Everything the VM needs outside the area, found (or refused) before
    # anything is written: an entry missing one could not be rebuilt.
    outside = external_sources(area, vm) if ask.include_external else []
    reader = PackReader(repo)
    try:
        plan = choose_parent(repo, reader, table, state, kind, ask.base)
        listing = list_files(repo, area, plan, outside, sources)
        if sources is None and vm.power_state != "running":
            _at_rest_changes(repo, area, ask, plan, listing)
        for f in listing.files:
            f.changed = ask.changes.get(f.path)
        made, saver, changed = _save(
            repo, reader, area, plan, state, listing, vm, ask, table, progress
        )
        _settle_area(repo, area, state, saver, made)
    finally:
        reader.close()
    repacked, problem = _consolidate(repo, progress)
    return CommitResult(
        entry=f"E{made.number}",
        commit=made.commit.hex(),
        kind=plan.kind,
        parent=made.table.label(plan.parent_id),
        read_bytes=saver.read_bytes,
        stored_bytes=saver.stored_bytes,
        logical_bytes=saver.total,
        seconds=time.monotonic() - t0,
        changed_files=changed,
        tag=ask.tag,
        branch=made.branch,
        branch_moved_on=made.moved_on,
        crash_consistent=vm.power_state == "running" and ask.live is None,
        external=listing.externals,
        repacked=repacked,
        repack_problem=problem,
        live=ask.live,
        notes=ask.notes + saver.notes(),
    )


def _save(
    repo: Repository,
    reader: PackReader,
    area: Path,
    plan: Plan,
    state: AreaState,
    listing: Listing,
    vm: VMInfo,
    ask: _Ask,
    table: refs_mod.RefTable,
    progress: ProgressFn,
) -> tuple[Published, Saver, list[str]]:
    """Save every file, refuse an empty save, publish; nothing stays behind on failure."""
    total = sum(f.stat.st_size for f in listing.files)
    pool = make_pool()
    saver = Saver(
        repo,
        reader,
        pool,
        area,
        _baseline(repo, area, plan, state),
        total,
        progress,
        to_read=sum(data_estimate(f.stat) for f in listing.files),
    )
    try:
        try:
            # Memory last: its pages may then reference the disks' (page cache).
            for f in sorted(listing.files, key=lambda f: is_memory(f.path)):
                f.memory = is_memory(f.path)
                saver.save(f)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        held_files = {f.path: f for f in plan.held.meta.files} if plan.held else {}
        changed = _changed_files(saver.records, held_files, listing, plan.held)
        if plan.held is not None and not changed and not ask.allow_empty:
            raise NothingToCommit(f"nothing changed in {area} since {table.label(plan.held_id)}")
        meta = _describe(plan, area, state, ask, saver, listing, vm)
        root = saver.finish(meta)
        made = publish_entry(
            repo,
            reader,
            saver,
            root,
            parent=plan.parent_id,
            kind=plan.kind,
            message=ask.message,
            area=area,
            tag=ask.tag,
            branch=state.branch,
            # Areas saved before VML kept branch_at saw the branch at their entry.
            branch_at=bytes.fromhex(state.branch_at) if state.branch_at else plan.held_id,
        )
    except BaseException:
        # Nothing of this save may stay behind: its cache and, before the
        # pack was sealed, the pack itself.
        saver.abort()
        raise
    return made, saver, changed


def _add_externals(
    sources: list[str], files: list[AreaFile], parent: Entry | None, held: Entry | None
) -> tuple[list[ExternalFile], list[AreaFile]]:
    """Name the files saved from outside the area and add them to the area's files.

    A file a checkout restored as the copy of an external file, untouched
    since (size and mtime as recorded), gives way to that file read afresh.
    """
    if not sources:
        return [], files
    previous = saved_externals(parent.meta.vm if parent else None)
    restored: set[str] = set()
    if held is not None:
        records = {f.path: f for f in held.meta.files}
        previous += saved_externals(held.meta.vm)
        for af in files:
            rec = records.get(af.path)
            if (
                rec is not None
                and any(e.path == af.path for e in saved_externals(held.meta.vm))
                and rec.size == af.stat.st_size
                and rec.mtime_ns == af.stat.st_mtime_ns
            ):
                restored.add(af.path)
    plan, replaced = plan_externals(sources, [f.path for f in files], previous, restored)
    kept = [f for f in files if f.path not in replaced]
    kept += [AreaFile(e.path, os.stat(e.source)) for e in plan]
    kept.sort(key=lambda f: f.path)
    return plan, kept


def _changed_files(
    records: list[FileRecord],
    old: dict[str, FileRecord],
    listing: Listing,
    old_entry: Entry | None,
) -> list[str]:
    """Paths that differ from the area's entry (content, permissions or presence)."""
    out = []
    new = {r.path: r for r in records}
    for p, r in new.items():
        o = old.get(p)
        if (
            o is None
            or o.sha256 != r.sha256
            or o.size != r.size
            or o.mode != r.mode
            or o.permissions != r.permissions
        ):
            out.append(p)
    out += [p for p in old if p not in new]
    old_dirs = old_entry.meta.dirs if old_entry is not None else []
    if sorted(listing.dirs) != sorted(old_dirs):
        out += sorted(set(listing.dirs) ^ set(old_dirs))
    meta = old_entry.meta if old_entry is not None else None
    out += folder_changes(meta, listing.folders, listing.root_perm)
    return sorted(set(out))
