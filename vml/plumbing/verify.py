"""Checking a repository: its structure (fsck) and its data (verify).

:func:`check_structure` reads refs, commits, entry metadata, manifests and
block maps only, and checks that every object an entry names exists: quick,
whatever the image sizes.  :func:`check_objects` reads every object the
entries need once and checks its id (and every page delta's header);
:func:`check_files` rebuilds every file of an entry in memory-bounded
streaming, block by block (the same resolution a checkout uses, nothing
written), and checks its digest (small files: their SHA-256).  A bad object is then traced to every
entry whose content depends on it (:func:`entries_using`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from dulwich.objects import Tag

from vml.errors import CorruptRepository
from vml.plumbing import refs as refs_mod
from vml.plumbing.cache import block_hash
from vml.plumbing.chains import (
    WINDOW,
    ResolvedImage,
    SourceReader,
    Sources,
    commit_tree_parent,
    image_layer,
    materialize,
    ordered_map,
    read_entry,
    resolve_image,
)
from vml.plumbing.deltas import delta_header
from vml.plumbing.digests import Digests, block_digest, zero_record
from vml.plumbing.entries import Entry, small_blob
from vml.plumbing.forest import Forest, load_forest
from vml.plumbing.layout import layout_problems, merged_names
from vml.plumbing.manifests import TREE_MODE, layer_block_ids, parse_tree, read_block_map
from vml.plumbing.packreader import BLOB, TREE, PackReader
from vml.plumbing.refpages import RefPages
from vml.progress import Advance, ProgressFn, no_progress

TAG_TYPE = 4
GITLINK_MODE = 0o160000


@dataclass
class Problem:
    """One thing found wrong."""

    message: str
    entry: bytes | None = None  # the commit it was found in
    path: str | None = None
    objects: list[bytes] = field(default_factory=list)  # the bad objects, when known
    note: bool = False  # worth knowing, not damage (e.g. names some file systems merge)


def check_structure(
    reader: PackReader,
    table: refs_mod.RefTable,
    tick: ProgressFn = no_progress,
    only: set[bytes] | None = None,
    forest: Forest | None = None,
) -> tuple[Forest, list[Problem]]:
    """Refs, commits, metadata, manifests, block maps and object presence.

    With ``only``, just those commits are checked (an entry and the chain
    it needs): damage elsewhere is not theirs to report.  ``forest`` is the
    forest when the caller has loaded it already.
    """
    forest = load_forest(reader, table) if forest is None else forest
    problems = [
        Problem(why, c) for c, why in sorted(forest.broken.items()) if only is None or c in only
    ]
    commits = sorted(c for c in forest.parent if only is None or c in only)
    images_of: dict[bytes, set[str]] = {}
    partial: dict[bytes, set[str]] = {}  # entry -> its images stored as partial layers
    for i, c in enumerate(commits):
        tick("check", i, len(commits))
        with reader.remember_trees():  # each file's look-up starts at the entry's root
            problems += _check_entry(reader, forest, c, images_of, partial)
    # A partial layer needs the same image in its parent (both known from above).
    for c in commits:
        p = forest.parent[c]
        if p is None or c not in partial or p not in images_of:
            continue
        for path in sorted(partial[c] - images_of[p]):
            problems.append(Problem("a partial layer whose parent lacks the file", c, path))
    return forest, problems


def _check_entry(
    reader: PackReader,
    forest: Forest,
    c: bytes,
    images_of: dict[bytes, set[str]],
    partial: dict[bytes, set[str]],
) -> list[Problem]:
    """One entry's commit, metadata and files; notes its images in ``images_of``."""
    try:
        e = read_entry(reader, c)
    except CorruptRepository as err:
        return [Problem(err.message, c)]
    problems: list[Problem] = []
    p = forest.parent[c]
    if e.meta.parent != (p.hex() if p is not None else None):
        problems.append(Problem("its metadata names another parent than its commit", c))
    if (e.meta.kind == "full") != (p is None):
        problems.append(
            Problem(f"a {e.meta.kind} entry with{'out' if p is None else ''} a parent", c)
        )
    images_of[c] = {f.path for f in e.meta.files if f.kind == "image"}
    return problems + _entry_problems(reader, e, p, partial)


def _entry_problems(
    reader: PackReader, e: Entry, p: bytes | None, partial: dict[bytes, set[str]]
) -> list[Problem]:
    """One entry's layout, and each file's data, manifest and block objects."""
    c = e.commit
    # What a checkout would refuse, whatever the area holds.
    problems = [Problem(f"it is malformed: {msg}", c) for msg in layout_problems(e.meta)]
    problems += [
        Problem(
            f"{msg} on a file system that ignores case or Unicode normalisation "
            "(vfat, exFAT, NTFS, APFS): check it out onto ext4, xfs or btrfs",
            c,
            note=True,
        )
        for msg in merged_names(e.meta)
    ]
    for f in e.meta.files:
        try:
            if f.kind == "small":
                sha = small_blob(reader.data, e, f.path)
                if sha is None:
                    problems.append(Problem("its data is missing", c, f.path))
                elif not reader.contains(sha):
                    problems.append(Problem("its data object is missing", c, f.path, [sha]))
                continue
            problems += _image_problems(reader, e, f.path, f.size, f.sha256, p, partial)
        except CorruptRepository as err:
            problems.append(Problem(err.message, c, f.path))
    return problems


def _image_problems(
    reader: PackReader,
    e: Entry,
    path: str,
    size: int,
    sha256: str,
    p: bytes | None,
    partial: dict[bytes, set[str]],
) -> list[Problem]:
    """An image's layer: its manifest against the metadata, and its block objects present."""
    c = e.commit
    layer = image_layer(reader, e.tree, path)
    if layer is None:
        return [Problem("its blocks are missing", c, path)]
    out: list[Problem] = []
    man, blocks, sources = layer
    if man.size != size or man.sha256 != sha256:
        out.append(Problem("its manifest disagrees with the metadata", c, path))
    if not man.base:
        partial.setdefault(c, set()).add(path)
        if p is None:
            out.append(Problem("a partial layer in an entry without parent", c, path))
    if blocks is not None:
        bmap = read_block_map(lambda s: reader.data(s, 2), blocks, man.nblocks)
        missing = [
            sha
            for entry in bmap.values()
            for sha in layer_block_ids(entry)
            if not reader.contains(sha)
        ]
        if missing:
            out.append(Problem(f"{len(missing)} block objects are missing", c, path, missing))
    gone = sorted(sha for sha in sources if not reader.contains(sha))
    if gone:
        out.append(
            Problem(f"{len(gone)} objects its page deltas reference are missing", c, path, gone)
        )
    return out


def entry_objects(reader: PackReader, entry: Entry) -> Iterator[tuple[str, bytes, bool]]:
    """``(path, object id, is_delta)`` of every data object ``entry``'s content needs."""
    for f in entry.meta.files:
        if f.kind == "small":
            sha = small_blob(reader.data, entry, f.path)
            if sha is None:
                raise CorruptRepository(f"entry lacks the data of {f.path}")
            yield f.path, sha, False
            continue
        img = resolve_image(reader, entry.commit, f.path)
        if img is None:
            raise CorruptRepository(f"entry lacks the blocks of {f.path}")
        named: set[frozenset[bytes]] = set()
        for r in img.recipes.values():  # zero blocks need no object
            if r.base is not None:
                yield f.path, r.base, False
            for d in r.deltas:
                yield f.path, d, True
            named.add(r.sources)
        # What version-3 deltas may reference: the sources of their layers.
        for sha in sorted(set().union(*named)) if named else ():
            yield f.path, sha, False


def check_objects(
    reader: PackReader,
    entries: list[bytes],
    seen: set[bytes],
    tick: ProgressFn = no_progress,
) -> list[Problem]:
    """Read every data object the entries need once; check ids and delta headers."""
    problems: list[Problem] = []
    for i, c in enumerate(entries):
        tick("verify", i, len(entries))
        try:
            e = read_entry(reader, c)
            for path, sha, is_delta in entry_objects(reader, e):
                if sha in seen:
                    continue
                seen.add(sha)
                try:
                    data = reader.read(sha, BLOB)[1]
                    if is_delta:
                        delta_header(data)
                except CorruptRepository as err:
                    problems.append(Problem(err.message, c, path, [sha]))
        except CorruptRepository as err:
            problems.append(Problem(err.message, c))
    return problems


