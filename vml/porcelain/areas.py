"""``vml areas``: the working areas that use a repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.errors import CorruptRepository, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state
from vml.plumbing.cache import Cache
from vml.plumbing.chains import read_entry
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.vm.qemu import run_status
from vml.porcelain.common import label
from vml.porcelain.status import area_changes
from vml.porcelain.vminfo import EntryVM, RunState
from vml.records import Record


@dataclass
class AreaSummary(Record):
    """One area: the entry it holds and whether it has unsaved changes."""

    path: str
    exists: bool
    entry: str | None
    branch: str | None
    dirty: bool | None  # None when it cannot be told (missing, unreadable)
    changed: list[str]
    pending: str | None
    vm: EntryVM | None = None
    damage: str | None = None  # why the entry it holds cannot be read
    vml_run: RunState | None = None  # its VM runs under `vml run` now


def _running(area: Path) -> RunState | None:
    """The QEMU ``vml run`` runs for ``area``, and its run state, if any."""
    run = run_status(area)
    return RunState(int(str(run["pid"])), str(run["state"])) if run is not None else None


def list_areas(repo: Repository) -> list[AreaSummary]:
    """Every area known to the repository, checked now."""
    table = refs_mod.read_refs(repo)
    known = set(table.entries.values())
    out: list[AreaSummary] = []
    reader = PackReader(repo)
    try:
        for p in repo.known_areas():
            area = Path(p)
            try:
                st = load_state(area) if area.is_dir() else None
            except VMLError:
                st = None
            if st is None:
                out.append(AreaSummary(p, area.is_dir(), None, None, None, [], None))
                continue
            commit = bytes.fromhex(st.entry) if st.entry else None
            entry = None
            damage = None
            changed: list[str] = []
            dirty: bool | None = None
            try:
                entry = read_entry(reader, commit) if commit in known and commit else None
            except CorruptRepository as err:
                damage = err.message  # this area only: the others are listed as always
            try:
                if damage is None:
                    changes = area_changes(
                        area, st, entry, Cache(area, repo.page_size, repo.block_size), detail=False
                    )
                    changed = [c.path for c in changes]
                    dirty = bool(changed) or st.pending is not None
            except VMLError:
                changed, dirty = [], None
            out.append(
                AreaSummary(
                    p,
                    True,
                    label(table, commit),
                    st.branch,
                    dirty,
                    changed,
                    st.pending,
                    EntryVM.from_metadata(entry.meta.vm) if entry else None,
                    damage,
                    _running(area),
                )
            )
    finally:
        reader.close()
    return out
