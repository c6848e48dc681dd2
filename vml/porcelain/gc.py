"""``vml gc``: give back the space of objects no entry, tag or branch reaches."""

from __future__ import annotations

from vml.errors import UsageError
from vml.plumbing.gc import GcResult, collect
from vml.plumbing.packscan import repair as repair_packs
from vml.plumbing.renumber import number_unnamed
from vml.plumbing.repack import consolidate, maintenance
from vml.plumbing.repository import Repository
from vml.progress import ProgressFn, no_progress


def gc(
    repo: Repository,
    *,
    dry_run: bool = False,
    repair: bool = False,
    progress: ProgressFn = no_progress,
) -> GcResult:
    """Reclaim unreachable objects; with ``dry_run`` only say what would go.

    Streams: live objects of partly dead packs are copied into one new pack,
    which is complete and indexed before any old pack is deleted.  Then the
    smallest packs are rolled up so that pack sizes form a geometric
    progression (few packs keep look-ups fast).  One gc at a time.

    While a pack is set aside (its index damaged) gc deletes nothing;
    ``repair`` rebuilds the index of each such pack that is whole, salvages
    the others (packscan.py), gives an E-number to each whole entry an area
    or an entry relies on that has none (renumber.py), and collects nothing:
    run gc again after.
    """
    with maintenance(repo):
        if repair:
            if dry_run:
                raise UsageError("--repair does not go with --dry-run", "drop one of them")
            res = GcResult(repaired=repair_packs(repo, progress))
            res.numbered = [f"E{n}" for n, _c in number_unnamed(repo)]
            return res
        res = collect(repo, dry_run=dry_run, progress=progress)
        if not dry_run and not res.deferred:
            res.repacked = consolidate(repo, progress=progress)
    return res
