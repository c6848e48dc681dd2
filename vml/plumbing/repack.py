"""Keeping the number of packs small: geometric consolidation.

Every save writes a pack of its own, and a look-up that misses tries every
pack in turn (dulwich's indexes are searched one by one), so a repository
saved thousands of times would make every save and restore slower.  Like
``git repack --geometric=2``, the packs are kept in a geometric progression
of sizes: the small ones at the bottom are rolled up into one pack as soon
as each pack is not at least twice as big as all smaller ones together.
The number of packs then stays logarithmic in the repository's size, and a
byte is copied a logarithmic number of times over its life.

Objects are copied still compressed, checked against their index's CRC-32
(:func:`~vml.plumbing.packwriter.copy_object`), into a new pack that is complete and
durable before any old pack goes; nothing is ever dropped (that is gc's
job), so no look-up can miss an object because of a consolidation running
beside it.  Packs under a ``.keep`` (a save whose refs are not set yet, or
the user's own) are never touched.  One consolidation or gc at a time: the
repository's maintenance lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vml.errors import RepositoryBusy
from vml.plumbing.keeps import remove_packs
from vml.plumbing.packreader import PackReader, pack_extents
from vml.plumbing.packwriter import PackWriter, copy_object
from vml.plumbing.repository import Repository, fsync_dir, hold_flock
from vml.progress import ProgressFn, no_progress
from vml.records import Record

FACTOR = 2
MAINTENANCE_LOCK = "maintenance.lock"


@dataclass
class RepackResult(Record):
    """What a consolidation did."""

    packs_before: int = 0
    merged: list[str] = field(default_factory=list)  # names of the packs rolled up
    new_packs: list[str] = field(default_factory=list)
    written_bytes: int = 0
    deleted_bytes: int = 0

    json_extra = ("packs_after",)

    @property
    def packs_after(self) -> int:
        """Packs left afterwards."""
        return self.packs_before - len(self.merged) + len(self.new_packs)


def rollup(sizes: list[int], factor: int = FACTOR) -> int:
    """How many of the smallest packs to merge so that the rest is geometric.

    ``sizes`` is sorted ascending.  Returns ``k``: packs ``0..k-1`` are to be
    merged into one (0 or 1 means nothing to do).  git's algorithm: find the
    highest pack that breaks the progression, merge it and everything below,
    then keep absorbing the next pack while it is not ``factor`` times the
    merged size.
    """
    n = len(sizes)
    split = 0
    for i in range(n - 1, 0, -1):
        if sizes[i] < factor * sizes[i - 1]:
            split = i + 1
            break
    total = sum(sizes[:split])
    while split < n and split > 0 and sizes[split] < factor * total:
        total += sizes[split]
        split += 1
    return split if split >= 2 else 0


@contextmanager
def maintenance(repo: Repository) -> Iterator[None]:
    """Hold the lock that lets one gc or consolidation run at a time.

    Never waits: raises :class:`RepositoryBusy` when another holds it.
    """
    repo.vml_dir.mkdir(exist_ok=True)
    with hold_flock(
        repo.vml_dir / MAINTENANCE_LOCK,
        timeout=0.0,
        busy="another vml gc or pack consolidation is running in this repository",
    ):
        yield


def pack_count(repo: Repository) -> int:
    """Number of packs in the repository (an index and its pack)."""
    d = repo.objects_dir / "pack"
    if not d.is_dir():
        return 0
    return sum(1 for idx in d.glob("pack-*.idx") if idx.with_suffix(".pack").exists())


def auto_consolidate(repo: Repository, progress: ProgressFn = no_progress) -> RepackResult | None:
    """After a save: consolidate if there are more than ``repo.auto_pack_limit`` packs.

    `vml gc` always consolidates; a save only past the limit (0: never).
    Never waits: when a gc or another consolidation holds the repository,
    this one is left to them (None).
    """
    limit = repo.auto_pack_limit
    if limit <= 0 or pack_count(repo) <= limit:
        return None
    try:
        with maintenance(repo):
            return consolidate(repo, limit=limit, progress=progress)
    except RepositoryBusy:
        return None


def consolidate(
    repo: Repository,
    *,
    limit: int = 0,
    progress: ProgressFn = no_progress,
) -> RepackResult | None:
    """Roll the smallest packs up into one when more than ``limit`` packs exist.

    The caller holds :func:`maintenance`.  Returns None when there was
    nothing to do.
    """
    d = repo.objects_dir / "pack"
    packs: list[tuple[int, str]] = []
    total_packs = 0
    for idx in d.glob("pack-*.idx"):
        pack = idx.with_suffix(".pack")
        try:
            size = pack.stat().st_size
            # A set-aside pack is never merged: its index cannot be trusted
            # to list what it holds (`vml gc --repair` deals with it).
            usable = repo.packs.problem(idx.stem) is None
        except FileNotFoundError:
            continue
        total_packs += 1
        if usable and not idx.with_suffix(".keep").exists():
            packs.append((size, idx.stem))
    if total_packs <= max(limit, 1):
        return None
    packs.sort()
    k = rollup([s for s, _ in packs])
    if k == 0:
        return None
    chosen = [name for _s, name in packs[:k]]
    result = RepackResult(packs_before=total_packs, merged=chosen)
    extents = {
        name: pack_extents(d / f"{name}.idx", (d / f"{name}.pack").stat().st_size)
        for name in chosen
    }
    total = sum(len(e) for e in extents.values())
    done = 0
    reader = PackReader(repo)
    # One pack, however big: a consolidation cut into equal ~192 MiB parts
    # would break the progression it makes, and the next one would copy
    # them all again.
    writer = PackWriter(repo, roll_bytes=1 << 62)
    try:
        for name in chosen:
            fd = os.open(d / f"{name}.pack", os.O_RDONLY)
            try:
                for sha, off, length, crc in extents[name]:
                    done += 1
                    if sha not in writer:
                        copy_object(reader, writer, fd, sha, off, length, crc)
                    progress("pack", done, total)
            finally:
                os.close(fd)
        writer.finish()
        # Every object of the old packs is in the new ones, durable, before
        # any old pack goes; they need no protection from gc: whatever
        # reaches them still does.
        writer.release()
        result.new_packs = list(writer.names)
        result.written_bytes = writer.disk_bytes
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    # Never the output (it can be one input byte for byte, the others only
    # duplicating it), nor an input a writer claimed since (it found that
    # pack, byte for byte, already there); the index before the pack.
    result.deleted_bytes += remove_packs(d, [n for n in chosen if n not in result.new_packs])
    fsync_dir(d)
    return result
