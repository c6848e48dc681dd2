"""The rewrite journal: the name moves of a forest rewrite, finished by the next command.

A forest rewrite (``vml rm``, ``vml convert``, ``vml prune``) moves many
names onto new commits: E-numbers, tags, branches, and the ``area.json`` of
every area holding a rewritten entry.  Each move is atomic, but no order of
them makes every state between two of them valid: an area moved before its
entry's ref names a commit that is no entry yet, an area moved after it
names one that is no entry any more, and of a child and its parent, whichever
ref moves first leaves an entry whose parent commit is no entry.

So the moves are written down first, as steps, in ``<repo>/vml/rewrite.json``
(durably, under the repository lock, after every new object is durable and
before the first move) and the file is removed after the last.  The file
exists while the repository lock is free only when its writer died, and
whoever takes the lock next finishes the steps before anything else
(:meth:`Repository.lock`; opening a repository tries it too, so readers see
the finished rewrite).  Each step is a compare-and-set: a ref or an area
field still on its old value moves to its new one, one already moved is
left, so a step done twice, or a replay killed itself, is harmless.  An area
another command holds is left in the journal for the next one: that command
read the area before the rewrite finished, and its save refuses (its parent
is no entry) or replaces what the area names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dulwich.refs import Ref

from vml.errors import CorruptRepository, RepositoryBusy, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import AreaLocks, load_state, save_state
from vml.plumbing.repository import (
    LOCK_HOOKS,
    OPEN_HOOKS,
    Repository,
    fsync_dir,
    write_atomic,
)

JOURNAL_NAME = "rewrite.json"
_VERSION = 1

#: Called as ``on_step(i, n)`` before step ``i`` of ``n`` (and with ``i == n``
#: after the last, before the journal goes); tests raise or kill there to
#: stop a rewrite at each instant.
on_step: Callable[[int, int], None] | None = None


@dataclass
class Step:
    """One move: a ref (``ref``) or an area's fields (``area``), from ``old`` to ``new``."""

    old: str  # hex commit
    new: str | None  # hex commit; None: the ref is deleted, the area field cleared
    ref: str | None = None
    area: str | None = None
    # Area fields to move (entry, pending, branch_at); each that holds ``old`` moves.
    fields: list[str] = field(default_factory=list)
    # An area whose entry moves: "rekey" its cache to ``new``, or "drop" it.
    cache: str | None = None
    # A ref that is an annotated tag: deleted and made again, plain, on ``new``.
    replace: bool = False


def journal_path(repo: Repository) -> Path:
    """Where the journal lives."""
    return repo.vml_dir / JOURNAL_NAME


def _encode(steps: list[Step]) -> bytes:
    doc = {"version": _VERSION, "pid": os.getpid(), "steps": [asdict(s) for s in steps]}
    return json.dumps(doc, indent=1).encode() + b"\n"


def _decode(data: bytes) -> list[Step]:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != _VERSION:
            raise ValueError("unknown version")
        return [Step(**s) for s in doc["steps"]]
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptRepository(
            f"the rewrite journal vml/{JOURNAL_NAME} is unreadable ({e})",
            "a rewrite (rm, convert, prune) was interrupted: remove the file, then run "
            "`vml fsck` and repeat that command",
        ) from None


def _peeled(repo: Repository, ref: str) -> str | None:
    try:
        value = repo.git.refs[Ref(ref.encode())]
    except KeyError:
        return None
    return refs_mod.peel(repo, ref.encode(), value).decode()


def _ref_step(repo: Repository, s: Step) -> bool:
    """Move one ref if it still holds ``old`` (True: it moved now)."""
    assert s.ref is not None
    ref = s.ref.encode()
    now = _peeled(repo, s.ref)
    if s.new is None:
        if now != s.old:
            return False
        refs_mod.delete_ref(repo, ref)
        return True
    if now == s.new or (now != s.old and not (s.replace and now is None)):
        return False
    new = bytes.fromhex(s.new)
    if s.replace:
        # An annotated tag (made by git) cannot be re-pointed without
        # rewriting its tag object: it becomes a plain tag on the new commit.
        if now is not None:
            refs_mod.delete_ref(repo, ref)
        refs_mod.set_ref(repo, ref, new, create=True)
    else:
        refs_mod.set_ref(repo, ref, new, bytes.fromhex(s.old))
    return True


