"""The entry forest as a graph, and moving every name of a rewritten entry.

Reshaping the forest (``vml rm``, ``vml convert``, ``vml prune``) writes new
commits for some entries; an entry's E-number, its tags, the branches at it
and the areas holding it must then follow it to its new commit.  Every name
moves only after every new object is on disk.  The moves are planned as
steps (deepest entry first, each area before the refs of its entry, a
removed entry's E-numbers last), written down in the rewrite journal and
then made (journal.py): a command killed between two moves leaves states no
order avoids (an area on a commit that is no entry yet, an entry whose
parent is not named yet), and the next command that opens the repository
or takes its lock finishes the moves before it reads anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import ConcurrentChange, CorruptRepository, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import AreaLocks, AreaState, load_state
from vml.plumbing.chains import MAX_CHAIN, commit_tree_parent
from vml.plumbing.journal import Step, apply_steps
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository


@dataclass
class Forest:
    """Every commit reachable from the entry, tag and branch refs, with its parent."""

    parent: dict[bytes, bytes | None]
    children: dict[bytes, list[bytes]] = field(default_factory=dict)
    # Commits a ref or a parent link names that cannot be read (missing,
    # not a commit, several parents): why.  They are in no ``parent`` key;
    # their children, when known, are in ``children``.
    broken: dict[bytes, str] = field(default_factory=dict)

    def descendants(self, commit: bytes) -> list[bytes]:
        """Every commit below ``commit``, parents before children."""
        out: list[bytes] = []
        stack = list(reversed(self.children.get(commit, [])))
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(reversed(self.children.get(c, [])))
        return out

    def ancestors(self, commit: bytes) -> list[bytes]:
        """``commit``'s parent, grandparent, ... down to its root."""
        out: list[bytes] = []
        p = self.parent.get(commit)
        while p is not None:
            out.append(p)
            if len(out) > MAX_CHAIN:
                raise CorruptRepository("entry chain is implausibly long (a cycle?)")
            p = self.parent.get(p)
        return out

    def root(self, commit: bytes) -> bytes:
        """The full entry at the root of ``commit``'s chain."""
        up = self.ancestors(commit)
        return up[-1] if up else commit


def load_forest(reader: PackReader, table: refs_mod.RefTable) -> Forest:
    """Walk every ref's chain (commit headers only) into a :class:`Forest`.

    A commit that cannot be read ends its chain and is listed in
    ``broken``: damage to one entry must not hide the others.
    """
    parent: dict[bytes, bytes | None] = {}
    broken: dict[bytes, str] = {}
    starts = [*table.entries.values(), *table.tags.values(), *table.branches.values()]
    for start in starts:
        c: bytes | None = start
        depth = 0
        while c is not None and c not in parent and c not in broken:
            try:
                _tree, p = commit_tree_parent(reader, c)
            except CorruptRepository as err:
                broken[c] = err.message
                break
            parent[c] = p
            c = p
            depth += 1
            if depth > MAX_CHAIN:
                raise CorruptRepository("entry chain is implausibly long (a cycle?)")
    children: dict[bytes, list[bytes]] = {}
    numbers = table.numbers()
    # Children in E-number order so that "the first child" means the oldest entry.
    for c in sorted(parent, key=lambda x: (numbers.get(x, 1 << 62), x)):
        p = parent[c]
        if p is not None:
            children.setdefault(p, []).append(c)
    return Forest(parent, children, broken)


@dataclass
class AreaRef:
    """A known area of this repository and its state."""

    path: Path
    state: AreaState


def repository_areas(repo: Repository) -> list[AreaRef]:
    """The known areas whose state names this repository (unreadable ones skipped)."""
    out: list[AreaRef] = []
    me = repo.path.resolve()
    for p in repo.known_areas():
        area = Path(p)
        try:
            st = load_state(area) if area.is_dir() else None
        except VMLError:
            continue
        if st is None or not st.repository:
            continue
        if Path(st.repository).resolve() != me:
            continue
        out.append(AreaRef(area, st))
    return out


def hold_areas(
    repo: Repository, forest: Forest, commits: Iterable[bytes], locks: AreaLocks
) -> None:
    """Lock into ``locks``, without waiting, every area holding one of ``commits`` or below.

    A change made of several rewrites (``rm`` of several entries, ``prune``)
    takes them all before its first rewrite, so a save or checkout running
    in one of them refuses the whole command before anything changed, never
    its third step after two were done.  Raises RepositoryBusy.
    """
    touched: set[str] = set()
    for c in commits:
        touched.add(c.hex())
        touched.update(d.hex() for d in forest.descendants(c))
    for a in repository_areas(repo):
        if touched & {a.state.entry, a.state.pending, a.state.branch_at}:
            locks.take(a.path)


@dataclass
class Moves:
    """What moving names did."""

    refs: list[tuple[str, str, str]] = field(default_factory=list)  # (ref, old hex, new hex)
    areas: list[tuple[str, str, str]] = field(default_factory=list)  # (area, old hex, new hex)


