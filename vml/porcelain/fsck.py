"""``vml fsck``: check the repository's structure quickly (no image data read)."""

from __future__ import annotations

from vml.plumbing import refs as refs_mod
from vml.plumbing.packreader import PackReader
from vml.plumbing.packscan import check_pack_objects
from vml.plumbing.renumber import find_unnamed
from vml.plumbing.repository import Repository
from vml.plumbing.verify import Problem, check_structure
from vml.porcelain.common import label
from vml.porcelain.verify import CheckResult, Finding, findings, pack_problems
from vml.progress import ProgressFn, no_progress


def fsck(repo: Repository, progress: ProgressFn = no_progress) -> CheckResult:
    """Refs, entry commits and metadata, manifests, block maps, object presence, areas.

    Also every pack: a set-aside one is named, and every object of the
    others is compared with its index's CRC-32 (commits, trees and tags are
    inflated and their ids checked), so a flipped byte that a checkout
    would meet is found here, without rebuilding any image.
    """
    table = refs_mod.read_refs(repo)
    reader = PackReader(repo)
    try:
        forest, problems = check_structure(reader, table, progress)
        problems = pack_problems(repo) + problems
        for d in check_pack_objects(repo, reader, progress):
            if d.elsewhere:
                msg = f"pack {d.pack}: a copy of object {d.sha.hex()} is damaged ({d.message}); another copy is intact"
                problems.append(Problem(msg, None, f"{d.pack}.pack"))
            else:
                msg = f"pack {d.pack}: object {d.sha.hex()} is damaged ({d.message})"
                problems.append(Problem(msg, None, f"{d.pack}.pack", [d.sha]))
        everything = sorted(set(forest.parent) | set(forest.broken))
        found, affected, notes = findings(reader, table, everything, problems)
        # Whole entries a killed rewrite of an earlier VML left without a number.
        found += [
            Finding(None, None, u.message()) for u in find_unnamed(repo, reader, table, forest)
        ]
        return CheckResult(
            checked=[label(table, c) or c.hex()[:12] for c in everything],
            problems=found,
            affected=affected,
            notes=notes,
        )
    finally:
        reader.close()


__all__ = ["Problem", "fsck"]
