"""``vml status``: what changed in an area since the entry it holds."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import AreaError, CorruptRepository
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import AreaState, Scan, load_state, scan_area, stat_signature
from vml.plumbing.cache import Cache, block_hash, page_hashes
from vml.plumbing.chains import read_entry
from vml.plumbing.entries import (
    PERM_BITS,
    Entry,
    folder_changes,
    folder_record,
    same_attributes,
)
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.vm.formats import data_ranges
from vml.plumbing.vm.ignore import IgnoreRules
from vml.plumbing.vm.inspect import inspect_area
from vml.plumbing.vm.qemu import run_status
from vml.porcelain.common import foreign_folders, label
from vml.porcelain.vminfo import EntryVM, RunState, saved_externals
from vml.records import Record


@dataclass
class FileChange(Record):
    """One file that differs from the area's entry."""

    path: str
    change: str  # "modified" | "added" | "removed"
    size: int
    changed_bytes: int | None = None  # for large files, when known


@dataclass
class StatusResult(Record):
    """The state of an area."""

    area: str
    entry: str | None
    commit: str | None
    branch: str | None
    pending: str | None
    changes: list[FileChange] = field(default_factory=list)
    vm: EntryVM | None = None  # the VM in the area now (not the entry's)
    # Why the entry the area holds cannot be read (changes are then unknown).
    damage: str | None = None
    entry_vm: EntryVM | None = None  # the VM as the entry recorded it (saved running? how?)

    json_extra = ("clean",)

    @property
    def clean(self) -> bool:
        """True when nothing changed since the entry (False when that cannot be told)."""
        return not self.changes and self.pending is None and self.damage is None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _changed_bytes(path: Path, cache: Cache, rel: str, size: int) -> int | None:
    """Bytes in pages whose hash differs from the cache's (None without records).

    Only blocks that hold data now or did then are looked at.
    """
    recs = cache.records(rel)
    if recs is None:
        return None
    from vml.plumbing.images import block_spans  # see area_changes

    bs = cache.block_size
    ps = cache.page_size
    changed = 0
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            nb = (size + bs - 1) // bs
            now = [n for a, b in block_spans(data_ranges(fd, size), bs, nb) for n in range(a, b)]
            for n in sorted(set(now).union(recs.data_blocks())):
                if n >= nb:
                    continue
                data = os.pread(fd, min(bs, size - n * bs), n * bs)
                old = recs.block_hash(n)
                if old is None:
                    changed += len(data)
                elif old != block_hash(data):
                    new_pages = page_hashes(data, ps, bs // ps)
                    old_pages = recs.page_hashes(n)
                    for k in range(0, len(data), ps):
                        i = 8 * (k // ps)
                        if new_pages[i : i + 8] != old_pages[i : i + 8]:
                            changed += min(ps, len(data) - k)
        finally:
            os.close(fd)
    finally:
        recs.close()
    return changed


def area_changes(
    area: Path,
    state: AreaState,
    entry: Entry | None,
    cache: Cache,
    *,
    detail: bool = True,
    scan: Scan | None = None,
) -> list[FileChange]:
    """Compare the area with its entry, reading only files whose ``stat`` changed.

    ``scan`` is the area's listing when the caller has just made it.
    """
    if scan is None:
        scan = scan_area(area, IgnoreRules.load(area).is_ignored)
    files = scan.files
    old = {f.path: f for f in entry.meta.files} if entry else {}
    cache_ok = cache.valid_for(state.entry)
    out: list[FileChange] = []
    for af in files:
        st = af.stat
        o = old.pop(af.path, None)
        if o is None:
            out.append(FileChange(af.path, "added", st.st_size, st.st_size))
            continue
        same_mode = same_attributes(o, st.st_mode)
        cached = cache.files.get(af.path) if cache_ok else None
        if cached is not None and cached.stat == stat_signature(st) and same_mode:
            continue
        # The image code only for an image whose stat changed: `vml status`
        # and `vml areas` on areas saved as they are do not load it.
        from vml.plumbing.images import file_digest

        digest = (
            file_digest(area / af.path, cache.block_size)
            if o.kind == "image"
            else _sha256_file(area / af.path)
        )
        if st.st_size == o.size and digest == o.sha256:
            if not same_mode:  # only the permissions changed
                out.append(FileChange(af.path, "modified", st.st_size, 0))
            continue
        changed: int | None = None
        if o.kind == "image" and cached is not None and detail:
            changed = _changed_bytes(area / af.path, cache, af.path, st.st_size)
        elif o.kind == "small":
            changed = st.st_size
        out.append(FileChange(af.path, "modified", st.st_size, changed))
    # Files saved from outside the area (--include-external) are not expected
    # in the area they were saved from; a checkout puts them in .external/.
    outside = {e.path for e in saved_externals(entry.meta.vm)} if entry else set()
    # A state saved live is consumed when `vml run` resumes it: not a loss.
    live = entry.meta.vm.get("live") if entry and entry.meta.vm else None
    if isinstance(live, dict):
        outside.update(
            live[k] for k in ("state_file", "resume_file") if isinstance(live.get(k), str)
        )
    for p, o in sorted(old.items()):
        if p in outside:
            continue
        out.append(FileChange(p, "removed", o.size, o.size))
    folders = [folder_record(f.path, f.stat) for f in scan.folders]
    meta = entry.meta if entry is not None else None
    for p in folder_changes(meta, folders, scan.root.st_mode & PERM_BITS):
        out.append(FileChange(p, "modified", 0, 0))  # its permissions
    return out


def status(repo: Repository, area: Path) -> StatusResult:
    """The area's entry and its changes since."""
    if not area.is_dir():
        raise AreaError(f"no working area at {area}", "check the path")
    state = load_state(area) or AreaState()
    table = refs_mod.read_refs(repo)
    reader = PackReader(repo)
    try:
        entry = None
        damage = None
        commit = bytes.fromhex(state.entry) if state.entry else None
        if commit is not None and commit in set(table.entries.values()):
            try:
                entry = read_entry(reader, commit)
            except CorruptRepository as err:
                damage = err.message
        changes: list[FileChange] = []
        if damage is None:
            cache = Cache(area, repo.page_size, repo.block_size)
            scan = scan_area(area, IgnoreRules.load(area).is_ignored, foreign_folders(repo))
            changes = area_changes(area, state, entry, cache, scan=scan)
        vm = inspect_area(area)
        run = run_status(area) if vm.power_state == "running" else None
        return StatusResult(
            area=str(area),
            entry=label(table, commit),
            commit=state.entry,
            branch=state.branch,
            pending=state.pending,
            changes=changes,
            vm=EntryVM(
                vm, vml_run=RunState(int(str(run["pid"])), str(run["state"])) if run else None
            ),
            damage=damage,
            entry_vm=EntryVM.from_metadata(entry.meta.vm) if entry is not None else None,
        )
    finally:
        reader.close()
