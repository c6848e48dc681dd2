"""``vml commit``: save the area's VM as a new entry."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.objects import Blob

from vml.errors import (
    AreaError,
    CorruptRepository,
    FileChanged,
    NothingToCommit,
    RepositoryBusy,
    UsageError,
    VMLError,
)
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import (
    AreaFile,
    AreaState,
    load_state,
    lock_area,
    save_state,
    scan_area,
    stat_signature,
)
from vml.plumbing.cache import BlockRecords, Cache, CachedFile, CacheWriter, records_path
from vml.plumbing.chains import ResolvedImage, resolve_image
from vml.plumbing.entries import (
    FILES_NAME,
    IMAGES_NAME,
    META_NAME,
    Entry,
    EntryMeta,
    FileRecord,
    git_mode,
    make_commit,
    now_iso,
    store_trees,
)
from vml.plumbing.images import SaveInputs, image_tree, save_image
from vml.plumbing.manifests import BLOB_MODE, TREE_MODE, Manifest
from vml.plumbing.packs import PackReader, PackWriter, write_loose
from vml.plumbing.repack import RepackResult, auto_consolidate
from vml.plumbing.repository import Repository
from vml.plumbing.vm.ignore import IgnoreRules
from vml.plumbing.vm.inspect import check_saveable
from vml.porcelain.common import (
    ProgressFn,
    check_area_path,
    label,
    make_pool,
    no_progress,
    read_entry,
)
from vml.porcelain.vminfo import (
    ExternalFile,
    entry_vm,
    external_sources,
    plan_externals,
    saved_externals,
)


@dataclass
class CommitResult:
    """What ``vml commit`` made."""

    entry: str
    commit: str
    kind: str
    parent: str | None
    read_bytes: int
    stored_bytes: int
    logical_bytes: int
    seconds: float
    changed_files: list[str]
    tag: str | None
    branch: str | None
    crash_consistent: bool = False  # saved running, with --force-running
    external: list[ExternalFile] = field(default_factory=list)  # saved from outside the area
    repacked: RepackResult | None = None  # small packs rolled up after the save
    repack_problem: str | None = None  # why that failed (the entry is saved all the same)


def _chain_root(reader: PackReader, commit: bytes) -> bytes:
    """The full entry at the root of ``commit``'s dependency chain."""
    seen = 0
    while True:
        e = read_entry(reader, commit)
        if e.parent is None:
            return commit
        commit = e.parent
        seen += 1
        if seen > 1 << 20:
            raise CorruptRepository("entry chain has no root (a cycle?)")


def _read_small(path: Path) -> tuple[bytes, os.stat_result]:
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    if stat_signature(before) != stat_signature(after) or len(data) != before.st_size:
        raise FileChanged(f"{path.name} changed while it was read")
    return data, after


