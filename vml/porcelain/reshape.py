"""What the commands that reshape the entry forest share (``rm``, ``convert``, ``prune``).

Reshaping is a metadata operation: an entry re-expressed against another
parent gets a layer that merges what it needs (see plumbing/rewrite.py),
written as new manifest, tree and commit objects; descendants are rewritten
to point at the new commits; E-numbers, tags, branches and areas follow.
Image blocks are only written where a page delta sat on a block the old
parent replaced.  :class:`RewriteReport` says what was written and moved;
:func:`remove_entries` is the removal ``rm`` and ``prune`` both make.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vml.errors import UnknownEntry, VMLError
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import AreaLocks
from vml.plumbing.chains import read_entry
from vml.plumbing.forest import Forest, apply_rewrite, hold_areas, load_forest
from vml.plumbing.packreader import PackReader
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repository import Repository
from vml.plumbing.rewrite import (
    ExpressStats,
    reexpress_images,
    rewrite_below,
    rewrite_entry,
)
from vml.porcelain.common import label
from vml.progress import ProgressFn, no_progress
from vml.records import Record


@dataclass
class Rewritten(Record):
    """One entry that got a new commit."""

    entry: str
    old: str
    new: str
    note: str | None = None


@dataclass
class Moved(Record):
    """A ref or an area that now names another commit (``new`` None: it was deleted)."""

    name: str  # the ref (refs/tags/good), or the area's path
    old: str
    new: str | None


@dataclass
class RewriteReport(Record):
    """What a reshaping command wrote and moved."""

    rewritten: list[Rewritten] = field(default_factory=list)
    refs_moved: list[Moved] = field(default_factory=list)
    areas_moved: list[Moved] = field(default_factory=list)
    pack_bytes: int = 0  # size of the new pack(s): everything the command wrote
    data_bytes: int = 0  # of which new block and delta data
    reused_blocks: int = 0
    anchored_blocks: int = 0

    def add_stats(self, s: ExpressStats) -> None:
        """Count what re-expressing images did (it writes no block data)."""
        self.reused_blocks += s.reused_blocks
        self.anchored_blocks += s.anchored_blocks

    def rewrite_below(
        self,
        reader: PackReader,
        writer: PackWriter,
        forest: Forest,
        table: refs_mod.RefTable,
        mapping: dict[bytes, bytes],
        order: list[bytes],
        start: bytes,
    ) -> None:
        """Rewrite the descendants of ``start`` (already in ``mapping``) and list them."""

        def label_of(c: bytes) -> str:
            return label(table, c) or "none"

        for d in rewrite_below(reader, writer, forest, mapping, start, label_of):
            order.append(d)
            self.rewritten.append(Rewritten(label_of(d), d.hex(), mapping[d].hex()))

    def move_names(
        self,
        repo: Repository,
        table: refs_mod.RefTable,
        writer: PackWriter,
        mapping: dict[bytes, bytes],
        order: list[bytes],
        drop: tuple[bytes, bytes | None] | None = None,
        force: bool = False,
        locks: AreaLocks | None = None,
    ) -> None:
        """Move names and areas onto the rewritten commits; then release the pack."""
        try:
            moves = apply_rewrite(repo, table, mapping, order, drop=drop, force=force, locks=locks)
        finally:
            writer.release()  # the refs reach the new pack now (or it is garbage)
        self.refs_moved += [Moved(name, old, new or None) for name, old, new in moves.refs]
        self.areas_moved += [Moved(name, old, new or None) for name, old, new in moves.areas]


@dataclass
class RmResult(RewriteReport):
    """What ``vml rm`` did."""

    removed: list[str] = field(default_factory=list)
    # Children of a damaged entry removed with --force: left as they were
    # (they cannot be re-expressed without its data), so still damaged.
    left_damaged: list[str] = field(default_factory=list)


def finish_pack(repo: Repository, writer: PackWriter) -> int:
    """Complete ``writer``'s pack; returns the bytes it holds on disk (pack + index)."""
    writer.finish()
    return writer.disk_bytes


def entry_commit(repo: Repository, name: str, table: refs_mod.RefTable) -> bytes:
    """Resolve ``name`` to a commit held by an E-number."""
    commit = refs_mod.resolve_name(repo, name, table)
    if commit not in set(table.entries.values()):
        raise UnknownEntry(f"{name!r} names commit {commit.hex()[:12]}, which is not an entry")
    return commit


