"""``vml verify``: check that entries rebuild, without writing an area."""

from __future__ import annotations

from dataclasses import dataclass, field

from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.forest import load_forest
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import (
    Problem,
    check_files,
    check_objects,
    check_structure,
    entries_using,
    needed_by,
)
from vml.porcelain.common import label, make_pool
from vml.progress import ProgressFn, Tally, no_progress
from vml.records import Record


@dataclass
class Finding(Record):
    """One problem, named for a user."""

    entry: str | None
    path: str | None
    message: str
    objects: list[str] = field(default_factory=list)


@dataclass
class CheckResult(Record):
    """What ``vml verify`` or ``vml fsck`` found."""

    checked: list[str]
    problems: list[Finding]
    affected: list[str]  # every entry a bad object or a broken structure affects
    read_data: bool = False
    checked_bytes: int = 0
    # Worth knowing, not damage: names some file systems would merge.
    notes: list[Finding] = field(default_factory=list)

    json_extra = ("clean",)

    @property
    def clean(self) -> bool:
        """True when nothing is wrong (notes do not count)."""
        return not self.problems


def findings(
    reader: PackReader,
    table: refs_mod.RefTable,
    all_commits: list[bytes],
    problems: list[Problem],
) -> tuple[list[Finding], list[str], list[Finding]]:
    """Name problems by entry, and trace them to every entry of ``all_commits`` they affect.

    An entry is affected when it needs a bad object, or when its content
    cannot be resolved at all (it is built on a damaged entry).  Returns the
    problems, the affected entries, and the notes (not damage).
    """
    out: list[Finding] = []
    notes: list[Finding] = []
    for p in problems:
        f = Finding(
            label(table, p.entry) if p.entry is not None else None,
            p.path,
            p.message,
            [o.hex() for o in p.objects],
        )
        into = notes if p.note else out
        if f not in into:  # the structure check and the object check may meet one fault
            into.append(f)
    problems = [p for p in problems if not p.note]
    bad = {o for p in problems for o in p.objects}
    hit = {p.entry for p in problems if p.entry is not None}
    hit |= entries_using(reader, all_commits, bad, unreadable=bool(problems))
    numbers = table.numbers()
    affected = sorted(hit, key=lambda c: (numbers.get(c, 1 << 62), c))
    return out, [label(table, c) or c.hex()[:12] for c in affected], notes


def pack_problems(repo: Repository) -> list[Problem]:
    """One problem per set-aside pack (its entries are named by what they miss)."""
    return [
        Problem(f"pack {name} is set aside: {why}; run `vml gc --repair`", None, f"{name}.idx")
        for name, why in repo.packs.set_aside(warn=False).items()
    ]


def verify(
    repo: Repository,
    names: list[str],
    *,
    all_entries: bool = False,
    read_data: bool = False,
    progress: ProgressFn = no_progress,
) -> CheckResult:
    """Check entries ``names`` (or every entry with ``all_entries``).

    Every object they need is read once and its id checked; with
    ``read_data`` every file is also rebuilt block by block in memory and its
    digest checked.  Nothing is written.
    """
    if bool(names) == all_entries:
        raise UsageError("name the entries to verify, or pass --all", "e.g. `vml verify --all`")
    table = refs_mod.read_refs(repo)
    commits: list[bytes] = []
    for n in names:
        c = refs_mod.resolve_name(repo, n, table)
        if c not in commits:
            commits.append(c)
    reader = PackReader(repo)
    pool = make_pool()
    try:
        forest = load_forest(reader, table)
        if all_entries:
            commits = sorted(set(table.entries.values()), key=lambda c: table.number_of(c) or 0)
            everything = sorted(set(forest.parent) | set(forest.broken))
            problems = pack_problems(repo)
            problems += check_structure(reader, table, forest=forest)[1]
        else:
            # Only what these entries are built on; traced to what is built on them.
            scope = needed_by(forest, commits)
            everything = sorted(scope.union(*(forest.descendants(c) for c in commits)))
            problems = check_structure(reader, table, only=scope, forest=forest)[1]
        tally = Tally(progress, "verify")
        if read_data:
            for c in commits:
                problems += check_files(reader, pool, c, tally.add)
        else:
            problems += check_objects(reader, commits, set(), progress)
        found, affected, notes = findings(reader, table, everything, problems)
        return CheckResult(
            checked=[label(table, c) or c.hex()[:12] for c in commits],
            problems=found,
            affected=affected,
            read_data=read_data,
            checked_bytes=tally.done,
            notes=notes,
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
