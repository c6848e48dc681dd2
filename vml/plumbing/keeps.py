"""Pending claims on packs: who still needs a pack that no ref reaches yet.

A pack's name is its content's hash, so two processes (or two writers of
one process) can write the very same pack: two saves storing the same new
objects, a consolidation whose output is one of its inputs, a save of what a
removed entry held.  Whoever needs such a pack before its refs reach it
says so in the pack's ``.keep`` file (git's convention, honoured by git's
own gc): one ``vml-pending <pid> <token>`` line per claim.  A writer that
found the pack already there adds ``vml-shared`` too (a record that two
commands needed it).  Once a pack's index is in place anyone may rely on
its objects (a save names a block it finds there instead of storing it;
gc and a repair copy no object it holds), so it is deleted only by gc,
when no ref reaches it and no live process claims it, or by a
consolidation that copied every object first: a writer that fails only
drops its claims.

Every decision about a pack's files (publish it or find it, claim it,
drop a claim, delete it, move it aside) is taken under an exclusive
``flock`` of ``<repo>/vml/packs.lock`` (a few file operations, never a wait
for anything else), so "is it there", "is it claimed" and the rename or
unlink that follows are one step for every VML process: none deletes a
pack another claimed in between.  (A lock file, not the pack folder itself:
``flock`` on network file systems needs a file open for writing; and not
in the pack folder, whose ``tmp_*`` files ``git gc`` removes.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vml.plumbing.repository import hold_flock, write_atomic

# First word of a claim line in a .keep file.
PENDING_KEEP = "vml-pending"
# A line saying that a second writer found the pack already published.
SHARED = "vml-shared"
LOCK_NAME = "packs.lock"
# The longest a pack decision waits for another (gc deleting big packs).
_LOCK_WAIT = 600.0


# Linux's largest pid (pid_max can be at most 2**22).
_PID_MAX = 1 << 22


# dulwich's temporary file of a pack a fetch receives (in objects/, not objects/pack/).
SPOOL_PREFIX = "tmp_pack_"


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists (it may belong to another user).

    0 and numbers past any pid are no process (``os.kill(0, 0)`` would ask
    about our own process group, a huge one raise OverflowError).
    """
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def pack_dir_lock(pack_dir: Path) -> Iterator[None]:
    """Hold the lock of the packs in ``pack_dir`` (``<repo>/objects/pack``).

    Held for a few file operations only; never nested, never held while
    waiting for another lock.
    """
    vml_dir = pack_dir.parent.parent / "vml"
    vml_dir.mkdir(exist_ok=True)
    busy = "the repository's packs are locked by another vml command"
    with hold_flock(vml_dir / LOCK_NAME, _LOCK_WAIT, busy):
        yield


def claim_line(token: str) -> str:
    """The claim line of this process for ``token`` (unique within the process)."""
    return f"{PENDING_KEEP} {os.getpid()} {token}"


def _pending_pid(line: str) -> int | None:
    """The pid of a claim line VML wrote (None: no such line, so it protects as foreign).

    ASCII digits only (``str.isdigit`` takes ``²``, which ``int`` refuses);
    a number too long for any pid reads as one no process has.
    """
    words = line.split()
    if len(words) in (2, 3) and words[0] == PENDING_KEEP:
        pid = words[1]
        if pid.isascii() and pid.isdigit():
            return int(pid) if len(pid) <= 10 else 0
    return None