def remove_one(
    repo: Repository,
    commit: bytes,
    report: RmResult,
    progress: ProgressFn = no_progress,
    force: bool = False,
    *,
    names_only: bool = False,
    locks: AreaLocks | None = None,
    known: tuple[refs_mod.RefTable, Forest | None] | None = None,
) -> None:
    """Remove one entry (checked by :func:`rm` or prune; ``force``: even if an area holds it).

    ``names_only`` (a damaged entry removed with --force): its children
    are not rewritten, only its names go.  ``locks``: the areas the command
    holds (see :func:`apply_rewrite`).  ``known``: the refs as just read and
    the forest loaded from them, when they still hold (else both are read
    here; either way :func:`apply_rewrite` checks the refs again under the
    lock).
    """
    table, forest = known if known is not None else (refs_mod.read_refs(repo), None)
    reader = PackReader(repo)
    writer = PackWriter(repo)
    try:
        if forest is None:
            forest = load_forest(reader, table)
        parent = forest.parent.get(commit)  # None also when its commit cannot be read
        me = label(table, commit) or commit.hex()[:12]
        onto = label(table, parent) if parent is not None else None
        kids = forest.children.get(commit, [])
        if names_only:
            report.left_damaged += [label(table, k) or k.hex()[:12] for k in kids]
            kids = []
        mapping: dict[bytes, bytes] = {}
        order: list[bytes] = []
        stats = ExpressStats()
        for i, kid in enumerate(kids):
            progress("rewrite", i, len(kids))
            e = read_entry(reader, kid)
            images = reexpress_images(reader, writer, e, parent, stats, keep_base_layers=True)
            note = f"{me} removed, re-parented onto {onto}" if onto else f"{me} removed, made full"
            mapping[kid] = rewrite_entry(
                reader,
                writer,
                e,
                parent,
                parent_label=onto or "none",
                kind=None if parent is not None else "full",
                images=images,
                note=note,
            )
            order.append(kid)
            kid_label = label(table, kid) or "none"
            report.rewritten.append(Rewritten(kid_label, kid.hex(), mapping[kid].hex(), note))
            report.rewrite_below(reader, writer, forest, table, mapping, order, kid)
        report.pack_bytes += finish_pack(repo, writer)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    report.add_stats(stats)
    report.move_names(
        repo, table, writer, mapping, order, drop=(commit, parent), force=force, locks=locks
    )
    report.removed.append(me)


def remove_entries(
    repo: Repository,
    forest: Forest,
    numbers: list[int],
    report: RmResult,
    progress: ProgressFn = no_progress,
    *,
    force: bool = False,
    damaged: frozenset[int] = frozenset(),
    loaded_from: refs_mod.RefTable | None = None,
) -> None:
    """Remove the entries ``numbers`` (checked by the caller), one rewrite each.

    The areas any of them touches are locked before the first: a command
    running there refuses the whole removal, with nothing changed.  Should a
    later removal fail all the same (an area that appeared meanwhile, a full
    disk), the error says which entries were already removed.
    ``loaded_from``: the refs ``forest`` was loaded from.
    """
    table = refs_mod.read_refs(repo)
    commits = [table.entries[n] for n in numbers if n in table.entries]
    with AreaLocks() as locks:
        hold_areas(repo, forest, commits, locks)
        for i, n in enumerate(numbers):
            progress("remove", i, len(numbers))
            # Each removal rewrites commits, so look the entry up again by its number.
            now = table if i == 0 else refs_mod.read_refs(repo)
            commit = now.entries.get(n)
            if commit is None:
                continue
            try:
                remove_one(
                    repo,
                    commit,
                    report,
                    progress,
                    force=force,
                    names_only=n in damaged,
                    locks=locks,
                    # The forest the caller loaded serves the first removal if
                    # no ref moved since it was loaded (no second walk of it).
                    known=(now, forest) if i == 0 and now == loaded_from else (now, None),
                )
            except VMLError as e:
                if report.removed:
                    e.message += f" (already removed before this: {', '.join(report.removed)})"
                    e.args = (e.message,)
                raise
