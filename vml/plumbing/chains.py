"""Resolving an image's block map along an entry's dependency chain.

Restore cost must follow the final size, not the chain length: the block map
is resolved first, from manifests and block trees only (metadata, no image
data), into one :class:`Recipe` per block: the whole block it starts from
(or zero) and the page deltas to apply on top, oldest first.  Each block is
then built and written once.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from vml.errors import CorruptRepository, HostileRepository
from vml.plumbing.deltas import apply_delta, overwritten, parse_delta
from vml.plumbing.entries import IMAGES_NAME, Entry, find_in_entry, load_entry, parse_commit
from vml.plumbing.manifests import (
    BLOCKS_NAME,
    CHECKS_NAME,
    MANIFEST_NAME,
    MAX_ANCHORED_DELTAS,
    SOURCES_NAME,
    SPARSE_CHECKS_NAME,
    TREE_MODE,
    Anchored,
    BlockChecks,
    LayerBlock,
    Manifest,
    parse_tree,
    read_block_map,
    read_sources,
)
from vml.plumbing.packreader import BLOB, PackReader

# A delta chain longer than this on one block makes the next save store the
# block whole, so that restore work per block stays bounded.
MAX_DELTA_DEPTH = 16
# Guards against a ref cycle or a hostile chain in a repository.
MAX_CHAIN = 1 << 20
# No save stacks more than MAX_DELTA_DEPTH deltas on a block, and rm/convert
# name at most MAX_ANCHORED_DELTAS in an anchored block (which saves then
# store whole past MAX_DELTA_DEPTH): a block needing more is not VML's.
MAX_RECIPE_DELTAS = MAX_ANCHORED_DELTAS


NO_SOURCES: frozenset[bytes] = frozenset()


@dataclass(frozen=True)
class Recipe:
    """How to build one block: a whole block (or zeros) plus deltas.

    ``sources``: the blobs the layers that name its deltas list in their
    ``sources`` trees, the only ones its version-3 deltas may take reference
    pages from (not part of equality: the same objects build the same block).
    """

    base: bytes | None
    deltas: tuple[bytes, ...] = ()
    sources: frozenset[bytes] = field(default=NO_SOURCES, compare=False)


ZERO = Recipe(None)


class Recipes(dict[int, Recipe]):
    """Block number -> recipe, holding only blocks that are not all zero.

    A block absent from it is zero (``recipes[n]`` answers ``ZERO``), so a
    1 TiB image holding a few MiB costs a few entries, not a million.
    Iterating gives the non-zero blocks only.
    """

    def __missing__(self, key: int) -> Recipe:
        return ZERO


@dataclass
class ResolvedImage:
    """An image of one entry, resolved to one recipe per block."""

    manifest: Manifest
    recipes: Recipes
    # The entry's check of every block (blob id and xxh3-128), or None for
    # an entry written before checks existed.
    checks: BlockChecks | None = None
    _sorted: list[int] | None = None
    # The checks blob's id (binary): an unchanged image names it again.
    checks_id: bytes | None = None

    def check(self, n: int) -> tuple[bytes, bytes] | None:
        """Block ``n``'s ``(blob id, xxh3-128)``, or None when the entry has no checks."""
        return None if self.checks is None else self.checks.get(n)

    def recipe(self, n: int, length: int) -> Recipe | None:
        """Block ``n``'s recipe if it exists with exactly ``length`` bytes."""
        if n >= self.manifest.nblocks or self.manifest.block_length(n) != length:
            return None
        return self.recipes[n]

    def nonzero(self) -> list[int]:
        """The blocks that are not all zero, in increasing order."""
        if self._sorted is None:
            self._sorted = sorted(self.recipes)
        return self._sorted

    def nonzero_in(self, start: int, end: int) -> list[int]:
        """The blocks in ``[start, end)`` that are not all zero, in order."""
        s = self.nonzero()
        return s[bisect_left(s, start) : bisect_left(s, end)]


def same_length_end(parent: ResolvedImage | None, size: int, block_size: int) -> int:
    """Blocks below this have a block of the same length in ``parent``."""
    if parent is None or parent.manifest.block_size != block_size:
        return 0  # cut another way: no block lines up
    if parent.manifest.size == size:
        return (size + block_size - 1) // block_size
    return min(size, parent.manifest.size) // block_size


def commit_tree_parent(reader: PackReader, commit: bytes) -> tuple[bytes, bytes | None]:
    """The root tree and the single parent of an entry commit."""
    c = parse_commit(commit, reader.read(commit, 1)[1])
    if len(c.parents) > 1:
        raise CorruptRepository(f"commit {commit.hex()} has several parents; not a VML entry")
    parent = bytes.fromhex(c.parents[0].decode()) if c.parents else None
    return bytes.fromhex(c.tree.decode()), parent


