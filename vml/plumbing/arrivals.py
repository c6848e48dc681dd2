"""Entries that arrived from another repository: their chains, E-numbers and ancestry.

What a fetch, clone or pull takes in (and what ``vml gc --repair`` numbers
again, renumber.py) is read as entries here: the chain behind each tip,
the local E-numbers given to those that have none, whether one entry
descends from another (a fast-forward), and the block size they were saved
with.  The transfer itself and the remotes' configuration are remotes.py's,
which a command that only lists or configures remotes loads alone.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping

from vml.errors import CorruptRepository
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import read_entry, resolve_image
from vml.plumbing.entries import Entry
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository


def _load(reader: PackReader, commit: bytes) -> Entry | None:
    try:
        return read_entry(reader, commit)
    except CorruptRepository:
        return None  # not a VML entry (someone's plain git commit): leave it unnamed


def chain_entries(
    reader: PackReader, tips: Iterable[bytes], stop: set[bytes]
) -> dict[bytes, Entry]:
    """Every entry reachable from ``tips`` by parent links, not walking past ``stop``."""
    found: dict[bytes, Entry] = {}
    stack = [t for t in tips if t not in stop]
    while stack:
        c = stack.pop()
        if c in found or c in stop:
            continue
        e = _load(reader, c)
        if e is None:
            continue
        found[c] = e
        if e.parent is not None:
            stack.append(e.parent)
    return found


def plan_numbers(
    repo: Repository,
    tips: Iterable[bytes],
    hints: Mapping[bytes, int] | None = None,
    keep_hinted: bool = False,
) -> list[tuple[int, bytes]]:
    """The local E-number every unnumbered entry reachable from ``tips`` gets; writes nothing.

    Call under the repository lock.  Parents are numbered before children;
    among ready entries the remote's number (``hints``), then the creation
    time, then the number the entry had where it was saved, decides.  With
    ``keep_hinted`` (a clone into an empty repository), an entry takes its
    hinted number when that number is free here.  Returns ``(number,
    commit)`` pairs, each entry after its parent.
    """
    hints = hints or {}
    table = refs_mod.read_refs(repo)
    numbered = set(table.entries.values())
    reader = PackReader(repo)  # a new reader sees the packs that just arrived
    try:
        found = chain_entries(reader, tips, numbered)
    finally:
        reader.close()
    if not found:
        return []
    made: list[tuple[int, bytes]] = []
    taken = set(table.entries)
    parent_of = {c: e.parent for c, e in found.items()}
    if keep_hinted:
        for c in sorted(found, key=lambda c: hints.get(c, 1 << 62)):
            n = hints.get(c)
            if n is not None and n > 0 and n not in taken:
                taken.add(n)
                made.append((n, c))
        done = {c for _n, c in made}
        found = {c: e for c, e in found.items() if c not in done}

    def key(c: bytes) -> tuple[int, int, int, bytes]:
        # the remote's number, then creation time, then the number the entry
        # had where it was saved (its VML-Entry trailer), then the id
        e = found[c]
        m = re.fullmatch(r"E([0-9]+)", e.trailers.get("VML-Entry", ""))
        return (hints.get(c, 1 << 62), e.commit_time, int(m.group(1)) if m else 1 << 62, c)

    children: dict[bytes, list[bytes]] = {}
    ready: list[tuple[int, int, int, bytes]] = []
    for c, e in found.items():
        if e.parent is not None and e.parent in found:
            children.setdefault(e.parent, []).append(c)
        else:
            heapq.heappush(ready, key(c))
    nxt = refs_mod.next_number(repo, taken)
    while ready:
        c = heapq.heappop(ready)[-1]
        made.append((nxt, c))
        nxt += 1
        for k in children.get(c, []):
            heapq.heappush(ready, key(k))
    return _parents_first(made, parent_of)


def _parents_first(
    made: list[tuple[int, bytes]], parent_of: Mapping[bytes, bytes | None]
) -> list[tuple[int, bytes]]:
    """``made`` reordered so that an entry comes after its parent (a stable sort otherwise).

    Refs are created in this order: a kill between two leaves no numbered
    entry whose parent is an unnumbered one.
    """
    pending = {c for _n, c in made}
    out: list[tuple[int, bytes]] = []
    left = list(made)
    while left:
        later = []
        for n, c in left:
            if parent_of.get(c) in pending:
                later.append((n, c))
            else:
                out.append((n, c))
                pending.discard(c)
        if len(later) == len(left):  # a cycle cannot be: parents are older commits
            out += later
            break
        left = later
    return out


def entry_moves(made: Iterable[tuple[int, bytes]]) -> list[refs_mod.RefMove]:
    """The ref creations that give ``(number, commit)`` pairs their numbers."""
    return [refs_mod.create(refs_mod.entry_ref(n), c) for n, c in made]


def number_entries(
    repo: Repository,
    tips: Iterable[bytes],
    hints: Mapping[bytes, int] | None = None,
    keep_hinted: bool = False,
) -> list[tuple[int, bytes]]:
    """Give every unnumbered entry reachable from ``tips`` a local E-number (:func:`plan_numbers`).

    Call under the repository lock.  The refs are made as one
    (:func:`refs.move_refs`): a ref lock in the way numbers nothing.
    Returns ``(number, commit)`` pairs made, parents first.
    """
    made = plan_numbers(repo, tips, hints, keep_hinted)
    refs_mod.move_refs(repo, entry_moves(made))
    refs_mod.note_numbers(repo, [n for n, _c in made])
    return made


def is_ancestor(reader: PackReader, old: bytes, new: bytes) -> bool:
    """True when entry ``old`` is ``new`` or one of its ancestors (a fast-forward)."""
    c: bytes | None = new
    guard = 0
    while c is not None and guard <= 1 << 20:
        if c == old:
            return True
        if not reader.contains(c):
            return False
        e = _load(reader, c)
        c = e.parent if e is not None else None
        guard += 1
    return False


def block_size_of(repo: Repository, commits: Iterable[bytes]) -> tuple[int, int] | None:
    """``(block size, page size)`` of the first image manifest found among ``commits``."""
    reader = PackReader(repo)
    try:
        for c in commits:
            e = _load(reader, c)
            if e is None:
                continue
            for f in e.meta.files:
                if f.kind == "image":
                    img = resolve_image(reader, c, f.path)
                    if img is not None:
                        return img.manifest.block_size, img.manifest.page_size
    finally:
        reader.close()
    return None