def plan_moves(
    repo: Repository,
    table: refs_mod.RefTable,
    mapping: dict[bytes, bytes],
    order: Iterable[bytes],
) -> list[Step]:
    """The steps moving every ref and area on ``old`` to ``mapping[old]``, in ``order``.

    Call under the repository lock, holding the areas.  ``order`` must list
    children before parents; each area moves before the refs of its entry.
    """
    areas = repository_areas(repo)
    # Each commit's names, looked up once: a rewrite of thousands of
    # descendants must not scan every ref once per rewritten entry.
    names: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for num, c in sorted(table.entries.items()):
        names.setdefault(c, []).append((b"", refs_mod.entry_ref(num)))
    for kind_prefix, items in (
        (refs_mod.TAG_PREFIX, table.tags),
        (refs_mod.BRANCH_PREFIX, table.branches),
    ):
        for name, c in sorted(items.items()):
            names.setdefault(c, []).append((kind_prefix, kind_prefix + name.encode()))
    steps: list[Step] = []
    for old in order:
        o, n = old.hex(), mapping[old].hex()
        for a in areas:
            fields = [f for f in ("entry", "pending", "branch_at") if getattr(a.state, f) == o]
            if fields:
                # branch_at moves along with its branch below.
                cache = "rekey" if "entry" in fields else None
                steps.append(Step(o, n, area=str(a.path), fields=fields, cache=cache))
        for kind_prefix, ref in names.get(old, []):
            annotated = kind_prefix == refs_mod.TAG_PREFIX and _is_annotated(repo, ref)
            steps.append(Step(o, n, ref=ref.decode(), replace=annotated))
    return steps


def _is_annotated(repo: Repository, ref: bytes) -> bool:
    from dulwich.refs import Ref

    try:
        value = repo.git.refs[Ref(ref)]
    except KeyError:
        return False
    return refs_mod.peel(repo, ref, value) != value


def plan_drop(
    repo: Repository,
    table: refs_mod.RefTable,
    commit: bytes,
    parent: bytes | None,
) -> list[Step]:
    """The steps taking every name off a removed entry (after the moves).

    Areas holding it are pointed at its parent (their next save is then a
    child of the parent) with their cache dropped, and so is where an area
    last saw its branch when that was there; branches at it move to its
    parent (or are deleted for a root); tags and E-numbers are deleted.
    A parent that is no entry (a damaged chain) counts as none: nothing is
    pointed at a commit that may not exist.
    """
    if parent is not None and parent not in set(table.entries.values()):
        parent = None
    o = commit.hex()
    p = parent.hex() if parent is not None else None
    steps: list[Step] = []
    for a in repository_areas(repo):
        # An area following a branch at it saw the branch where it moves: its parent.
        fields = [f for f in ("entry", "branch_at") if getattr(a.state, f) == o]
        if fields:
            steps.append(Step(o, p, area=str(a.path), fields=fields, cache="drop"))
        if a.state.pending == o:
            steps.append(Step(o, None, area=str(a.path), fields=["pending"]))
    for name, c in sorted(table.branches.items()):
        if c == commit:
            steps.append(Step(o, p, ref=(refs_mod.BRANCH_PREFIX + name.encode()).decode()))
    for name, c in sorted(table.tags.items()):
        if c == commit:
            steps.append(Step(o, None, ref=(refs_mod.TAG_PREFIX + name.encode()).decode()))
    # E-numbers last: while one remains, re-running the command finds the entry.
    for n, c in sorted(table.entries.items()):
        if c == commit:
            steps.append(Step(o, None, ref=refs_mod.entry_ref(n).decode()))
    return steps


def apply_rewrite(
    repo: Repository,
    table: refs_mod.RefTable,
    mapping: dict[bytes, bytes],
    order: list[bytes],
    drop: tuple[bytes, bytes | None] | None = None,
    *,
    force: bool = False,
    locks: AreaLocks | None = None,
) -> Moves:
    """Move every name to the rewritten commits, then take the names off ``drop``.

    ``order`` lists the rewritten commits parents first; names move children
    first.  Every new object must already be durable.  Refuses (changing
    nothing) when the refs moved since ``table`` was read, when an area whose
    state must change is in use by another command, and (unless ``force``)
    when an area came to hold ``drop`` meanwhile.  The areas it locks are
    released on return, or, given ``locks`` (the command's), when that closes.
    """
    moves = Moves()
    with repo.lock(), ExitStack() as own:
        held = locks if locks is not None else own.enter_context(AreaLocks())
        now = refs_mod.read_refs(repo)
        if now != table:  # entries, tags and branches
            raise ConcurrentChange(
                "the repository's entries changed while this command ran; nothing was changed"
            )
        dropped = drop[0].hex() if drop is not None else None
        touched = {c.hex() for c in mapping} | ({dropped} if dropped else set())
        for a in repository_areas(repo):
            if touched & {a.state.entry, a.state.pending, a.state.branch_at}:
                # A save or checkout there must not overwrite what we write, nor
                # finish on a commit we are replacing: wait for no one, refuse.
                held.take(a.path)
                fresh = load_state(a.path) or a.state
                if dropped is not None and not force and dropped in (fresh.entry, fresh.pending):
                    raise ConcurrentChange(
                        f"area {a.path} took {dropped[:12]} while this command ran; "
                        "nothing was changed",
                        "run the command again (it needs --force to remove an entry an area holds)",
                    )
        steps = plan_moves(repo, table, mapping, reversed(order))
        if drop is not None:
            steps += plan_drop(repo, table, drop[0], drop[1])
        moved: list[Step] = []
        # Written down before the first move: killed midway, the next command
        # finishes the moves (journal.py), so no area and no entry is left
        # naming a commit that is no entry.
        apply_steps(repo, steps, held, moved)
    for s in moved:
        what = (moves.refs, s.ref) if s.ref is not None else (moves.areas, s.area)
        assert what[1] is not None
        what[0].append((what[1], s.old, s.new or ""))
    return moves