def read_entry(reader: PackReader, commit: bytes) -> Entry:
    """Load entry ``commit`` (commit and metadata) through ``reader``."""
    return load_entry(reader.data, commit)


def _read_tree(reader: PackReader) -> Callable[[bytes], bytes]:
    return lambda sha: reader.read(sha, 2)[1]


def _image_items(
    reader: PackReader, root_tree: bytes, path: str
) -> dict[bytes, tuple[int, bytes]] | None:
    found = find_in_entry(reader.data, root_tree, IMAGES_NAME, path)
    if found is None or found[0] != TREE_MODE:
        return None
    return {name: (mode, sha) for name, mode, sha in parse_tree(reader.read(found[1], 2)[1])}


class Layer(NamedTuple):
    """One entry's layer of an image: its manifest, block map tree and sources."""

    manifest: Manifest
    blocks: bytes | None  # the ``blocks`` tree's id, None when it stores no block
    sources: frozenset[bytes]  # what its version-3 deltas may reference


def _layer(reader: PackReader, items: dict[bytes, tuple[int, bytes]], path: str) -> Layer:
    man = items.get(MANIFEST_NAME)
    if man is None:
        raise CorruptRepository(f"image {path} has no manifest")
    manifest = Manifest.decode(reader.read(man[1], BLOB)[1])
    blocks = items.get(BLOCKS_NAME)
    found = items.get(SOURCES_NAME)
    if (found is not None) != (manifest.version == 2) or (
        found is not None and found[0] != TREE_MODE
    ):
        raise HostileRepository(f"image {path}: its sources tree and its manifest version disagree")
    sources = NO_SOURCES if found is None else read_sources(_read_tree(reader), found[1])
    return Layer(manifest, blocks[1] if blocks else None, sources)


def image_layer(reader: PackReader, root_tree: bytes, path: str) -> Layer | None:
    """An entry's layer of image ``path`` (manifest, blocks tree id, sources), or None."""
    items = _image_items(reader, root_tree, path)
    return None if items is None else _layer(reader, items, path)


def _checks(
    reader: PackReader, items: dict[bytes, tuple[int, bytes]], manifest: Manifest, path: str
) -> tuple[BlockChecks, bytes] | None:
    """The image's checks (sparse or dense, whichever it has) and their blob's id."""
    for name, sparse in ((SPARSE_CHECKS_NAME, True), (CHECKS_NAME, False)):
        found = items.get(name)
        if found is None:
            continue
        try:
            return BlockChecks(manifest, reader.read(found[1], BLOB)[1], sparse), found[1]
        except CorruptRepository as e:
            raise CorruptRepository(f"image {path}: {e.message}") from None
    return None


def _subtract(spans: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint ``spans`` minus sorted (possibly touching) ``cuts``, in one pass."""
    out: list[tuple[int, int]] = []
    i = 0
    for a, b in spans:
        while i < len(cuts) and cuts[i][1] <= a:
            i += 1
        j = i
        while a < b and j < len(cuts) and cuts[j][0] < b:
            ca, cb = cuts[j]
            if ca > a:
                out.append((a, ca))
            a = max(a, cb)
            j += 1
        if a < b:
            out.append((a, b))
    return out


class _Unresolved:
    """The blocks not yet resolved, as sorted disjoint ``[start, end)`` spans.

    Sized by what the layers name, not by the image: a block nobody names
    costs nothing until the base layer settles it as zero.
    """

    def __init__(self, n: int) -> None:
        self.spans = [(0, n)] if n else []
        self._starts = [a for a, _ in self.spans]

    def __contains__(self, b: int) -> bool:
        i = bisect_right(self._starts, b) - 1
        return i >= 0 and b < self.spans[i][1]

    def overlap(self, a: int, b: int) -> list[tuple[int, int]]:
        """The unresolved parts of ``[a, b)``."""
        out = []
        i = max(bisect_right(self._starts, a) - 1, 0)
        while i < len(self.spans) and self.spans[i][0] < b:
            lo, hi = max(a, self.spans[i][0]), min(b, self.spans[i][1])
            if lo < hi:
                out.append((lo, hi))
            i += 1
        return out

    def remove(self, cuts: list[tuple[int, int]]) -> None:
        if cuts:
            self.spans = _subtract(self.spans, sorted(cuts))
            self._starts = [a for a, _ in self.spans]


class _Resolution:
    """The blocks settled so far, walking an image's layers from the newest."""

    def __init__(self, path: str, nblocks: int) -> None:
        self.path = path
        self.pending: dict[int, list[bytes]] = {}  # block -> deltas found so far (newest first)
        self.pending_sources: dict[int, frozenset[bytes]] = {}  # block -> their layers' sources
        # Unions of layers' sources, made once: blocks stacking deltas of the same
        # layers share one set, not one copy each (blocks x sources otherwise).
        self._unions: dict[tuple[frozenset[bytes], frozenset[bytes]], frozenset[bytes]] = {}
        self.recipes = Recipes()
        self.unresolved = _Unresolved(nblocks)

    def settle(
        self,
        b: int,
        base: bytes | None,
        older: tuple[bytes, ...] = (),
        sources: frozenset[bytes] = NO_SOURCES,
    ) -> None:
        """Block ``b`` starts from ``base`` (None: zeros) and ``older`` deltas, then the newer ones."""
        deltas = older + tuple(reversed(self.pending.pop(b, [])))
        newer = self.pending_sources.pop(b, NO_SOURCES)
        sources = self.union(sources, newer)
        if len(deltas) > MAX_RECIPE_DELTAS:
            raise HostileRepository(
                f"block {b} of image {self.path} needs {len(deltas)} page deltas; "
                f"at most {MAX_RECIPE_DELTAS} are read"
            )
        if base is not None or deltas:
            self.recipes[b] = Recipe(base, deltas, sources)  # all zeros stays absent

    def union(self, a: frozenset[bytes], b: frozenset[bytes]) -> frozenset[bytes]:
        """``a | b``, one object for every block that needs the same union."""
        if not a or not b or a is b:
            return a or b
        key = (a, b)  # frozensets cache their hash; the same objects compare by identity
        found = self._unions.get(key)
        if found is None:
            found = self._unions[key] = a | b
        return found

    def zero_ranges(self, manifest: Manifest) -> None:
        """The layer's zero ranges: zero from here down (newer deltas built on zeros)."""
        done: list[tuple[int, int]] = []
        for za, zb in manifest.zero:
            done += self.unresolved.overlap(za, zb)
        if done:
            for b in [b for b in self.pending if _within(done, b)]:
                self.settle(b, None)
            self.unresolved.remove(done)

    def block_map(self, bmap: dict[int, LayerBlock], sources: frozenset[bytes]) -> None:
        """The layer's blocks: whole and anchored ones settle, deltas wait for what is below."""
        done: list[tuple[int, int]] = []
        for b in sorted(bmap):
            if b not in self.unresolved:
                continue
            entry = bmap[b]
            if isinstance(entry, Anchored):
                # Self-contained: its own base and deltas, then the newer ones.
                self.settle(b, entry.base, entry.deltas, sources if entry.deltas else NO_SOURCES)
                done.append((b, b + 1))
                continue
            is_delta, sha = entry
            if is_delta:
                self.pending.setdefault(b, []).append(sha)
                if sources:
                    had = self.pending_sources.get(b)
                    self.pending_sources[b] = sources if had is None else self.union(had, sources)
            else:
                self.settle(b, sha)
                done.append((b, b + 1))
        self.unresolved.remove(done)


def resolve_image(reader: PackReader, commit: bytes, path: str) -> ResolvedImage | None:
    """Resolve image ``path`` of entry ``commit`` (None if it is not an image there).

    The work follows the blocks the layers name (and the zero ranges they
    list), never the image's size: holes and zero blocks cost nothing.
    """
    tree, parent = commit_tree_parent(reader, commit)
    items = _image_items(reader, tree, path)
    if items is None:
        return None
    top = _layer(reader, items, path)
    target = top.manifest
    found_checks = _checks(reader, items, target, path)
    res = _Resolution(path, target.nblocks)
    layer: Layer | None = top
    depth = 0
    while res.unresolved.spans:
        if layer is None:
            raise CorruptRepository(
                f"image {path} of {commit.hex()[:12]} depends on an entry that lacks it"
            )
        manifest, blocks_tree, sources = layer
        if manifest.block_size != target.block_size:
            raise CorruptRepository(f"image {path} changes block size along its chain")
        res.zero_ranges(manifest)
        if blocks_tree is not None:
            bmap = read_block_map(_read_tree(reader), blocks_tree, manifest.nblocks)
            if manifest.zero and any(_within(manifest.zero, b) for b in bmap):
                raise CorruptRepository(
                    f"image {path} of {commit.hex()[:12]} names a block both zero and stored"
                )
            res.block_map(bmap, sources)
        if manifest.base:
            for b in list(res.pending):
                res.settle(b, None)
            break
        if parent is None:
            raise CorruptRepository(f"image {path} of {commit.hex()[:12]} has no base entry")
        depth += 1
        if depth > MAX_CHAIN:
            raise CorruptRepository("entry chain is implausibly long (a cycle?)")
        tree, next_parent = commit_tree_parent(reader, parent)
        layer = image_layer(reader, tree, path)
        parent = next_parent
    checks, checks_id = found_checks if found_checks is not None else (None, None)
    return ResolvedImage(target, res.recipes, checks, checks_id=checks_id)


def _within(spans: list[tuple[int, int]], b: int) -> bool:
    """Whether block ``b`` lies in one of the sorted disjoint ``spans``."""
    i = bisect_right(spans, (b, 1 << 62)) - 1
    return i >= 0 and spans[i][0] <= b < spans[i][1]


class Sources(Protocol):
    """Where building takes a reference page's bytes from (version-3 deltas)."""

    def read(self, sha: bytes, offset: int, length: int, verify: bool = True) -> bytes:
        """``length`` bytes of blob ``sha`` at ``offset`` (fewer when it does not hold them)."""
        ...


class SourceReader:
    """Serves reference pages (version-3 deltas) from their source blobs.

    Sources are read whole and kept in a bounded LRU (``budget`` bytes of
    inflated blobs), shared by the workers building an image, so a source
    many blocks reference is read once while it stays in the cache.  Safe
    to use from several threads.
    """

    def __init__(self, reader: PackReader, budget: int = 64 << 20) -> None:
        self.reader = reader
        self.budget = budget
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.read_bytes = 0  # bytes of sources read (inflated), for tests and benchmarks

    def read(self, sha: bytes, offset: int, length: int, verify: bool = True) -> bytes:
        """``length`` bytes of blob ``sha`` at ``offset`` (fewer when it does not hold them)."""
        with self._lock:
            data = self._cache.get(sha)
            if data is not None:
                self._cache.move_to_end(sha)
        if data is None:
            data = self.reader.read(sha, BLOB, verify=verify)[1]
            with self._lock:
                self.read_bytes += len(data)
                if sha not in self._cache and len(data) <= self.budget:
                    self._cache[sha] = data
                    self._held += len(data)
                    while self._held > self.budget:
                        _, old = self._cache.popitem(last=False)
                        self._held -= len(old)
        return data[offset : offset + length]


def materialize(
    reader: PackReader,
    recipe: Recipe,
    length: int,
    *,
    verify: bool = True,
    sources: Sources | None = None,
    seen: list[tuple[bytes, bytes]] | None = None,
) -> bytes | None:
    """Build one block; None means all zero.

    ``verify=False`` skips checking each object's id: for callers that check
    the built block against the entry's checks instead.  Reference pages
    come through ``sources`` (shared by the caller's workers; None: a reader
    for this block alone), and only from blobs the recipe's layers name.
    ``seen`` gets each blob read, ``(id, bytes)`` (the caller may keep pages
    of them once the block is checked).
    """
    if recipe.base is None and not recipe.deltas:
        return None
    if recipe.base is None:
        buf = bytearray(length)
    else:
        data = reader.read(recipe.base, BLOB, verify=verify)[1]
        if len(data) != length:
            raise CorruptRepository(
                f"block {recipe.base.hex()} has {len(data)} bytes where {length} belong"
            )
        if seen is not None:
            seen.append((recipe.base, data))
        if not recipe.deltas:
            return data
        buf = bytearray(data)
    allowed = recipe.sources
    src: Sources | None = sources

    def source(sha: bytes, offset: int, n: int) -> bytes:
        nonlocal src
        if sha not in allowed:
            raise CorruptRepository(
                f"a page delta references {sha.hex()}, which its layer's sources do not name"
            )
        if src is None:
            src = SourceReader(reader, budget=8 * length)
        return src.read(sha, offset, n, verify)

    blobs = [reader.read(d, BLOB, verify=verify)[1] for d in recipe.deltas]
    if seen is not None:
        seen.extend(zip(recipe.deltas, blobs, strict=True))
    # Each delta parsed once, here, for both steps below.
    parsed = [parse_delta(b) for b in blobs]
    skips: list[set[int]] = [set() for _ in blobs]
    if allowed and len(blobs) > 1:
        # Reference pages a newer delta names again are never read.
        skips = overwritten(parsed)
    for blob, d, skip in zip(blobs, parsed, skips, strict=True):
        apply_delta(buf, blob, source, skip, d)
    return bytes(buf)


T = TypeVar("T")
R = TypeVar("R")

# Blocks in flight in an ordered_map over an image's blocks (memory: this
# many blocks per image at a time).
WINDOW = 16


def ordered_map(
    pool: Executor, fn: Callable[[T], R], items: Iterator[T], window: int
) -> Generator[R, None, None]:
    """``map`` over a thread pool with at most ``window`` items in flight, in order.

    Bounded so memory stays flat whatever the image size.  When the consumer
    stops early (an error, or closing the generator), the items still queued
    are cancelled and the running ones waited for before this returns, so no
    worker is left using a file the caller is about to close.
    """
    queue: deque[Future[R]] = deque()
    try:
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) >= window:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        for fut in queue:
            fut.cancel()
        wait(queue)
