"""Re-expressing an entry against another parent without changing its content.

An entry's image layer says, per block, "this whole block", "these pages on
top of the parent's version", "zero", or nothing (inherit).  To express an
entry X against a new parent Q, both are resolved to recipes (chains.py,
metadata only) and compared block by block:

- same recipe in X and Q: inherit (nothing stored);
- X's block is zero: listed as zero (a base layer just leaves it out);
- X's recipe is a whole block with no deltas: that block's id is reused;
- X's recipe is Q's recipe plus one delta: that delta is reused;
- otherwise the layer names X's recipe itself, as an *anchored* block (a
  small tree holding the whole block and the deltas it is built from, see
  manifests.py).

So no image data is ever read or written: rm and convert write trees,
manifests, metadata and commits only, and every block costs as much to build
afterwards as before.  When X's old parent R is removed and X moves onto R's
parent P, this gives exactly the merge of X's layer with R's.

The new entry commit keeps the old one's tree for small files, its message,
author and times; only ``vml-entry.json`` (parent, kind), the changed image
trees and the ``VML-Kind``/``VML-Parent``/``VML-Rewritten`` trailers change.
Rewriting is deterministic, so running an interrupted command again makes
the same commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dulwich.objects import Blob, Commit, ObjectID

from vml.errors import CorruptRepository
from vml.plumbing.chains import (
    ZERO,
    ResolvedImage,
    image_layer,
    read_entry,
    resolve_image,
    same_length_end,
)
from vml.plumbing.entries import (
    IMAGES_NAME,
    META_NAME,
    Entry,
    find_in_entry,
    message_body,
    names_escaped,
    parse_trailers,
    root_items,
    store_trees,
)
from vml.plumbing.forest import Forest
from vml.plumbing.manifests import BLOB_MODE, TREE_MODE, Anchored, LayerBlock, Manifest
from vml.plumbing.packreader import PackReader

if TYPE_CHECKING:
    # Only the callers that rewrite (rm, convert) make a writer: `vml log`,
    # which reads history() here, loads no pack-writing code.
    from vml.plumbing.packwriter import PackWriter

REWRITTEN_TRAILER = "VML-Rewritten"


@dataclass
class ExpressStats:
    """What re-expressing images cost."""

    reused_blocks: int = 0  # whole blocks and deltas kept as the layer's own
    anchored_blocks: int = 0  # blocks whose existing recipe the layer now names itself


def express_image(
    x: ResolvedImage,
    q: ResolvedImage | None,
    stats: ExpressStats,
) -> tuple[Manifest, dict[int, LayerBlock], frozenset[bytes]]:
    """Image ``x`` as a layer over ``q`` (None: a base layer); see the module docstring.

    Returns the manifest, the block map and the layer's sources: every blob
    the deltas it names may reference (their old layers' sources), so git
    still reaches them from the new layer.

    Metadata only: every block either keeps an object it already had (a
    whole block, or the one delta it adds to ``q``'s version) or names its
    resolved recipe itself (an anchored block).  No image data is read or
    written, and building any block costs what it cost before.
    """
    m = x.manifest
    base = q is None
    blocks: dict[int, LayerBlock] = {}
    sources: set[frozenset[bytes]] = set()
    zero = _ZeroRanges()
    # Only blocks that hold data in x or q need a look; where both are zero
    # with the same length, the layer inherits.  Blocks q lacks (x grew,
    # or its last block changed length) are listed as zero in bulk.
    sle = m.nblocks if q is None else same_length_end(q, m.size, m.block_size)
    todo = x.nonzero() if q is None else sorted(set(x.nonzero()).union(q.nonzero_in(0, sle)))
    pos = 0
    for n in todo:
        if not base and n > max(pos, sle):
            zero.add(max(pos, sle), n)
        pos = n + 1
        length = m.block_length(n)
        r = x.recipes[n]
        qr = q.recipe(n, length) if q is not None else None
        if qr is not None and qr == r:
            continue
        if r == ZERO:
            if not base:
                zero.add(n, n + 1)
            continue
        if not r.deltas:
            assert r.base is not None
            blocks[n] = (False, r.base)
            stats.reused_blocks += 1
        elif qr is not None and r.base == qr.base and r.deltas[:-1] == qr.deltas:
            blocks[n] = (True, r.deltas[-1])  # one delta on top of q's version
            sources.add(r.sources)
            stats.reused_blocks += 1
        else:
            blocks[n] = Anchored(r.base, r.deltas)
            sources.add(r.sources)
            stats.anchored_blocks += 1
    if not base and m.nblocks > max(pos, sle):
        zero.add(max(pos, sle), m.nblocks)
    manifest = Manifest(m.size, m.sha256, m.block_size, m.page_size, base, zero.items)
    return manifest, blocks, frozenset().union(*sources)


class _ZeroRanges:
    """Increasing ``[start, end)`` block ranges, adjacent ones merged."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def add(self, a: int, b: int) -> None:
        if self.items and self.items[-1][1] >= a:
            self.items[-1] = (self.items[-1][0], max(b, self.items[-1][1]))
        else:
            self.items.append((a, b))


def image_trees(reader: PackReader, entry: Entry) -> dict[str, bytes]:
    """Image path -> the image's tree id in ``entry``."""
    out: dict[str, bytes] = {}
    for f in entry.meta.files:
        if f.kind != "image":
            continue
        found = find_in_entry(reader.data, entry.tree, IMAGES_NAME, f.path)
        if found is None or found[0] != TREE_MODE:
            raise CorruptRepository(f"entry {entry.hex[:12]} lacks the blocks of {f.path}")
        out[f.path] = found[1]
    return out


def reexpress_images(
    reader: PackReader,
    writer: PackWriter,
    entry: Entry,
    new_parent: bytes | None,
    stats: ExpressStats,
    *,
    keep_base_layers: bool,
) -> dict[str, bytes]:
    """Every image of ``entry`` as a layer over ``new_parent``; path -> new image tree id.

    With ``keep_base_layers``, an image whose layer is already a base (new in
    the entry, or a full entry) keeps its tree: a base never depends on its
    parent.
    """
    from vml.plumbing.images import image_tree

    out = image_trees(reader, entry)
    parent_entry = read_entry(reader, new_parent) if new_parent is not None else None
    parent_images = (
        {f.path for f in parent_entry.meta.files if f.kind == "image"} if parent_entry else set()
    )
    for path in sorted(out):
        layer = image_layer(reader, entry.tree, path)
        if layer is None:
            raise CorruptRepository(f"entry {entry.hex[:12]} lacks the blocks of {path}")
        if layer[0].base and (keep_base_layers or new_parent is None):
            continue
        x = resolve_image(reader, entry.commit, path)
        assert x is not None
        q = None
        if new_parent is not None and path in parent_images:
            q = resolve_image(reader, new_parent, path)
            if q is not None and q.manifest.block_size != x.manifest.block_size:
                q = None
        manifest, blocks, sources = express_image(x, q, stats)
        # Re-expressing changes how blocks are stored, not what the file
        # holds: the entry keeps its checks.
        tree = image_tree(writer, manifest, blocks, x.checks, sources=sources)
        out[path] = bytes.fromhex(tree.id.decode())
    return out


def rewrite_entry(
    reader: PackReader,
    writer: PackWriter,
    entry: Entry,
    new_parent: bytes | None,
    *,
    parent_label: str,
    kind: str | None = None,
    images: dict[str, bytes] | None = None,
    note: str | None = None,
) -> bytes:
    """Write ``entry``'s new commit on ``new_parent`` (objects to ``writer``); its id.

    ``images`` replaces image trees (path -> tree id); ``note`` is appended
    to the ``VML-Rewritten`` trailer so ``vml show`` tells what happened.
    """
    meta = entry.meta
    meta.parent = new_parent.hex() if new_parent is not None else None
    if kind is not None:
        meta.kind = kind
    meta_blob = Blob.from_string(meta.encode())
    writer.add_object(meta_blob)
    old_items = root_items(reader.data, entry.tree)
    items = {name.decode(): value for name, value in old_items.items() if name != META_NAME}
    items[META_NAME.decode()] = (BLOB_MODE, bytes.fromhex(meta_blob.id.decode()))
    if images:
        # The new images tree names its files the way the entry's files/ does.
        tree = store_trees(
            writer.add_object,
            {p: (TREE_MODE, t) for p, t in images.items()},
            escape=names_escaped(old_items),
        )
        items[IMAGES_NAME.decode()] = (TREE_MODE, tree)
    root = store_trees(writer.add_object, items)

    old = Commit.from_raw_string(1, reader.read(entry.commit, 1)[1])
    assert isinstance(old, Commit)
    trailers = parse_trailers(old.message)
    trailers["VML-Kind"] = meta.kind
    trailers["VML-Parent"] = parent_label
    if note:
        before = trailers.get(REWRITTEN_TRAILER)
        trailers[REWRITTEN_TRAILER] = f"{before}; {note}" if before else note
    body = message_body(old.message).strip() or "VML entry"
    lines = "\n".join(f"{k}: {v}" for k, v in trailers.items())
    c = Commit()
    c.tree = ObjectID(root.hex().encode())
    c.parents = [ObjectID(new_parent.hex().encode())] if new_parent is not None else []
    c.author = old.author
    c.committer = old.committer
    c.author_time = old.author_time
    c.commit_time = old.commit_time
    c.author_timezone = old.author_timezone
    c.commit_timezone = old.commit_timezone
    c.encoding = old.encoding or b"UTF-8"
    c.message = f"{body}\n\n{lines}\n".encode()
    return writer.add_object(c)


def history(trailers: dict[str, str]) -> list[str]:
    """The notes rewriting left on an entry, oldest first."""
    value = trailers.get(REWRITTEN_TRAILER, "")
    return [s.strip() for s in value.split(";") if s.strip()]


def rewrite_below(
    reader: PackReader,
    writer: PackWriter,
    forest: Forest,
    mapping: dict[bytes, bytes],
    start: bytes,
    label_of: Callable[[bytes], str],
) -> list[bytes]:
    """Rewrite every descendant of ``start`` onto its parent's new commit.

    ``mapping`` must already hold ``start``'s new commit; it gains one item
    per descendant.  Their layers stay as they are (their parent's content
    did not change).  Returns the old ids rewritten, parents first.
    """
    done: list[bytes] = []
    for c in forest.descendants(start):
        e = read_entry(reader, c)
        if e.parent is None or e.parent not in mapping:
            raise CorruptRepository(f"commit {c.hex()[:12]} changed parent while being rewritten")
        new_parent = mapping[e.parent]
        mapping[c] = rewrite_entry(reader, writer, e, new_parent, parent_label=label_of(e.parent))
        done.append(c)
    return done
