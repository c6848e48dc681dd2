"""Publishing a saved entry: its commit and refs, under the repository lock.

Everything a new entry needs is on disk before this runs (see saving.py);
here the entry gets its number, its commit object and its refs, in one
critical section.  What the save assumed when it started is checked again
under the lock, so that a command that ran meanwhile and invalidated it
makes this save fail cleanly instead of publishing a wrong entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.errors import ConcurrentChange, RepositoryBusy, UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.entries import make_commit
from vml.plumbing.packreader import PackReader
from vml.plumbing.packwriter import write_loose
from vml.plumbing.repository import Repository
from vml.plumbing.saving import Saver


@dataclass
class Published:
    """What :func:`publish_entry` made."""

    number: int
    commit: bytes
    table: refs_mod.RefTable  # the refs as read under the lock, before the new ones
    branch: str | None  # the branch the area follows now (None: deleted or moved on)
    moved_on: str | None = None  # a branch left where another area had moved it


def publish_entry(
    repo: Repository,
    reader: PackReader,
    saver: Saver,
    root: bytes,
    *,
    parent: bytes | None,
    kind: str,
    message: str,
    area: Path,
    tag: str | None = None,
    branch: str | None = None,
    branch_at: bytes | None = None,
) -> Published:
    """Give the saved entry a number, a commit and its refs; returns what was made.

    ``branch`` is the branch the area follows; it moves to the new entry
    only from ``branch_at``, where the area last saw it: a branch another
    area moved on meanwhile is left where it is (never moved backwards),
    and the area stops following it.
    The saver's packs lose their pending protection once the refs are set
    (or the attempt failed: they are garbage then).
    """
    moved_on: str | None = None
    try:
        with repo.lock():
            # A gc that ran while we saved may have dropped objects nothing
            # referenced yet, among them blocks this entry reuses: check.
            reader.refresh()
            missing = [sha for sha in saver.reused if not reader.contains(sha)]
            if missing:
                raise RepositoryBusy(
                    f"`vml gc` removed {len(missing)} blocks this save reuses while it ran",
                    "run the same `vml commit` again",
                )
            table = refs_mod.read_refs(repo)
            if parent is not None and parent not in set(table.entries.values()):
                # rm, convert or prune took it away while we saved: a child
                # of a commit no entry names would be unreachable by name,
                # and would keep its parent's objects alive for ever.
                raise ConcurrentChange(
                    f"the parent entry {parent.hex()[:12]} was removed or rewritten by another "
                    "command while this save ran; nothing was saved",
                    "run the same `vml commit` again",
                )
            if tag is not None and tag in table.tags:
                raise UsageError(f"tag {tag!r} was made while saving", "choose another name")
            n = refs_mod.next_number(repo, table.entries)
            trailers = [
                ("VML-Entry", f"E{n}"),
                ("VML-Kind", kind),
                ("VML-Parent", table.label(parent) or "none"),
                ("VML-Area", str(area.resolve())),
            ]
            c = make_commit(root, parent, message, trailers)
            cid = write_loose(repo, c)
            # The entry, its tag and its branch move as one: a ref lock in the
            # way (git_locked) makes no entry, rather than one without them.
            moves = [refs_mod.create(refs_mod.entry_ref(n), cid)]
            if tag is not None:
                moves.append(refs_mod.create(refs_mod.TAG_PREFIX + tag.encode(), cid))
            tip = table.branches.get(branch) if branch is not None else None
            if branch is not None and (tip is None or tip != branch_at):
                # Deleted since the area started following it (do not bring it
                # back), or moved on by another area (never move it backwards).
                moved_on = branch if tip is not None else None
                branch = None
            elif branch is not None:
                ref = refs_mod.BRANCH_PREFIX + branch.encode()
                moves.append(refs_mod.RefMove(ref, cid, tip, check=True))
            refs_mod.move_refs(repo, moves)
            refs_mod.note_numbers(repo, [n])
    finally:
        saver.release()  # refs reach the packs now (or they are garbage)
    return Published(n, cid, table, branch, moved_on)
