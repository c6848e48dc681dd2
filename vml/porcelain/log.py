"""``vml log`` and ``vml show``: the entry forest and one entry in detail."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from vml.errors import CorruptRepository
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import commit_tree_parent, read_entry
from vml.plumbing.entries import Entry
from vml.plumbing.forest import repository_areas
from vml.plumbing.packreader import PackReader
from vml.plumbing.remotes import read_origins
from vml.plumbing.repository import Repository
from vml.plumbing.rewrite import history
from vml.porcelain.common import label
from vml.porcelain.vminfo import EntryVM
from vml.records import Record


@dataclass
class LogEntry(Record):
    """One entry as ``vml log`` shows it."""

    id: str
    kind: str
    parent: str | None
    commit: str
    message: str
    created: str
    stored_bytes: int
    logical_bytes: int
    read_bytes: int
    labels: list[str] = field(default_factory=list)
    areas: list[str] = field(default_factory=list)  # areas that hold this entry
    origin_area: str = ""
    remote: str = ""  # where a fetched entry came from: "origin E5", "origin" (issue 6)
    vm: EntryVM | None = None
    children: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # what rm/convert/prune did (issue 4)
    damage: str | None = None  # why the entry cannot be read (then kind is "damaged")


@dataclass
class LogResult:
    """The forest: entries by id and the roots, oldest first."""

    entries: dict[str, LogEntry]
    roots: list[str]

    def oldest_first(self) -> list[LogEntry]:
        """The entries by creation time (what ``vml log --json`` lists)."""
        return sorted(self.entries.values(), key=lambda x: x.created)


def _areas_by_entry(repo: Repository) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in repository_areas(repo):  # an unreadable area must not break the log
        if a.state.entry:
            out.setdefault(a.state.entry, []).append(str(a.path))
    return out


def _log_entry(
    e: Entry, table: refs_mod.RefTable, labels: dict[bytes, list[str]], held: dict[str, list[str]]
) -> LogEntry:
    return LogEntry(
        id=label(table, e.commit) or e.hex,
        kind=e.meta.kind,
        parent=label(table, e.parent),
        commit=e.hex,
        message=e.message,
        created=e.meta.created,
        stored_bytes=int(e.meta.stats.get("stored_bytes", 0)),
        logical_bytes=int(e.meta.stats.get("logical_bytes", 0)),
        read_bytes=int(e.meta.stats.get("read_bytes", 0)),
        labels=labels.get(e.commit, []),
        areas=held.get(e.hex, []),
        origin_area=e.meta.area,
        vm=EntryVM.from_metadata(e.meta.vm),
        rewritten=history(e.trailers),
    )


def _damaged_entry(
    reader: PackReader,
    commit: bytes,
    table: refs_mod.RefTable,
    labels: dict[bytes, list[str]],
    held: dict[str, list[str]],
    why: str,
) -> LogEntry:
    """An entry that cannot be read, shown as such (its parent when the commit says it)."""
    try:
        parent = commit_tree_parent(reader, commit)[1]
    except CorruptRepository:
        parent = None
    return LogEntry(
        id=label(table, commit) or commit.hex(),
        kind="damaged",
        parent=label(table, parent),
        commit=commit.hex(),
        message="",
        created="",
        stored_bytes=0,
        logical_bytes=0,
        read_bytes=0,
        labels=labels.get(commit, []),
        areas=held.get(commit.hex(), []),
        damage=why,
    )


def log(repo: Repository, only_tree_of: str | None = None, limit: int | None = None) -> LogResult:
    """Every entry, as a forest.  With ``only_tree_of`` (a commit id), only its tree.

    With ``limit``, only the ``limit`` newest (highest E-number first, as
    ``vml log`` prints them), as the forest they make among themselves: an
    entry whose parent is left out is a root.  Only the metadata of the
    entries listed is read (and, to find a tree, the commits of the chains
    below them): the cost follows what is shown, not the repository.

    An entry that cannot be read is listed with ``damage`` set; the others
    are listed as always.
    """
    table = refs_mod.read_refs(repo)
    labels = table.labels()
    held = _areas_by_entry(repo)
    origins = read_origins(repo)
    reader = PackReader(repo)
    try:
        # Each commit once, under its lowest number, oldest first.
        numbered: dict[bytes, int] = {}
        for n, c in sorted(table.entries.items()):
            numbered.setdefault(c, n)
        wanted = _chosen(reader, numbered, only_tree_of, limit)
        if wanted is not None:
            numbered = {c: n for c, n in numbered.items() if c in wanted}
        entries: dict[str, LogEntry] = {}
        parents: dict[str, str | None] = {}
        order: list[tuple[int, str]] = []
        for c, n in numbered.items():
            try:
                le = _log_entry(read_entry(reader, c), table, labels, held)
            except CorruptRepository as err:
                le = _damaged_entry(reader, c, table, labels, held, err.message)
            le.remote = origins[c].describe() if c in origins else ""
            entries[le.id] = le
            parents[le.id] = le.parent
            order.append((n, le.id))
    finally:
        reader.close()
    roots: list[str] = []
    for _n, i in order:
        p = parents[i]
        if p is not None and p in entries:
            entries[p].children.append(i)
        else:
            roots.append(i)
    return LogResult(entries, roots)


def _chosen(
    reader: PackReader, numbered: dict[bytes, int], only_tree_of: str | None, limit: int | None
) -> set[bytes] | None:
    """The entries to list: the ``limit`` highest-numbered of the tree holding ``only_tree_of``.

    No tree: the whole forest; no limit: all of them (None when that is
    every entry).  A tree is the entries whose chains, through numbered
    entries, end at the same one (the tree the full log draws it in).
    Only commits are read here, each once: the chain of each candidate
    down to a commit already placed.
    """
    newest_first = sorted(numbered, key=lambda c: numbered[c], reverse=True)
    try:
        tree = bytes.fromhex(only_tree_of) if only_tree_of is not None else None
    except ValueError:
        tree = None  # names no entry: the whole forest, as for an area holding none
    if tree is None or tree not in numbered:
        return None if limit is None else set(newest_first[:limit])
    roots: dict[bytes, bytes] = {}

    def root_of(c: bytes) -> bytes:
        chain: list[bytes] = []
        walked: set[bytes] = set()
        at = c
        while at not in roots:
            chain.append(at)
            walked.add(at)
            try:
                parent = commit_tree_parent(reader, at)[1]
            except CorruptRepository:
                parent = None  # listed as damaged, a root of its own
            if parent is None or parent not in numbered or parent in walked:
                roots[at] = at
                break
            at = parent
        top = roots[at]
        for x in chain:
            roots[x] = top
        return top

    mine = root_of(tree)
    out: set[bytes] = set()
    for c in newest_first:
        if root_of(c) == mine:
            out.add(c)
            if len(out) == limit:
                break
    return out


@dataclass
class FileInfo(Record):
    """A file of an entry."""

    path: str
    kind: str
    size: int
    sha256: str
    mode: int


@dataclass
class ShowResult(Record):
    """One entry in detail."""

    entry: LogEntry
    files: list[FileInfo]
    chain: list[str]  # this entry first, then its parent, ... down to its full root
    dirs: list[str]

    json_flatten = ("entry",)


def show(repo: Repository, name: str) -> ShowResult:
    """Entry ``name`` with its files and the chain needed to build it."""
    table = refs_mod.read_refs(repo)
    commit = refs_mod.resolve_name(repo, name, table)
    reader = PackReader(repo)
    try:
        try:
            e = read_entry(reader, commit)
        except CorruptRepository as err:
            raise CorruptRepository(
                f"entry {label(table, commit)} is damaged: {err.message}", err.remedy
            ) from None
        le = _log_entry(e, table, table.labels(), _areas_by_entry(repo))
        origin = read_origins(repo).get(commit)
        le.remote = origin.describe() if origin is not None else ""
        chain = [le.id]
        p = e.parent
        guard = 0
        while p is not None:
            name_p = label(table, p) or p.hex()[:12]
            try:
                p = read_entry(reader, p).parent
            except CorruptRepository as err:
                # The entry is shown; the chain says where it breaks.
                chain.append(f"{name_p} (damaged: {err.message})")
                break
            chain.append(name_p)
            guard += 1
            if guard > 1 << 20:
                raise CorruptRepository("entry chain has no end (a cycle?)")
        files = [FileInfo(f.path, f.kind, f.size, f.sha256, f.mode) for f in e.meta.files]
        return ShowResult(le, files, chain, list(e.meta.dirs))
    finally:
        reader.close()


def human_time(iso: str) -> str:
    """``2026-11-27 12:31`` in local time, from an ISO string."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso
