"""``vml prune``: forget entries by a retention policy (restic ``forget`` style).

The policy applies to each area's entries separately (entries are grouped by
the area they were saved from).  Entries an area holds, tags name or
branches point at are always kept, as are entries a ``--keep-tag`` names.
The others are removed as ``vml rm`` removes them: their children move onto
their parent, no image data is copied.  ``vml gc`` then reclaims the space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import read_entry
from vml.plumbing.forest import load_forest, repository_areas
from vml.plumbing.packreader import PackReader
from vml.plumbing.repository import Repository
from vml.plumbing.retention import Policy, select
from vml.porcelain.common import label
from vml.porcelain.reshape import RmResult, remove_entries
from vml.progress import ProgressFn, no_progress
from vml.records import Record


@dataclass
class Decision(Record):
    """One entry and why it stays (empty: it goes)."""

    entry: str
    created: str
    area: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class PruneResult(Record):
    """What ``vml prune`` kept and removed."""

    keep: list[Decision]
    remove: list[Decision]
    dry_run: bool
    rm: RmResult | None = None


def _when(iso: str, fallback: int) -> datetime:
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return datetime.fromtimestamp(fallback, UTC)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def prune(
    repo: Repository,
    policy: Policy,
    *,
    keep_tags: list[str] | None = None,
    dry_run: bool = False,
    progress: ProgressFn = no_progress,
) -> PruneResult:
    """Apply ``policy``; with ``dry_run`` only say what would go and what stays."""
    keep_tags = keep_tags or []
    if policy.empty() and not keep_tags:
        raise UsageError(
            "no retention policy given, so nothing would be removed",
            "pass --keep-last N, --keep-daily N, ... or --keep-tag NAME",
        )
    table = refs_mod.read_refs(repo)
    for t in keep_tags:
        if t not in table.tags:
            raise UsageError(f"no tag named {t!r}", "run `vml tag` to list the tags")
    protected: dict[bytes, list[str]] = {}
    for a in repository_areas(repo):
        for held in (a.state.entry, a.state.pending):
            if held:
                protected.setdefault(bytes.fromhex(held), []).append(f"area {a.path}")
    for name, c in sorted(table.tags.items()):
        why = "keep-tag" if name in keep_tags else "tag"
        protected.setdefault(c, []).append(f"{why} {name}")
    for name, c in sorted(table.branches.items()):
        protected.setdefault(c, []).append(f"branch {name}")

    reader = PackReader(repo)
    groups: dict[str, list[tuple[bytes, datetime]]] = {}
    info: dict[bytes, tuple[str, str]] = {}
    try:
        for c in sorted(set(table.entries.values()), key=lambda x: table.number_of(x) or 0):
            e = read_entry(reader, c)
            groups.setdefault(e.meta.area_id, []).append((c, _when(e.meta.created, e.commit_time)))
            info[c] = (e.meta.created, e.meta.area)
    finally:
        reader.close()
    kept: dict[bytes, list[str]] = {c: list(r) for c, r in protected.items()}
    for items in groups.values():
        for c, reasons in select(items, policy).items():
            kept.setdefault(c, []).extend(reasons)
    keep: list[Decision] = []
    remove: list[Decision] = []
    for c in sorted(info, key=lambda x: table.number_of(x) or 0):
        d = Decision(label(table, c) or c.hex()[:12], info[c][0], info[c][1], kept.get(c, []))
        (keep if d.reasons else remove).append(d)
    result = PruneResult(keep, remove, dry_run)
    if dry_run or not remove:
        return result
    report = RmResult()
    numbers = [int(d.entry[1:]) for d in remove if d.entry.startswith("E")]
    reader = PackReader(repo)
    try:
        forest = load_forest(reader, table)  # only to remove: a dry run needs no parents
    finally:
        reader.close()
    remove_entries(repo, forest, numbers, report, progress, loaded_from=table)
    result.rm = report
    return result
