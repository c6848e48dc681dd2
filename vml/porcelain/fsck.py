"""``vml fsck``: check the repository's structure quickly (no image data read)."""

from __future__ import annotations

from pathlib import Path

from vml.plumbing import refs as refs_mod
from vml.plumbing.forest import repository_areas
from vml.plumbing.packs import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.verify import Problem, check_structure
from vml.porcelain.common import ProgressFn, label, no_progress
from vml.porcelain.verify import CheckResult, Finding, findings


def fsck(repo: Repository, progress: ProgressFn = no_progress) -> CheckResult:
    """Refs, entry commits and metadata, manifests, block maps, object presence, areas."""
    table = refs_mod.read_refs(repo)
    reader = PackReader(repo)
    try:
        forest, problems = check_structure(
            reader, table, lambda i, total: progress("check", i, total)
        )
        everything = sorted(forest.parent) if forest is not None else []
        found, affected = findings(reader, table, everything, problems)
        known = set(table.entries.values())
        for a in repository_areas(repo):
            if a.state.entry and bytes.fromhex(a.state.entry) not in known:
                found.append(
                    Finding(
                        None,
                        None,
                        f"area {Path(a.path)} holds {a.state.entry[:12]}, which is no entry",
                    )
                )
        return CheckResult(
            checked=[label(table, c) or c.hex()[:12] for c in everything],
            problems=found,
            affected=affected,
        )
    finally:
        reader.close()


__all__ = ["Problem", "fsck"]