def commit(
    repo: Repository,
    area: Path,
    *,
    message: str = "",
    kind: str | None = None,
    base: str | None = None,
    tag: str | None = None,
    allow_empty: bool = False,
    force_running: bool = False,
    include_external: bool = False,
    progress: ProgressFn = no_progress,
) -> CommitResult:
    """Save ``area`` as a new entry of ``repo``.

    ``kind`` is "full", "incremental" (the default) or "differential"
    (against ``base``, by default the full entry at the root of the area's
    chain).  An area's first save is always full.
    """
    t0 = time.monotonic()
    if not area.is_dir():
        raise AreaError(
            f"no working area at {area}", "check the path, or `vml checkout` into it first"
        )
    check_area_path(repo, area)
    # One command at a time may change an area (a checkout must not rewrite
    # files a commit is reading); held to the end, so the area state is ours.
    with lock_area(area):
        if kind not in (None, "full", "incremental", "differential"):
            raise UsageError(
                f"unknown entry kind {kind!r}", "use --full, --incremental or --differential"
            )
        if base is not None and kind not in (None, "differential"):
            raise UsageError("--base goes with --differential", "add --differential or drop --base")
        if base is not None:
            kind = "differential"
        table = refs_mod.read_refs(repo)
        if tag is not None:
            refs_mod.check_name("tag", tag)
            if tag in table.tags:
                raise UsageError(f"tag {tag!r} exists already", "choose another name")
        state = load_state(area) or AreaState()
        if state.pending:
            raise AreaError(
                f"a checkout of {state.pending[:12]} into {area} was interrupted",
                f"run `vml checkout {state.pending[:12]} {area}` to finish it first",
            )
        vm = check_saveable(area, force_running=force_running, include_external=include_external)
        # Everything the VM needs outside the area, found (or refused) before
        # anything is written: an entry missing one could not be rebuilt.
        sources = external_sources(area, vm) if include_external else []
        reader = PackReader(repo)
        try:
            known_commits = set(table.entries.values())
            area_commit = bytes.fromhex(state.entry) if state.entry else None
            if area_commit is not None and area_commit not in known_commits:
                area_commit = None  # the area was built from another repository
            if area_commit is None:
                if base is not None:
                    raise UsageError(
                        "the area has no entry yet, so its first save is full", "drop --base"
                    )
                kind = "full"
            kind = kind or "incremental"
            parent: bytes | None
            if kind == "full":
                parent = None
            elif kind == "incremental":
                parent = area_commit
            else:
                parent = (
                    refs_mod.resolve_name(repo, base, table)
                    if base is not None
                    else _chain_root(reader, area_commit)  # type: ignore[arg-type]
                )
            parent_entry = read_entry(reader, parent) if parent is not None else None
            # Usually the same entry (an incremental save): read it once.
            area_entry = (
                parent_entry
                if area_commit == parent
                else read_entry(reader, area_commit)
                if area_commit is not None
                else None
            )
            parent_files = {f.path: f for f in parent_entry.meta.files} if parent_entry else {}
            area_files = {f.path: f for f in area_entry.meta.files} if area_entry else {}

            rules = IgnoreRules.load(area)
            files, dirs = scan_area(area, rules.is_ignored)
            externals, files = _add_externals(sources, files, parent_entry, area_entry)
            from_outside = {e.path: Path(e.source) for e in externals}
            total = sum(f.stat.st_size for f in files)
            cache = Cache(area, repo.page_size, repo.block_size)
            cache_ok = cache.valid_for(state.entry) and area_commit is not None
            writer = PackWriter(repo)
            reused: set[bytes] = set()
            cwriter = CacheWriter(area, repo.page_size, repo.block_size)
            done = 0
            read_bytes = 0
            records: list[FileRecord] = []
            small_items: dict[str, tuple[int, bytes]] = {}
            image_items: dict[str, tuple[int, bytes]] = {}
            pool = make_pool()
            try:
                for af in files:
                    full_path = from_outside.get(af.path, area / af.path)
                    st = af.stat
                    mode = git_mode(st.st_mode)
                    if st.st_size <= repo.block_size:
                        data, st = _read_small(full_path)
                        sha = hashlib.sha256(data).hexdigest()
                        small_items[af.path] = (mode, writer.add_blob(data))
                        records.append(
                            FileRecord(af.path, "small", mode, st.st_mtime_ns, st.st_size, sha)
                        )
                        cwriter.add(
                            af.path, CachedFile("small", st.st_size, sha, stat_signature(st))
                        )
                        read_bytes += st.st_size
                        done += st.st_size
                        progress("read", done, total)
                        continue
                    pf = parent_files.get(af.path)
                    parent_img: ResolvedImage | None = None
                    if parent is not None and pf is not None and pf.kind == "image":
                        parent_img = resolve_image(reader, parent, af.path)
                    cached = cache.files.get(af.path) if cache_ok else None
                    recs = cache.records(af.path) if cached is not None else None
                    try:
                        if (
                            parent is not None
                            and parent == area_commit
                            and parent_img is not None
                            and cached is not None
                            and recs is not None
                            and cached.kind == "image"
                            and cached.stat == stat_signature(st)
                            and parent_img.manifest.size == st.st_size
                            # An empty layer inherits every block: only over
                            # a parent cut the same way (a mirror without
                            # vml.blockSize saves in the default size).
                            and parent_img.manifest.block_size == repo.block_size
                            and parent_img.manifest.page_size == repo.page_size
                        ):
                            # Unchanged since the entry it extends: a manifest and nothing else.
                            man = Manifest(
                                st.st_size,
                                cached.sha256,
                                repo.block_size,
                                repo.page_size,
                                base=False,
                            )
                            tree = image_tree(writer, man, {}, _checks_of(parent_img, recs))
                            name = cwriter.reuse_records(records_path(area, cached.pages or ""))
                            sha256 = cached.sha256
                            done += st.st_size
                            progress("read", done, total)
                        else:
                            area_img: ResolvedImage | None = None
                            if (
                                recs is not None
                                and area_commit != parent
                                and parent_img is not None
                            ):
                                af_old = area_files.get(af.path)
                                if af_old is not None and af_old.kind == "image":
                                    area_img = resolve_image(reader, area_commit, af.path)  # type: ignore[arg-type]

                            def match(
                                n: int,
                                p: ResolvedImage | None = parent_img,
                                a: ResolvedImage | None = area_img,
                            ) -> bool:
                                if p is None:
                                    return False
                                if a is None:
                                    return parent == area_commit
                                ln = p.manifest.block_length(n)
                                return a.recipe(n, ln) == p.recipes[n]

                            name, out = cwriter.new_records()

                            def tick(n: int) -> None:
                                nonlocal done
                                done += n
                                progress("read", done, total)

                            try:
                                tree, man, nread, _ = save_image(
                                    reader,
                                    writer,
                                    pool,
                                    full_path,
                                    st.st_size,
                                    repo.block_size,
                                    repo.page_size,
                                    SaveInputs(parent_img, recs, match, reused),
                                    out,  # type: ignore[arg-type]
                                    tick,
                                )
                            finally:
                                out.close()  # type: ignore[attr-defined]
                            read_bytes += nread
                            sha256 = man.sha256
                            # The folder was listed before the file was opened: a change
                            # in between must not be saved under the listed size and time.
                            if stat_signature(os.stat(full_path)) != stat_signature(st):
                                raise FileChanged(f"{af.path} changed while it was read")
                    finally:
                        if recs is not None:
                            recs.close()  # also when a step above fails
                    image_items[af.path] = (TREE_MODE, bytes.fromhex(tree.id.decode()))
                    records.append(
                        FileRecord(af.path, "image", mode, st.st_mtime_ns, st.st_size, sha256)
                    )
                    cwriter.add(
                        af.path, CachedFile("image", st.st_size, sha256, stat_signature(st), name)
                    )
            except BaseException:
                writer.abort()
                cwriter.abort()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

            finished = False
            try:
                changed = _changed_files(records, area_files, dirs, area_entry)
                if area_entry is not None and not changed and not allow_empty:
                    raise NothingToCommit(  # the handler below drops the pack and cache
                        f"nothing changed in {area} since {label(table, area_commit)}"
                    )

                meta = EntryMeta(
                    kind=kind,
                    parent=parent.hex() if parent else None,
                    area=str(area.resolve()),
                    area_id=state.area_id,
                    created=now_iso(),
                    message=message,
                    files=records,
                    dirs=dirs,
                    vm=entry_vm(vm, externals),
                    stats={
                        "read_bytes": read_bytes,
                        "stored_bytes": 0,
                        "logical_bytes": total,
                    },
                )
                # stored bytes of the data objects; metadata and trees are tiny
                meta.stats["stored_bytes"] = writer.stored_bytes
                meta_blob = Blob.from_string(meta.encode())
                writer.add_object(meta_blob)
                root_items: dict[str, tuple[int, bytes]] = {
                    META_NAME.decode(): (BLOB_MODE, bytes.fromhex(meta_blob.id.decode()))
                }
                for prefix, items in ((FILES_NAME, small_items), (IMAGES_NAME, image_items)):
                    if items:
                        root_items[prefix.decode()] = (
                            TREE_MODE,
                            store_trees(writer.add_object, items),
                        )
                root = store_trees(writer.add_object, root_items)
                stored = writer.stored_bytes
                writer.finish()
                finished = True
                try:
                    with repo.lock():
                        # A gc that ran while we saved may have dropped objects nothing
                        # referenced yet, among them blocks this entry reuses: check.
                        reader.refresh()
                        missing = [sha for sha in reused if not reader.contains(sha)]
                        if missing:
                            raise RepositoryBusy(
                                f"`vml gc` removed {len(missing)} blocks this save reuses while it ran",
                                "run the same `vml commit` again",
                            )
                        table = refs_mod.read_refs(repo)
                        if tag is not None and tag in table.tags:
                            raise UsageError(
                                f"tag {tag!r} was made while saving", "choose another name"
                            )
                        n = refs_mod.next_number(table)
                        trailers = [
                            ("VML-Entry", f"E{n}"),
                            ("VML-Kind", kind),
                            ("VML-Parent", label(table, parent) or "none"),
                            ("VML-Area", str(area.resolve())),
                        ]
                        c = make_commit(root, parent, message, trailers)
                        cid = write_loose(repo, c)
                        refs_mod.set_ref(repo, refs_mod.entry_ref(n), cid, create=True)
                        if tag is not None:
                            refs_mod.set_ref(
                                repo, refs_mod.TAG_PREFIX + tag.encode(), cid, create=True
                            )
                        branch = state.branch
                        old = table.branches.get(branch) if branch is not None else None
                        if branch is not None and old is None:
                            # Deleted since the area started following it: do not bring it back.
                            state.branch = None
                        elif branch is not None:
                            refs_mod.set_ref(
                                repo, refs_mod.BRANCH_PREFIX + branch.encode(), cid, old
                            )
                finally:
                    writer.release()  # refs reach the pack now (or it is garbage)
            except BaseException:
                # Nothing of this save may stay behind: its cache and, before
                # the pack was sealed, the pack itself.
                cwriter.abort()
                if not finished:
                    writer.abort()
                raise
            cwriter.commit(cid.hex())
            state.entry = cid.hex()
            state.repository = str(repo.path.resolve())
            save_state(area, state)
            repo.register_area(area)
            # The entry is saved: keeping the pack count low must not fail it.
            repacked: RepackResult | None = None
            problem: str | None = None
            try:
                repacked = auto_consolidate(repo, lambda d, t: progress("pack", d, t))
            except VMLError as e:
                problem = e.message
            except OSError as e:
                problem = f"packs were not consolidated: {e.strerror or e}"
            return CommitResult(
                entry=f"E{n}",
                commit=cid.hex(),
                kind=kind,
                parent=label(table, parent),
                read_bytes=read_bytes,
                stored_bytes=stored,
                logical_bytes=total,
                seconds=time.monotonic() - t0,
                changed_files=changed,
                tag=tag,
                branch=state.branch,
                crash_consistent=vm.power_state == "running",
                external=externals,
                repacked=repacked,
                repack_problem=problem,
            )
        finally:
            reader.close()