def _read(keep: Path) -> list[str] | None:
    """The lines of a .keep (None: there is none; [] for an empty one)."""
    try:
        return [ln for ln in keep.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ["unreadable"]  # protects, like any .keep VML did not write


def _foreign(lines: list[str]) -> bool:
    """A .keep VML did not write (git's, the admin's; an empty one too) protects for ever."""
    return not lines or any(_pending_pid(ln) is None and ln.strip() != SHARED for ln in lines)


def _write(keep: Path, lines: list[str]) -> None:
    # Whole or not at all, and durable: a .keep cut short, or left empty by
    # a power loss (its rename reached the disk, its data did not), would
    # protect its pack for ever.  The temporary name is a live process's
    # temporary to gc, removed once stale.  (Dropping a claim, by unlink, needs
    # no fsync: a .keep that comes back holds dead claims only.)
    tmp = keep.with_name(f"tmp_vml_{os.getpid()}_{keep.stem}.keep-tmp")
    write_atomic(keep, "".join(f"{ln}\n" for ln in lines).encode(), tmp=tmp)


def protects_locked(keep: Path) -> bool:
    """:func:`keep_protects`, for a caller that holds :func:`pack_dir_lock`."""
    lines = _read(keep)
    if lines is None:
        return False
    if _foreign(lines):
        return True
    live = [ln for ln in lines if (pid := _pending_pid(ln)) is not None and pid_alive(pid)]
    if not live:
        keep.unlink(missing_ok=True)  # every claimant died before its refs moved
        return False
    if len(live) != sum(1 for ln in lines if _pending_pid(ln) is not None):
        _write(keep, live + [ln for ln in lines if ln.strip() == SHARED])
    return True


def claimed_locked(keep: Path) -> bool:
    """Does a live VML process claim this pack?  (Under the lock; a foreign .keep is no claim.)"""
    lines = _read(keep)
    return lines is not None and not _foreign(lines) and protects_locked(keep)


def keep_protects(keep: Path) -> bool:
    """Does this .keep protect its pack?

    A VML claim protects while its process lives; the claims of dead
    processes are dropped (the pack is then collected like any other once
    none is left).  Any other .keep (git's, the user's) protects.
    """
    if not keep.exists():
        # Most packs have none: no lock (a third of a millisecond each, for
        # every pack gc surveys).  The answer is as good as one under the
        # lock, which can change once it is released too; whoever deletes
        # asks again under the lock (remove_packs).
        return False
    with pack_dir_lock(keep.parent):
        return protects_locked(keep)


def claim_locked(keep: Path, line: str, *, shared: bool) -> bool:
    """Add the claim ``line`` to ``keep`` (under the lock); False when a foreign .keep protects.

    ``shared``: the claimant found the pack already there (it did not write it).
    """
    lines = _read(keep)
    if lines is not None and _foreign(lines):
        return False
    lines = lines or []
    lines.append(line)
    if shared and SHARED not in lines:
        lines.append(SHARED)
    _write(keep, lines)
    return True


def claim(keep: Path, line: str, *, shared: bool) -> bool:
    """:func:`claim_locked`, taking the packs' lock."""
    with pack_dir_lock(keep.parent):
        return claim_locked(keep, line, shared=shared)


def unclaim_locked(keep: Path, line: str) -> None:
    """Drop the claim ``line`` (under the lock); the .keep goes with the last claim."""
    lines = _read(keep)
    if lines is None or _foreign(lines):
        return
    rest = [ln for ln in lines if ln != line]
    if not any(_pending_pid(ln) is not None for ln in rest):
        keep.unlink(missing_ok=True)
    elif len(rest) != len(lines):
        _write(keep, rest)


def unclaim(keep: Path, line: str) -> None:
    """:func:`unclaim_locked`, taking the packs' lock."""
    with pack_dir_lock(keep.parent):
        unclaim_locked(keep, line)


def remove_packs(pack_dir: Path, names: list[str]) -> int:
    """Delete packs (index first, then pack) that no one claims now; returns the bytes freed.

    The caller decided they may go; a pack claimed since (a writer that
    found it, byte for byte, what it wrote) stays.
    """
    freed = 0
    with pack_dir_lock(pack_dir):
        for name in names:
            if protects_locked(pack_dir / f"{name}.keep"):
                continue
            for ext in (".idx", ".pack"):
                freed += unlink_counted(pack_dir / f"{name}{ext}")
    return freed


def unlink_counted(path: Path) -> int:
    """Remove ``path``; returns the bytes it took (0 if it was already gone)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size
