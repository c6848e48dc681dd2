"""Saving files as an entry: each file into a pack, then the entry's trees.

A save compares each file against a :class:`Baseline`: the parent entry (what
the new entry's layers sit on) and the entry the area holds, which the area
cache describes.  :class:`Saver` writes small files whole and large files as
blocks (see images.py), builds the next area cache as it goes, and finally
writes the metadata and trees.  Nothing here moves a ref: publishing the
entry is :mod:`vml.plumbing.publish`'s job, so a save that fails leaves only
a pack that nothing names (dropped by :meth:`Saver.abort`).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.objects import Blob

from vml.errors import ConcurrentChange, FileChanged
from vml.plumbing import pageindex
from vml.plumbing.areas import stat_signature
from vml.plumbing.cache import BlockRecords, Cache, CachedFile, CacheWriter, records_path
from vml.plumbing.chains import ResolvedImage, resolve_image
from vml.plumbing.entries import (
    FILES_NAME,
    IMAGES_NAME,
    META_NAME,
    NAMES_BLOB,
    NAMES_NAME,
    PERM_BITS,
    EntryMeta,
    FileRecord,
    git_mode,
    store_trees,
)
from vml.plumbing.images import (
    Changed,
    SavedLayer,
    SaveInputs,
    fill_partial,
    image_tree,
    save_image,
)
from vml.plumbing.manifests import BLOB_MODE, TREE_MODE, BlockChecks, Manifest
from vml.plumbing.packreader import PackReader
from vml.plumbing.packwriter import PackWriter
from vml.plumbing.pageindex import PLACES_BUDGET, Budget, PageIndex, SavedImage
from vml.plumbing.repository import Repository
from vml.progress import ProgressFn

# (done, total) in bytes of the files being saved.

# When this much of the files' data is left to read (or two thirds of what
# the pack being filled holds, if more), the pack writer is told
# (PackWriter.near_end): a big save's last pack then holds only what these
# bytes store, hashed at the end, while the pack before it is sealed in the
# background as they are compressed.  Counted in data, not in file sizes: a
# memory file's or a disk's holes cost nothing to save.  Measured on W2's
# first save (a RAM file of 256 MiB holding 120 MiB, saved last), the end
# counted in file sizes came when a 192 MiB pack had just rolled over, and
# the save waited ~0.15-0.3 s at its end for its seal.
NEAR_END = 64 << 20


def data_estimate(st: os.stat_result) -> int:
    """The bytes of a file a save reads, as far as its allocation says (holes are not read)."""
    return min(st.st_size, st.st_blocks * 512)


@dataclass
class SourceFile:
    """One file to save: its name in the entry and where to read it."""

    path: str  # area-relative, posix separators
    source: Path  # the file read: in the area, outside it, or a staged copy
    stat: os.stat_result  # as listed; a change before or while reading is refused
    # Where the file may differ from the area's entry (a dirty bitmap's word,
    # or a live save's partial copy); None: read every block holding data.
    changed: Changed | None = None
    # A memory image: its pages are looked up among the other images', not
    # among its own earlier version's (a guest rarely moves memory pages).
    memory: bool = False


@dataclass
class Baseline:
    """What a save compares the files against.

    ``parent`` is the new entry's parent (None: a full entry).  ``held`` is
    the entry the area holds, which ``cache`` describes when it is valid; for
    an incremental save the two are the same entry.
    """

    parent: bytes | None = None
    parent_files: dict[str, FileRecord] = field(default_factory=dict)
    held: bytes | None = None
    held_files: dict[str, FileRecord] = field(default_factory=dict)
    cache: Cache | None = None  # only when valid for ``held``


def read_small(path: Path) -> tuple[bytes, os.stat_result]:
    """A small file's bytes and its ``stat``, refusing one that changed while read."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    if stat_signature(before) != stat_signature(after) or len(data) != before.st_size:
        raise FileChanged(f"{path.name} changed while it was read")
    return data, after


def checks_of(image: ResolvedImage, recs: BlockRecords) -> BlockChecks | None:
    """The checks of an unchanged image: its parent's, or from the area cache.

    The cache describes the file exactly as the parent entry has it; a parent
    saved before checks existed gets them here, so its descendants have them.
    """
    if image.checks is not None:
        return image.checks
    m = image.manifest
    if recs.nblocks != m.nblocks:
        return None
    found = []
    for n in recs.data_blocks():
        rec = recs.stored(n)
        assert rec is not None
        found.append((n, rec[:20], rec[20:36]))
    return BlockChecks.from_blocks(m, found)


