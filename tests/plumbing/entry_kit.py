"""Entries made and rebuilt with plumbing alone, for plumbing tests.

A folder keeps the entry it holds in ``.vml/area.json`` as an area does;
``save`` makes an incremental entry on it (a full one the first time, a
differential one against ``base``), ``build`` writes an entry into a folder.
No porcelain is imported: the layering test keeps plumbing tests honest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vml.errors import NothingToCommit
from vml.plumbing import refs
from vml.plumbing.areas import AreaState, load_state, save_state, scan_area
from vml.plumbing.cache import Cache, CacheWriter
from vml.plumbing.chains import read_entry
from vml.plumbing.entries import EntryMeta, now_iso
from vml.plumbing.packreader import PackReader
from vml.plumbing.publish import publish_entry
from vml.plumbing.repository import Repository
from vml.plumbing.restoring import Builder, TempFiles
from vml.plumbing.saving import Baseline, Saver, SourceFile, data_estimate
from vml.progress import no_progress


@dataclass
class Saved:
    """What :func:`save` made (the fields tests look at)."""

    entry: str
    commit: str
    parent: str | None
    stored_bytes: int
    read_bytes: int
    changed_files: list[str]  # paths whose content or mode differ from the held entry


def save(
    repo: Repository,
    folder: Path,
    *,
    base: bytes | None = None,
    full: bool = False,
    tag: str | None = None,
    message: str = "",
    allow_empty: bool = False,
) -> Saved:
    """Save ``folder`` as an entry: incremental on what it holds, or on ``base``."""
    state = load_state(folder) or AreaState()
    held = bytes.fromhex(state.entry) if state.entry else None
    parent = None if full or held is None else (base or held)
    reader = PackReader(repo)
    pool = ThreadPoolExecutor(2)
    try:
        parent_entry = read_entry(reader, parent) if parent is not None else None
        held_entry = read_entry(reader, held) if held is not None else None
        cache = Cache(folder, repo.page_size, repo.block_size)
        baseline = Baseline(
            parent=parent,
            parent_files={f.path: f for f in parent_entry.meta.files} if parent_entry else {},
            held=held,
            held_files={f.path: f for f in held_entry.meta.files} if held_entry else {},
            cache=cache if cache.valid_for(state.entry) else None,
        )
        scan = scan_area(folder, lambda rel, is_dir: False)
        files = [SourceFile(f.path, folder / f.path, f.stat) for f in scan.files]
        saver = Saver(
            repo,
            reader,
            pool,
            folder,
            baseline,
            sum(f.stat.st_size for f in files),
            no_progress,
            to_read=sum(data_estimate(f.stat) for f in files),
        )
        try:
            for f in files:
                saver.save(f)
            old = (
                {(f.path, f.sha256, f.mode) for f in held_entry.meta.files} if held_entry else set()
            )
            new = {(r.path, r.sha256, r.mode) for r in saver.records}
            changed = sorted({p for p, _, _ in old ^ new})
            if held_entry is not None and not changed and not allow_empty:
                raise NothingToCommit("nothing changed")
            kind = "full" if parent is None else "incremental" if parent == held else "differential"
            meta = EntryMeta(
                kind, parent.hex() if parent else None, str(folder), state.area_id, now_iso(),
                message, saver.records, scan.empty_dirs, None, {},
            )  # fmt: skip
            root = saver.finish(meta)
            made = publish_entry(
                repo,
                reader,
                saver,
                root,
                parent=parent,
                kind=kind,
                message=message,
                area=folder,
                tag=tag,
            )
        except BaseException:
            saver.abort()
            raise
        saver.cache_writer.commit(made.commit.hex())
        state.entry = made.commit.hex()
        save_state(folder, state)
        return Saved(
            f"E{made.number}",
            made.commit.hex(),
            made.table.label(parent),
            saver.stored_bytes,
            saver.read_bytes,
            changed,
        )
    finally:
        pool.shutdown()
        reader.close()


def build(repo: Repository, name: str, folder: Path) -> None:
    """Write entry ``name`` into the empty or new ``folder``."""
    commit = refs.resolve_name(repo, name)
    folder.mkdir(parents=True, exist_ok=True)
    reader = PackReader(repo)
    pool = ThreadPoolExecutor(2)
    try:
        entry = read_entry(reader, commit)
        cache = Cache(folder, repo.page_size, repo.block_size)
        cwriter = CacheWriter(folder, repo.page_size, repo.block_size)
        temps = TempFiles(folder)
        builder = Builder(reader, pool, folder, entry, None, cache, cwriter, no_progress, temps)
        try:
            for rec in entry.meta.files:
                builder.build(rec)
            builder.make_dirs(entry.meta.dirs)
            builder.finish_folders()
        except BaseException:
            builder.finisher.abandon()
            cwriter.abort()
            raise
        finally:
            temps.clear()
        cwriter.abort()  # a plain folder: no cache kept
    finally:
        pool.shutdown()
        reader.close()
