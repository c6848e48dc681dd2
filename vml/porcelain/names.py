"""``vml branch`` and ``vml tag``: names for entries and lines of work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.errors import UnknownEntry, UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import AREA_DIR, AreaState, load_state, lock_area, save_state
from vml.plumbing.repository import Repository
from vml.porcelain.common import label
from vml.records import Record


@dataclass
class NameInfo(Record):
    """A tag or branch and the entry it names."""

    name: str
    entry: str
    commit: str
    current: bool = False  # for branches: the area follows it


def list_names(repo: Repository, kind: str, area: Path | None = None) -> list[NameInfo]:
    """Every tag or branch (``kind`` is "tag" or "branch")."""
    table = refs_mod.read_refs(repo)
    items = table.tags if kind == "tag" else table.branches
    following = None
    if area is not None and kind == "branch":
        st = load_state(area) if area.is_dir() else None
        following = st.branch if st else None
    return [
        NameInfo(n, label(table, c) or c.hex(), c.hex(), n == following)
        for n, c in sorted(items.items())
    ]


def _target(repo: Repository, entry: str | None, area: Path | None) -> bytes:
    table = refs_mod.read_refs(repo)
    if entry is not None:
        return refs_mod.resolve_name(repo, entry, table)
    st = load_state(area) if area is not None and area.is_dir() else None
    if st is None or not st.entry:
        raise UsageError(
            "no entry given and the current folder holds none", "name the entry, e.g. E3"
        )
    c = bytes.fromhex(st.entry)
    if c not in set(table.entries.values()):
        raise UnknownEntry(f"the area's entry {st.entry[:12]} is not in this repository")
    return c


def _create(
    repo: Repository, kind: str, prefix: bytes, name: str, entry: str | None, area: Path | None
) -> tuple[refs_mod.RefTable, bytes]:
    """Point new tag or branch ``name`` at an entry; the refs as read and the commit."""
    refs_mod.check_name(kind, name)
    commit = _target(repo, entry, area)
    remedy = "delete it first with --delete" if kind == "tag" else "choose another name"
    with repo.lock():
        table = refs_mod.read_refs(repo)
        if name in (table.tags if kind == "tag" else table.branches):
            raise UsageError(f"{kind} {name!r} exists already", remedy)
        refs_mod.set_ref(repo, prefix + name.encode(), commit)
    return table, commit


def create_tag(repo: Repository, name: str, entry: str | None, area: Path | None) -> NameInfo:
    """Tag an entry (the area's own when ``entry`` is None)."""
    table, commit = _create(repo, "tag", refs_mod.TAG_PREFIX, name, entry, area)
    return NameInfo(name, label(table, commit) or commit.hex(), commit.hex())


def delete_name(repo: Repository, kind: str, name: str) -> NameInfo:
    """Delete a tag or a branch (the entries stay)."""
    prefix = refs_mod.TAG_PREFIX if kind == "tag" else refs_mod.BRANCH_PREFIX
    with repo.lock():
        table = refs_mod.read_refs(repo)
        items = table.tags if kind == "tag" else table.branches
        if name not in items:
            raise UsageError(f"no {kind} named {name!r}", f"run `vml {kind}` to list them")
        c = items[name]
        refs_mod.delete_ref(repo, prefix + name.encode())
    return NameInfo(name, label(table, c) or c.hex(), c.hex())


def create_branch(
    repo: Repository, name: str, entry: str | None, area: Path | None, follow: bool = True
) -> NameInfo:
    """Start branch ``name`` at an entry; the area follows it when it holds that entry."""
    table, commit = _create(repo, "branch", refs_mod.BRANCH_PREFIX, name, entry, area)
    current = False
    if follow and area is not None and (area / AREA_DIR).is_dir():
        with lock_area(area):  # a save running there owns the area's state
            st = load_state(area) or AreaState()
            if st.entry == commit.hex():
                st.branch = name
                st.branch_at = commit.hex()
                save_state(area, st)
                current = True
    return NameInfo(name, label(table, commit) or commit.hex(), commit.hex(), current)
