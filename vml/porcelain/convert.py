"""``vml convert``: re-express an entry against another parent, content unchanged.

``--to full`` makes the entry a root holding every block; ``--to
differential`` expresses it against a base (``--base``, by default the full
entry at the root of its chain); ``--to incremental`` against the entry saved
just before it in the same area (or ``--base``).  Blocks shared with the new
parent are inherited, other blocks keep the objects they are built from
(referenced by id, or named by an anchored block; see plumbing/rewrite.py):
no image data is read or written.  The entry's descendants are rewritten to point
at its new commit; names and areas follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from vml.errors import UsageError
from vml.plumbing import refs as refs_mod
from vml.plumbing.chains import read_entry
from vml.plumbing.entries import KINDS
from vml.plumbing.forest import Forest, load_forest
from vml.plumbing.packreader import PackReader
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.repository import Repository
from vml.plumbing.rewrite import (
    ExpressStats,
    reexpress_images,
    rewrite_entry,
)
from vml.porcelain.common import label
from vml.porcelain.reshape import RewriteReport, Rewritten, entry_commit, finish_pack
from vml.progress import ProgressFn, no_progress


@dataclass
class ConvertResult(RewriteReport):
    """What ``vml convert`` did."""

    entry: str = ""
    kind: str = ""
    parent: str | None = None
    old_kind: str = ""
    old_parent: str | None = None
    changed: bool = True


def _previous_in_area(
    reader: PackReader, table: refs_mod.RefTable, forest: Forest, commit: bytes
) -> bytes | None:
    """The newest entry saved before ``commit`` from the same area, outside its subtree."""
    me = read_entry(reader, commit)
    mine = table.number_of(commit) or 0
    below = set(forest.descendants(commit))
    best: tuple[int, bytes] | None = None
    for n, c in table.entries.items():
        if n >= mine or c == commit or c in below:
            continue
        if read_entry(reader, c).meta.area_id != me.meta.area_id:
            continue
        if best is None or n > best[0]:
            best = (n, c)
    return best[1] if best else None


def _new_parent(
    repo: Repository,
    reader: PackReader,
    table: refs_mod.RefTable,
    forest: Forest,
    commit: bytes,
    to: str,
    base: str | None,
) -> bytes | None:
    """The parent a ``to`` entry gets; refuses one inside the entry's own subtree."""
    me = label(table, commit) or commit.hex()[:12]
    new_parent: bytes | None
    if to == "full":
        new_parent = None
    elif base is not None:
        new_parent = entry_commit(repo, base, table)
    elif to == "differential":
        new_parent = forest.root(commit)
        if new_parent == commit:
            raise UsageError(
                f"{me} is the full entry at the root of its chain",
                "pass --base ENTRY to express it against another entry",
            )
    else:
        new_parent = _previous_in_area(reader, table, forest, commit)
        if new_parent is None:
            raise UsageError(f"no entry was saved before {me} in its area", "pass --base ENTRY")
    if new_parent is not None and (
        new_parent == commit or new_parent in set(forest.descendants(commit))
    ):
        raise UsageError(
            f"{label(table, new_parent)} depends on {me}; it cannot become its parent",
            "choose an entry outside its subtree",
        )
    return new_parent


def convert(
    repo: Repository,
    name: str,
    to: str,
    *,
    base: str | None = None,
    progress: ProgressFn = no_progress,
) -> ConvertResult:
    """Re-express entry ``name`` as a ``to`` entry (see the module docstring)."""
    if to not in KINDS:
        raise UsageError(f"unknown entry kind {to!r}", "use full, differential or incremental")
    if base is not None and to == "full":
        raise UsageError("a full entry has no base", "drop --base")
    table = refs_mod.read_refs(repo)
    commit = entry_commit(repo, name, table)
    reader = PackReader(repo)
    writer = PackWriter(repo)
    try:
        forest = load_forest(reader, table)
        e = read_entry(reader, commit)
        me = label(table, commit) or commit.hex()[:12]
        new_parent = _new_parent(repo, reader, table, forest, commit, to, base)
        result = ConvertResult(
            entry=me,
            kind=to,
            parent=label(table, new_parent),
            old_kind=e.meta.kind,
            old_parent=label(table, e.parent),
        )
        if new_parent == e.parent and to == e.meta.kind:
            result.changed = False
            writer.abort()
            return result
        stats = ExpressStats()
        progress("rewrite", 0, 1)
        images = reexpress_images(reader, writer, e, new_parent, stats, keep_base_layers=False)
        onto = label(table, new_parent) if new_parent is not None else None
        note = f"converted to {to}" + (f" on {onto}" if onto else "")
        mapping = {
            commit: rewrite_entry(
                reader,
                writer,
                e,
                new_parent,
                parent_label=onto or "none",
                kind=to,
                images=images,
                note=note,
            )
        }
        order = [commit]
        result.rewritten.append(Rewritten(me, commit.hex(), mapping[commit].hex(), note))
        result.rewrite_below(reader, writer, forest, table, mapping, order, commit)
        result.pack_bytes = finish_pack(repo, writer)
        result.add_stats(stats)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    result.move_names(repo, table, writer, mapping, order)
    return result