def _add_externals(
    sources: list[str], files: list[AreaFile], parent: Entry | None, held: Entry | None
) -> tuple[list[ExternalFile], list[AreaFile]]:
    """Name the files saved from outside the area and add them to the area's files.

    A file a checkout restored as the copy of an external file, untouched
    since (size and mtime as recorded), gives way to that file read afresh.
    """
    if not sources:
        return [], files
    previous = saved_externals(parent.meta.vm if parent else None)
    restored: set[str] = set()
    if held is not None:
        records = {f.path: f for f in held.meta.files}
        previous += saved_externals(held.meta.vm)
        for af in files:
            rec = records.get(af.path)
            if (
                rec is not None
                and any(e.path == af.path for e in saved_externals(held.meta.vm))
                and rec.size == af.stat.st_size
                and rec.mtime_ns == af.stat.st_mtime_ns
            ):
                restored.add(af.path)
    plan, replaced = plan_externals(sources, [f.path for f in files], previous, restored)
    kept = [f for f in files if f.path not in replaced]
    kept += [AreaFile(e.path, os.stat(e.source)) for e in plan]
    kept.sort(key=lambda f: f.path)
    return plan, kept


def _changed_files(
    records: list[FileRecord],
    old: dict[str, FileRecord],
    dirs: list[str],
    old_entry: Entry | None,
) -> list[str]:
    """Files that differ from the area's entry (content, mode or presence)."""
    out = []
    new = {r.path: r for r in records}
    for p, r in new.items():
        o = old.get(p)
        if o is None or o.sha256 != r.sha256 or o.mode != r.mode or o.size != r.size:
            out.append(p)
    out += [p for p in old if p not in new]
    old_dirs = old_entry.meta.dirs if old_entry is not None else []
    if sorted(dirs) != sorted(old_dirs):
        out += sorted(set(dirs) ^ set(old_dirs))
    return sorted(out)


def _checks_of(image: ResolvedImage, recs: BlockRecords) -> bytes | None:
    """The checks of an unchanged image: its parent's, or from the area cache.

    The cache describes the file exactly as the parent entry has it; a parent
    saved before checks existed gets them here, so its descendants have them.
    """
    if image.checks is not None:
        return image.checks
    parts = []
    for n in range(image.manifest.nblocks):
        dg, h = recs.block_digest(n), recs.block_hash(n)
        if dg is None or h is None:
            return None
        parts.append(bytes(dg) + bytes(h))
    return b"".join(parts)
