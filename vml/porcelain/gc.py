"""``vml gc``: give back the space of objects no entry, tag or branch reaches."""

from __future__ import annotations

from vml.plumbing.gc import GcResult, collect
from vml.plumbing.repository import Repository
from vml.porcelain.common import ProgressFn, no_progress


def gc(repo: Repository, *, dry_run: bool = False, progress: ProgressFn = no_progress) -> GcResult:
    """Reclaim unreachable objects; with ``dry_run`` only say what would go.

    Streams: live objects of partly dead packs are copied into one new pack,
    which is complete and indexed before any old pack is deleted.
    """
    return collect(repo, dry_run=dry_run, progress=progress)
