"""``vml pull``: fetch, then move local branches forward to the remote's.

A local branch the remote also has moves to the remote's entry when that is
a descendant (a fast-forward); a missing one is created; a diverged one is
left alone and reported (both sides' entries are kept and numbered either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vml.plumbing import arrivals
from vml.plumbing import refs as refs_mod
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.porcelain.common import label
from vml.porcelain.fetch import FetchResult, fetch
from vml.progress import ProgressFn, no_progress
from vml.records import Record


@dataclass
class PullResult(Record):
    """What ``vml pull`` did."""

    fetch: FetchResult
    moved: dict[str, str] = field(default_factory=dict)  # branch -> new entry
    created: dict[str, str] = field(default_factory=dict)
    diverged: dict[str, str] = field(default_factory=dict)  # branch -> remote's entry


def pull(
    repo: Repository,
    remote: str | None = None,
    *,
    ssh_command: str | None = None,
    progress: ProgressFn = no_progress,
) -> PullResult:
    """Fetch from ``remote`` and fast-forward (or create) local branches."""
    res = PullResult(fetch(repo, remote, ssh_command=ssh_command, progress=progress))
    with repo.lock():
        table = refs_mod.read_refs(repo)
        reader = PackReader(repo)
        moves: list[refs_mod.RefMove] = []
        try:
            for b, entry in sorted(res.fetch.branches.items()):
                theirs = refs_mod.resolve_name(repo, entry, table)
                ours = table.branches.get(b)
                ref = refs_mod.BRANCH_PREFIX + b.encode()
                name = label(table, theirs) or theirs.hex()[:12]
                if ours is None:
                    moves.append(refs_mod.create(ref, theirs))
                    res.created[b] = name
                elif ours == theirs or arrivals.is_ancestor(reader, theirs, ours):
                    continue
                elif arrivals.is_ancestor(reader, ours, theirs):
                    moves.append(refs_mod.RefMove(ref, theirs, ours, check=True))
                    res.moved[b] = name
                else:
                    res.diverged[b] = name
        finally:
            reader.close()
        # All branches or none: a ref lock in the way moves none of them.
        refs_mod.move_refs(repo, moves)
    return res