def _area_step(repo: Repository, s: Step, locks: AreaLocks) -> bool | None:
    """Move one area's fields still on ``old`` (True: moved now; None: area busy)."""
    assert s.area is not None
    area = Path(s.area)
    try:
        locks.take(area)
        st = load_state(area)
    except RepositoryBusy:
        return None
    except (OSError, VMLError):
        return False  # gone or unreadable since: nothing of ours to move
    if st is None or not st.repository or Path(st.repository).resolve() != repo.path.resolve():
        return False
    hit = [f for f in s.fields if getattr(st, f) == s.old]
    if not hit:
        return False
    if "entry" in hit:
        # Imported here: every command imports this module, few move an area's cache.
        from vml.plumbing.cache import drop_cache, rekey_cache

        # The cache first: a kill before the state is saved redoes both.
        if s.cache == "rekey" and s.new is not None:
            rekey_cache(area, s.old, s.new)
        elif s.cache == "drop":
            drop_cache(area)
    for f in hit:
        setattr(st, f, s.new)
    save_state(area, st)
    return True


def run_steps(
    repo: Repository,
    steps: list[Step],
    locks: AreaLocks,
    moved: list[Step] | None = None,
) -> list[Step]:
    """Do ``steps`` in order (under the repository lock); returns those left for later.

    ``moved`` gains each step that moved something.
    """
    left: list[Step] = []
    for i, s in enumerate(steps):
        if on_step is not None:
            on_step(i, len(steps))
        done = _ref_step(repo, s) if s.ref is not None else _area_step(repo, s, locks)
        if done is None:
            left.append(s)
        elif done and moved is not None:
            moved.append(s)
    if on_step is not None:
        on_step(len(steps), len(steps))
    return left


def write_journal(repo: Repository, steps: list[Step]) -> None:
    """Write the steps down durably (under the repository lock, before the first)."""
    repo.vml_dir.mkdir(exist_ok=True)
    write_atomic(journal_path(repo), _encode(steps))


def _finish(repo: Repository, left: list[Step]) -> None:
    path = journal_path(repo)
    if left:
        write_atomic(path, _encode(left))
        return
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def apply_steps(repo: Repository, steps: list[Step], locks: AreaLocks, moved: list[Step]) -> None:
    """Journal ``steps``, do them, drop the journal (call under the repository lock).

    ``locks`` holds the areas the steps move.  Killed or failing midway, the
    journal stays and the next command finishes it (:func:`replay`).
    """
    write_journal(repo, steps)
    _finish(repo, run_steps(repo, steps, locks, moved))


def moving(repo: Repository) -> set[bytes]:
    """The commits a rewrite still has to move names off (its journal's steps; empty: none).

    Not lost entries: the rewrite, finished by the next command that may
    (an area another command held is left for later), moves their names on.
    """
    try:
        data = journal_path(repo).read_bytes()
    except FileNotFoundError:
        return set()
    return {bytes.fromhex(s.old) for s in _decode(data)}


def replay(repo: Repository) -> None:
    """Finish a rewrite a dead command left (call under the repository lock).

    A no-op (one ``stat``) when there is no journal.
    """
    path = journal_path(repo)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    steps = _decode(data)
    with AreaLocks() as locks:
        left = run_steps(repo, steps, locks)
    _finish(repo, left)


def replay_unlocked(repo: Repository) -> None:
    """At opening: finish a dead command's rewrite if the repository lock is free now.

    Best effort: a held lock means its holder finishes it (or is the very
    rewrite at work); a repository this user cannot write is read as it is.
    """
    if not journal_path(repo).exists():
        return
    with suppress(RepositoryBusy, OSError), repo.lock(timeout=0):
        pass  # taking the lock replays


LOCK_HOOKS.append(replay)
OPEN_HOOKS.append(replay_unlocked)