def _bad_objects(reader: PackReader, shas: list[bytes]) -> list[bytes]:
    bad = []
    for sha in shas:
        try:
            reader.read(sha, BLOB)
        except CorruptRepository:
            bad.append(sha)
    return bad


def check_image(
    reader: PackReader, pool: Executor, img: ResolvedImage, progress: Advance
) -> list[tuple[str, list[bytes]]]:
    """Rebuild one image block by block; returns (message, bad objects) found.

    Only blocks that are not all zero are built; zero blocks enter the
    digest in bulk (the digest then checks their ids).
    """
    m = img.manifest
    found: list[tuple[str, list[bytes]]] = []
    # Reference pages of version-3 deltas: each source read once, before.
    sources: Sources
    try:
        # Spilled beside the repository (the system's temporary folder may be
        # a small tmpfs): an unnamed file, gone with the process.
        spill = reader.repo.vml_dir if reader.repo.vml_dir.is_dir() else None
        sources = RefPages.gather(reader, img, verify=True, spill=spill) or SourceReader(reader)
    except CorruptRepository:
        sources = SourceReader(reader)  # each block then says what it lacks

    def build(n: int) -> tuple[int, bytes | None, bytes, str | None]:
        # Built and hashed in the pool; only the digests come back in order.
        length = m.block_length(n)
        try:
            built = materialize(reader, img.recipes[n], length, sources=sources)
        except CorruptRepository as err:
            return n, None, b"", err.message
        digest = block_digest(built, length)
        have = zero_record(length, m.page_size, m.block_size // m.page_size)[0]
        if built is not None:
            have = block_hash(built)
        check = img.check(n)
        if check is not None and (digest, have) != check:
            return n, None, b"", "it does not match its check"
        return n, digest, have, None

    digests = Digests(m.size, m.block_size)
    broken = False
    done = 0
    try:
        for n, digest, have, error in ordered_map(pool, build, iter(img.nonzero()), WINDOW):
            if error is not None:
                r = img.recipes[n]
                objs = ([r.base] if r.base is not None else []) + list(r.deltas) + sorted(r.sources)
                found.append((f"block {n}: {error}", _bad_objects(reader, objs)))
                broken = True
                continue
            assert digest is not None
            digests.block(n, digest, have)
            end = min((n + 1) * m.block_size, m.size)
            progress(end - done)
            done = end
    finally:
        if isinstance(sources, RefPages):
            sources.close()
    digests.zeros_until(m.nblocks)
    progress(m.size - done)
    if not broken and digests.hash.hexdigest() != m.sha256:
        found.append(("the rebuilt file does not match its digest", []))
    return found


def check_files(
    reader: PackReader,
    pool: Executor,
    commit: bytes,
    progress: Advance = lambda n: None,
) -> list[Problem]:
    """Rebuild every file of entry ``commit`` in memory and check its digest."""
    problems: list[Problem] = []
    try:
        e = read_entry(reader, commit)
    except CorruptRepository as err:
        return [Problem(err.message, commit)]
    for f in e.meta.files:
        try:
            if f.kind == "small":
                sha = small_blob(reader.data, e, f.path)
                if sha is None:
                    problems.append(Problem("its data is missing", commit, f.path))
                    continue
                try:
                    data = reader.read(sha, BLOB)[1]
                except CorruptRepository as err:
                    problems.append(Problem(err.message, commit, f.path, [sha]))
                    continue
                if hashlib.sha256(data).hexdigest() != f.sha256 or len(data) != f.size:
                    problems.append(Problem("does not match its SHA-256", commit, f.path))
                progress(f.size)
                continue
            img = resolve_image(reader, commit, f.path)
            if img is None:
                problems.append(Problem("its blocks are missing", commit, f.path))
                continue
            if img.manifest.sha256 != f.sha256 or img.manifest.size != f.size:
                problems.append(Problem("its manifest disagrees with the metadata", commit, f.path))
            for msg, bad in check_image(reader, pool, img, progress):
                problems.append(Problem(msg, commit, f.path, bad))
        except CorruptRepository as err:
            problems.append(Problem(err.message, commit, f.path))
    return problems


def needed_by(forest: Forest, commits: list[bytes]) -> set[bytes]:
    """``commits`` and every commit they are built on (their chains)."""
    out: set[bytes] = set()
    for c in commits:
        out.add(c)
        out.update(forest.ancestors(c))  # up to an unreadable parent, included
    return out


def entries_using(
    reader: PackReader, commits: list[bytes], bad: set[bytes], *, unreadable: bool = False
) -> set[bytes]:
    """Which of ``commits`` need one of the ``bad`` objects to be rebuilt.

    With ``unreadable``, also those whose content cannot be resolved at all
    (a broken chain, a missing manifest): asked once damage was found.
    """
    out: set[bytes] = set()
    if not bad and not unreadable:
        return out
    for c in commits:
        try:
            e = read_entry(reader, c)
            if any(sha in bad for _p, sha, _d in entry_objects(reader, e)):
                out.add(c)
        except CorruptRepository:
            out.add(c)
    return out


def reach_problem(
    reader: PackReader, start: bytes, done: set[bytes], memo: dict[bytes, str | None]
) -> str | None:
    """Why something ``start`` reaches is not here or does not read; None when all is.

    Walks commits (their parents too), tags and trees, each read (so its id
    is checked), and looks blobs up without reading them: git's connectivity
    check after a fetch.  Commits in ``done`` (complete here already) are not
    walked; ``memo`` keeps each commit's and tree's verdict, so chains that
    share entries are walked once.  A commit whose own objects are all here
    but whose parent's are not gets the parent's reason, said as such.
    """
    chain: list[tuple[bytes, str | None]] = []  # (commit, what its own tree lacks)
    below: str | None = None
    c: bytes | None = start
    while c is not None and c not in done:
        if c in memo:
            below = memo[c]
            break
        try:
            type_num, data = reader.read(c)
            if type_num == BLOB:
                memo[c] = None
                break
            if type_num == TREE:
                memo[c] = below = _tree_problem(reader, c, memo)
                break
            if type_num == TAG_TYPE:
                chain.append((c, None))
                c = tag_target(c, data)
                continue
            tree, parent = commit_tree_parent(reader, c)
        except CorruptRepository as err:
            memo[c] = below = err.message
            break
        chain.append((c, _tree_problem(reader, tree, memo)))
        c = parent
    for commit, own in reversed(chain):
        if own is not None:
            below = own
        elif below is not None and not below.startswith(_BUILT_ON):
            below = f"{_BUILT_ON}{below})"
        memo[commit] = below
    return below


_BUILT_ON = "an entry it is built on is incomplete ("


def tag_target(sha: bytes, data: bytes) -> bytes:
    """The object an annotated tag names."""
    try:
        t = Tag.from_raw_string(TAG_TYPE, data)
        assert isinstance(t, Tag)
        return bytes.fromhex(t.object[1].decode())
    except Exception as e:  # dulwich raises its own format errors
        raise CorruptRepository(f"tag {sha.hex()} is malformed ({e})") from None


def _tree_problem(reader: PackReader, tree: bytes, memo: dict[bytes, str | None]) -> str | None:
    """What tree ``tree`` (and every tree below it) lacks, or None (iterative: trees nest deep)."""
    own: dict[bytes, str | None] = {}
    kids: dict[bytes, list[bytes]] = {}
    stack: list[tuple[bytes, bool]] = [(tree, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            why = own[t]
            for k in kids[t]:
                why = why or memo.get(k)
            memo[t] = why
            continue
        if t in memo or t in own:
            continue
        try:
            items = parse_tree(reader.read(t, TREE)[1])
        except CorruptRepository as err:
            memo[t] = err.message
            continue
        own[t] = next(
            (
                f"object {sha.hex()} is missing"
                for _name, mode, sha in items
                if mode not in (TREE_MODE, GITLINK_MODE) and not reader.contains(sha)
            ),
            None,
        )
        kids[t] = [sha for _name, mode, sha in items if mode == TREE_MODE]
        stack.append((t, True))
        stack.extend((k, False) for k in kids[t])
    return memo.get(tree)
