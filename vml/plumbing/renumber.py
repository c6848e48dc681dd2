"""Whole entries that lost their E-number: found by ``vml fsck``, numbered by ``vml gc --repair``.

Before the rewrite journal, a ``vml convert``, ``rm`` or ``prune`` killed
between its name moves could leave an area holding a rewritten commit no
``refs/vml/entries/<n>`` names, or an entry whose parent is such a commit.
The commit is a whole entry (its ``VML-Entry`` trailer says the number it
was saved as); only its name is missing.  Giving it the next free number
(its unnumbered ancestors first, as a fetch numbers what arrives) mends
the repository without pointing anything anywhere else: the areas keep
what they hold, no entry changes, nothing is deleted.

A commit whose chain does not read whole (a damaged entry ``vml rm
--force`` took the names off) is named but never numbered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.errors import CorruptRepository
from vml.plumbing import journal
from vml.plumbing import refs as refs_mod
from vml.plumbing.arrivals import number_entries
from vml.plumbing.chains import read_entry
from vml.plumbing.forest import Forest, repository_areas
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import entry_objects

REMEDY = "run `vml gc --repair` to number it"


@dataclass
class Unnamed:
    """A commit an area or an entry relies on that has no E-number."""

    commit: bytes
    who: str  # "area /path" or "E3's parent"
    saved_as: str | None  # its VML-Entry trailer (E2), when it reads as an entry
    whole: bool  # it and its chain read: gc --repair numbers it

    def message(self) -> str:
        """One line for fsck: what is wrong and what to do."""
        what = f"{self.who} {'holds' if self.who.startswith('area') else 'is'} "
        what += f"{self.commit.hex()[:12]}, which is no entry"
        if self.whole:
            was = f" (an entry saved as {self.saved_as})" if self.saved_as else ""
            return f"{what}{was}; {REMEDY}"
        return f"{what} and does not read whole; check out an entry there, or `vml rm` the entry"


def _whole(reader: PackReader, commit: bytes, entries: set[bytes]) -> tuple[bool, str | None]:
    """Does ``commit`` read as an entry, with everything it and its unnumbered ancestors need?"""
    saved_as: str | None = None
    c: bytes | None = commit
    first = True
    seen: set[bytes] = set()
    while c is not None and c not in entries and c not in seen:
        seen.add(c)
        try:
            e = read_entry(reader, c)
            for _item in entry_objects(reader, e):
                pass
        except CorruptRepository:
            return False, saved_as
        if first:
            saved_as = e.trailers.get("VML-Entry") or None
            first = False
        c = e.parent
    return c is None or c in entries, saved_as


def find_unnamed(
    repo: Repository, reader: PackReader, table: refs_mod.RefTable, forest: Forest
) -> list[Unnamed]:
    """Every commit an area holds or an entry has as parent that no E-number names.

    A parent the forest could not read is left out: the structure check
    names that damage already.  So is a commit a rewrite still has to move
    names off (an area another command held when it was replayed): it is
    no lost entry, and a number would make it one again beside the entry
    that replaced it.
    """
    entries = set(table.entries.values())
    moving = journal.moving(repo)
    wanted: list[tuple[bytes, str]] = []
    for a in repository_areas(repo):
        if a.state.entry and bytes.fromhex(a.state.entry) not in entries:
            wanted.append((bytes.fromhex(a.state.entry), f"area {Path(a.path)}"))
    for n, c in sorted(table.entries.items()):
        p = forest.parent.get(c)
        if p is not None and p not in entries and p not in forest.broken:
            wanted.append((p, f"E{n}'s parent"))
    wanted = [(c, who) for c, who in wanted if c not in moving]
    out: list[Unnamed] = []
    for commit, who in wanted:
        whole, saved_as = _whole(reader, commit, entries)
        out.append(Unnamed(commit, who, saved_as, whole))
    return out


def number_unnamed(repo: Repository) -> list[tuple[int, bytes]]:
    """Give each whole commit :func:`find_unnamed` finds (and its unnumbered ancestors) an E-number.

    Takes the repository lock.  Returns the ``(number, commit)`` pairs made.
    """
    from vml.plumbing.forest import load_forest

    with repo.lock():
        table = refs_mod.read_refs(repo)
        reader = PackReader(repo)
        try:
            forest = load_forest(reader, table)
            tips = [u.commit for u in find_unnamed(repo, reader, table, forest) if u.whole]
        finally:
            reader.close()
        return number_entries(repo, tips) if tips else []