class Saver:
    """Saves files one by one into new packs, and the area cache next to them.

    Not thread safe (it feeds one :class:`PackWriter`); hashing and
    compression run in ``pool``.  Call :meth:`finish` once every file is
    saved, or :meth:`abort` to drop everything written.
    """

    def __init__(
        self,
        repo: Repository,
        reader: PackReader,
        pool: Executor,
        area: Path,
        baseline: Baseline,
        total: int,
        progress: ProgressFn,
        to_read: int,
    ) -> None:
        """``total``: the files' sizes (progress); ``to_read``: their data (:func:`data_estimate`)."""
        self.repo = repo
        self.reader = reader
        self.pool = pool
        self.area = area
        self.base = baseline
        self.total = total
        self.progress = progress
        self.done = 0
        self.read_bytes = 0
        # What is left to read: ``to_read`` less the estimates of the files
        # saved, less what the one being saved has read so far.
        self.to_read = to_read
        self._credited = 0
        self._file_estimate = 0
        self._file_read = 0
        # Blobs the entry uses without writing them (a pack holds them already);
        # the publisher checks they still exist before the ref moves.
        self.reused: set[bytes] = set()
        self.records: list[FileRecord] = []
        self.small_items: dict[str, tuple[int, bytes]] = {}
        self.image_items: dict[str, tuple[int, bytes]] = {}
        self.writer = PackWriter(repo)
        self.cache_writer = CacheWriter(area, repo.page_size, repo.block_size)
        self.stored_bytes = 0
        self._finished = False
        # Pages of the images saved so far, for the next ones' references;
        # built when an image to read follows saved ones.
        self.index: PageIndex | None = None
        self._to_index: list[SavedImage] = []
        self._places_budget = Budget(PLACES_BUDGET)

    def _advance(self, n: int, read: int = 0) -> None:
        """``n`` more bytes of the files saved, ``read`` of them read."""
        self.done += n
        self._file_read += read
        self._near_end()
        self.progress("read", self.done, self.total)

    def _near_end(self) -> None:
        this = min(self._file_estimate, self._file_read)
        left = self.to_read - self._credited - this
        # The pack being filled is sealed while the rest is saved: sealing
        # hashes it at ~1.5x the speed the workers save data (W2's first
        # save), so it starts when what is left takes about as long.
        if left <= max(NEAR_END, self.writer.filling * 2 // 3):
            self.writer.near_end()

    def save(self, f: SourceFile) -> FileRecord:
        """Save one file; small ones whole, the others as blocks."""
        small = f.stat.st_size <= self.repo.block_size
        self._file_estimate, self._file_read = data_estimate(f.stat), 0
        rec = self._save_small(f) if small else self._save_image(f)
        self._credited += self._file_estimate
        self._file_estimate = self._file_read = 0
        self._near_end()
        self.records.append(rec)
        return rec

    def _save_small(self, f: SourceFile) -> FileRecord:
        data, st = read_small(f.source)
        sha = hashlib.sha256(data).hexdigest()
        mode = git_mode(f.stat.st_mode)
        self.small_items[f.path] = (mode, self.writer.add_blob(data))
        self.cache_writer.add(f.path, CachedFile("small", st.st_size, sha, stat_signature(st)))
        self.read_bytes += st.st_size
        self._advance(st.st_size)
        perm = f.stat.st_mode & PERM_BITS
        return FileRecord(f.path, "small", mode, st.st_mtime_ns, st.st_size, sha, perm)

    def _save_image(self, f: SourceFile) -> FileRecord:
        b = self.base
        st = f.stat
        pf = b.parent_files.get(f.path)
        parent_img: ResolvedImage | None = None
        if b.parent is not None and pf is not None and pf.kind == "image":
            parent_img = resolve_image(self.reader, b.parent, f.path)
        cached = b.cache.files.get(f.path) if b.cache is not None else None
        recs = b.cache.records(f.path) if b.cache is not None and cached is not None else None
        try:
            if self._unchanged(parent_img, cached, recs, st):
                assert parent_img is not None and cached is not None and recs is not None
                tree, sha256 = self._same_as_parent(parent_img, cached, recs, st)
                name = self.cache_writer.reuse_records(records_path(self.area, cached.pages or ""))
                self._indexable(f, name, parent_img, None)
            else:
                tree, sha256, name = self._read_image(f, parent_img, recs)
        finally:
            if recs is not None:
                recs.close()  # also when a step above fails
        self.image_items[f.path] = (TREE_MODE, bytes.fromhex(tree.decode()))
        self.cache_writer.add(
            f.path, CachedFile("image", st.st_size, sha256, stat_signature(st), name)
        )
        mode = git_mode(st.st_mode)
        perm = st.st_mode & PERM_BITS
        return FileRecord(f.path, "image", mode, st.st_mtime_ns, st.st_size, sha256, perm)

    def _unchanged(
        self,
        parent_img: ResolvedImage | None,
        cached: CachedFile | None,
        recs: BlockRecords | None,
        st: os.stat_result,
    ) -> bool:
        """True when the cache vouches that the file is the parent's, unread."""
        b = self.base
        return (
            b.parent is not None
            and b.parent == b.held
            and parent_img is not None
            and cached is not None
            and recs is not None
            and cached.kind == "image"
            and cached.stat == stat_signature(st)
            and parent_img.manifest.size == st.st_size
            # An empty layer inherits every block: only over a parent cut the
            # same way (a mirror without vml.blockSize saves in the default size).
            and parent_img.manifest.block_size == self.repo.block_size
            and parent_img.manifest.page_size == self.repo.page_size
        )

    def _same_as_parent(
        self, parent_img: ResolvedImage, cached: CachedFile, recs: BlockRecords, st: os.stat_result
    ) -> tuple[bytes, str]:
        """An unchanged image: a manifest over the parent's blocks and nothing else."""
        man = Manifest(
            st.st_size, cached.sha256, self.repo.block_size, self.repo.page_size, base=False
        )
        if parent_img.checks is not None and parent_img.checks_id is not None:
            # The parent's checks blob, named again: it must still exist at publishing.
            self.reused.add(parent_img.checks_id)
            tree = image_tree(self.writer, man, {}, parent_img.checks, parent_img.checks_id)
        else:
            tree = image_tree(self.writer, man, {}, checks_of(parent_img, recs))
        self._advance(st.st_size)
        return tree.id, cached.sha256

    def _read_image(
        self, f: SourceFile, parent_img: ResolvedImage | None, recs: BlockRecords | None
    ) -> tuple[bytes, str, str]:
        """Read the file (what the cache cannot vouch for) and store what changed."""
        b = self.base
        held_img: ResolvedImage | None = None
        if recs is not None and b.held != b.parent and parent_img is not None:
            old = b.held_files.get(f.path)
            if old is not None and old.kind == "image" and b.held is not None:
                held_img = resolve_image(self.reader, b.held, f.path)

        def match(n: int) -> bool:
            # Do the cache's records (of the held entry) describe the parent's block n?
            if parent_img is None:
                return False
            if held_img is None:
                return b.parent == b.held
            ln = parent_img.manifest.block_length(n)
            return held_img.recipe(n, ln) == parent_img.recipes[n]

        changed = self._changed(f, parent_img, recs)
        if changed is not None and changed.partial:
            assert parent_img is not None
            # The copy holds the changed bytes; the rest of their blocks is the parent's.
            whole = fill_partial(
                self.reader, self.pool, f.source, f.stat.st_size, self.repo.block_size,
                parent_img, changed.ranges,
            )  # fmt: skip
            changed = Changed(whole, partial=True)
            f.stat = os.stat(f.source)  # filled in by us, not changed by anyone
        name, out = self.cache_writer.new_records(f.stat.st_size)
        # A base layer (a full entry, a new file) is stored without references:
        # measured on W2's first save, looking every page up cost ~0.45 s of
        # ~3 s for 11% less stored, and the first save is the one users wait
        # longest for; the later saves, where the guest's page cache is what
        # changed, are where references pay.
        index, own_view = (
            (None, -1) if parent_img is None else self._page_index(f, parent_img, recs)
        )
        try:
            tree, man, nread, layer = save_image(
                self.reader,
                self.writer,
                self.pool,
                f.source,
                f.stat.st_size,
                self.repo.block_size,
                self.repo.page_size,
                SaveInputs(
                    parent_img, recs, match, self.reused, changed, index, self._places_budget
                ),
                out,
                self._advance,
            )
        finally:
            out.close()
            if index is not None:
                index.retire(own_view)
        self.read_bytes += nread
        # The folder was listed before the file was opened: a change in
        # between must not be saved under the listed size and time.
        if stat_signature(os.stat(f.source)) != stat_signature(f.stat):
            raise FileChanged(f"{f.path} changed while it was read")
        self._indexable(f, name, parent_img, layer)
        return tree.id, man.sha256, name

    def _indexable(
        self, f: SourceFile, name: str, parent: ResolvedImage | None, layer: SavedLayer | None
    ) -> None:
        """Offer a saved image's pages to the images saved after it (from its new records).

        Nothing stays open: the records are opened when the image is indexed
        (a save of hundreds of image files must not hold a file of each).
        """
        if self.cache_writer.problem is not None:
            return  # no records: its pages cannot be found (the save goes on)
        path = self.cache_writer.dir / name
        if not path.exists():
            return
        ps, bs, area, size = self.repo.page_size, self.repo.block_size, self.area, f.stat.st_size

        def records() -> BlockRecords | None:
            recs = BlockRecords(path, ps, bs, area)
            if recs.nblocks == 0 or recs.size != size:
                recs.close()
                return None
            return recs

        self._to_index.append(
            SavedImage(
                source=f.source,
                signature=stat_signature(f.stat),
                records=records,
                parent=parent,
                blocks=dict(layer.blocks) if layer is not None else {},
                zero=layer.zero if layer is not None else [],
                places=layer.places if layer is not None else {},
            )
        )

    def _page_index(
        self, f: SourceFile, parent: ResolvedImage | None, recs: BlockRecords | None
    ) -> tuple[PageIndex, int]:
        """The index of every image saved so far, and of ``f``'s parent version (its handle).

        The parent's pages (data copied within a disk: a file extracted
        again where an earlier copy was deleted) are described by the area
        cache's records when the parent is the entry the area holds.
        """
        if self.index is None:
            self.index = PageIndex(self.reader, self.repo.page_size, self.repo.block_size)
        for img in self._to_index:
            self.index.add(img)
        self._to_index = []
        b = self.base
        view = -1
        if (
            pageindex.INDEX_PARENT_VERSION
            and not f.memory
            and parent is not None
            and recs is not None
            and b.parent == b.held
            and b.cache is not None
        ):
            own = b.cache.records(f.path)  # the index keeps its own view of the records
            if own is not None:
                m = parent.manifest
                if (
                    own.size == m.size
                    and own.nblocks == m.nblocks
                    and (m.block_size, m.page_size) == (self.repo.block_size, self.repo.page_size)
                ):
                    img = SavedImage(f.source, [], lambda: own, parent, {}, [])
                    view = self.index.add(img, parent_view=True)
                else:
                    own.close()
        return self.index, view

    def _changed(
        self, f: SourceFile, parent_img: ResolvedImage | None, recs: BlockRecords | None
    ) -> Changed | None:
        """``f.changed`` when the cache vouches for every block outside it, else None.

        It must describe the parent itself (an incremental save over the
        entry the area holds), cut the same way, at the file's recorded
        size.  A partial source (a live save's copy) cannot be read whole
        instead: the save stops, and nothing is stored.
        """
        ch = f.changed
        if ch is None:
            return None
        b = self.base
        ok = (
            b.parent is not None
            and b.parent == b.held
            and parent_img is not None
            and recs is not None
            and recs.nblocks == parent_img.manifest.nblocks
            and recs.size == parent_img.manifest.size
            and parent_img.manifest.block_size == self.repo.block_size
            and parent_img.manifest.page_size == self.repo.page_size
        )
        if ok:
            return ch
        if ch.partial:
            raise ConcurrentChange(
                f"the area cache no longer describes {f.path} as the save began; nothing was saved"
            )
        return None

    def notes(self) -> list[str]:
        """What the user should know about this save beyond its numbers."""
        return [self.cache_writer.problem] if self.cache_writer.problem else []

    def finish(self, meta: EntryMeta) -> bytes:
        """Write the metadata and trees and seal the packs; returns the root tree's id.

        The packs stay protected from a concurrent gc (a pending ``.keep``)
        until :meth:`release`, once a ref reaches them.
        """
        if self.index is not None:
            # References point at these files' bytes as saved: still so?
            self.index.check()
            self.index.close()
            self.index = None
        self._drop_pending()
        # Stored bytes of the data objects; metadata and trees are tiny.
        meta.stats["stored_bytes"] = self.writer.stored_bytes
        meta_blob = Blob.from_string(meta.encode())
        self.writer.add_object(meta_blob)
        names = Blob.from_string(NAMES_BLOB)
        self.writer.add_object(names)
        items: dict[str, tuple[int, bytes]] = {
            META_NAME.decode(): (BLOB_MODE, bytes.fromhex(meta_blob.id.decode())),
            NAMES_NAME.decode(): (BLOB_MODE, bytes.fromhex(names.id.decode())),
        }
        for prefix, group in ((FILES_NAME, self.small_items), (IMAGES_NAME, self.image_items)):
            if group:
                tree = store_trees(self.writer.add_object, group, escape=True)
                items[prefix.decode()] = (TREE_MODE, tree)
        root = store_trees(self.writer.add_object, items)
        self.stored_bytes = self.writer.stored_bytes
        self.writer.finish()
        self._finished = True
        return root

    def release(self) -> None:
        """Refs reach the packs now (or they are garbage): drop their protection."""
        self.writer.release()

    def _drop_pending(self) -> None:
        self._to_index = []

    def abort(self) -> None:
        """Drop the new cache and, unless sealed already, the packs written."""
        if self.index is not None:
            self.index.close()
            self.index = None
        self._drop_pending()
        self.cache_writer.abort()
        if not self._finished:
            self.writer.abort()
