"""``vml rm``: remove entries, re-parenting their children onto their parent.

A metadata operation (see porcelain/reshape.py): each child of a removed
entry is re-expressed against the removed entry's parent; descendants,
E-numbers, tags, branches and areas follow.  No image data is copied.
"""

from __future__ import annotations

from vml.errors import CorruptRepository, UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import read_entry
from vml.plumbing.forest import load_forest, repository_areas
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import entry_objects
from vml.porcelain.common import label
from vml.porcelain.reshape import RmResult, entry_commit, remove_entries
from vml.progress import ProgressFn, no_progress


def check_removable(repo: Repository, table: refs_mod.RefTable, commit: bytes) -> list[str]:
    """Why removing ``commit`` needs ``--force`` (empty: it does not)."""
    why: list[str] = []
    for a in repository_areas(repo):
        if commit.hex() in (a.state.entry, a.state.pending):
            why.append(f"area {a.path} holds it")
    why += [f"tag {t} names it" for t, c in sorted(table.tags.items()) if c == commit]
    return why


def damage_of(reader: PackReader, commit: bytes) -> str | None:
    """Why entry ``commit``'s content cannot be resolved (its own or its chain's damage), or None."""
    try:
        for _item in entry_objects(reader, read_entry(reader, commit)):
            pass
    except CorruptRepository as err:
        return err.message
    return None


def rm(
    repo: Repository,
    names: list[str],
    *,
    force: bool = False,
    progress: ProgressFn = no_progress,
) -> RmResult:
    """Remove the entries ``names``; children move onto each removed entry's parent.

    An entry an area holds, or a tag names, is only removed with ``force``;
    so is a root entry a branch points at (the branch would go).  Every name
    is checked before anything changes.
    """
    if not names:
        raise UsageError("no entry to remove", "name one or more entries, e.g. `vml rm E3`")
    table = refs_mod.read_refs(repo)
    numbers: list[int] = []
    damaged: set[int] = set()
    reader = PackReader(repo)
    try:
        forest = load_forest(reader, table)
        for name in names:
            commit = entry_commit(repo, name, table)
            why = check_removable(repo, table, commit)
            if any(c == commit for c in table.branches.values()) and (
                forest.parent.get(commit) is None
            ):
                why += [
                    f"branch {b} points at it and would be deleted"
                    for b, c in sorted(table.branches.items())
                    if c == commit
                ]
            n = table.number_of(commit)
            assert n is not None
            broken = damage_of(reader, commit)
            kids = forest.children.get(commit, [])
            if broken is not None and kids:
                # Its children's layers rest on its data: they cannot be
                # re-expressed; --force removes it alone and leaves them.
                names_kids = ", ".join(label(table, k) or k.hex()[:12] for k in kids)
                why.append(
                    f"it is damaged ({broken}), so its children {names_kids} cannot be "
                    "re-expressed without it: with --force they stay as they are, still damaged"
                )
                damaged.add(n)
            if why and not force:
                raise UsageError(
                    f"{label(table, commit)} is still in use: {'; '.join(why)}",
                    "pass --force to remove it anyway",
                )
            if n not in numbers:
                numbers.append(n)
    finally:
        reader.close()
    report = RmResult()
    remove_entries(
        repo,
        forest,
        numbers,
        report,
        progress,
        force=force,
        damaged=frozenset(damaged),
        loaded_from=table,
    )
    return report
