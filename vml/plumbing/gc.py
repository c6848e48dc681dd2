"""Reclaiming the objects no ref reaches, streaming and in bounded memory.

Marking walks commits and trees from every ref and from the commit each
known area names (blobs are only named, never read).  Each pack that existed when gc started is then:

- kept as it is when every object in it is live;
- deleted when none is;
- otherwise rewritten: its live objects are copied, still compressed and
  checked against the index's CRC-32, one at a time, into one new pack
  (:class:`~vml.plumbing.packwriter.PackWriter`, durable before anything is
  deleted), and the old pack deleted.

dulwich's ``repack`` holds every object in memory; this holds one object and
the set of live ids (20 bytes each, plus set overhead).

Concurrency: packs and loose objects that appeared after gc started are
never touched.  The decision is taken under the repository lock: refs are
read again and anything they now reach that was about to go is copied too.
A save still writing its pack (a ``tmp_vml_<pid>_*`` file of a live
process) may have skipped storing a block it found in an old pack, so while
one exists nothing is deleted (the new pack only duplicates objects; run gc
again later).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.objects import Commit, Tag

from vml.errors import CorruptRepository
from vml.plumbing import refs as refs_mod
from vml.plumbing.keeps import (
    SPOOL_PREFIX,
    keep_protects,
    pack_dir_lock,
    pid_alive,
    protects_locked,
    remove_packs,
    unlink_counted,
)
from vml.plumbing.manifests import TREE_MODE, parse_tree
from vml.plumbing.packreader import COMMIT, TREE, PackReader, pack_extents
from vml.plumbing.packscan import PackRepair, scan_pack
from vml.plumbing.packwriter import PackWriter, copy_object, deflate
from vml.plumbing.repack import RepackResult
from vml.plumbing.repository import Repository, fsync_dir
from vml.progress import ProgressFn, no_progress
from vml.records import Record

TAG = 4
GITLINK_MODE = 0o160000
_TMP_PACK = re.compile(r"^tmp_vml_(\d+)_")
_LOOSE_DIR = re.compile(r"^[0-9a-f]{2}$")
_LOOSE_NAME = re.compile(r"^[0-9a-f]{38}$")


def ref_roots(repo: Repository) -> list[bytes]:
    """Every object any ref (entries, tags, branches, remotes, ...) points at."""
    return [bytes.fromhex(v.decode()) for _name, v in refs_mod.all_refs(repo) if len(v) == 40]


def area_roots(repo: Repository) -> list[bytes]:
    """The commits this repository's known areas name (entry, interrupted checkout, branch).

    Always entries, but for an area a damaged or older repository left on a
    commit that is no entry: its next save is built on it, so its objects
    stay until the area moves on.
    """
    from vml.plumbing.forest import repository_areas

    out: list[bytes] = []
    for a in repository_areas(repo):
        for value in (a.state.entry, a.state.pending, a.state.branch_at):
            if value:
                out.append(bytes.fromhex(value))
    return out


def mark_areas(reader: PackReader, roots: Iterable[bytes], live: set[bytes]) -> list[bytes]:
    """:func:`mark` for areas' commits: one that cannot be read whole keeps what it could.

    An area on a missing commit protects nothing and must not stop gc.
    """
    added: list[bytes] = []
    for r in roots:
        try:
            added += mark(reader, [r], live)
        except CorruptRepository:
            continue
    return added


def mark(reader: PackReader, roots: Iterable[bytes], live: set[bytes]) -> list[bytes]:
    """Add everything reachable from ``roots`` to ``live``; returns the ids added.

    Commits, tags and trees are read (and their ids checked); blobs never are.
    """
    added: list[bytes] = []
    stack: list[tuple[bytes, int | None]] = [(r, None) for r in roots]
    while stack:
        sha, kind = stack.pop()
        if sha in live:
            continue
        if kind == 3:
            live.add(sha)
            added.append(sha)
            continue
        type_num, data = reader.read(sha)
        live.add(sha)
        added.append(sha)
        if type_num == COMMIT:
            c = Commit.from_raw_string(COMMIT, data)
            assert isinstance(c, Commit)
            stack.append((bytes.fromhex(c.tree.decode()), TREE))
            stack.extend((bytes.fromhex(p.decode()), COMMIT) for p in c.parents)
        elif type_num == TREE:
            for _name, mode, child in parse_tree(data):
                if mode == GITLINK_MODE:
                    continue
                stack.append((child, TREE if mode == TREE_MODE else 3))
        elif type_num == TAG:
            t = Tag.from_raw_string(TAG, data)
            assert isinstance(t, Tag)
            stack.append((bytes.fromhex(t.object[1].decode()), None))
    return added


@dataclass
class PackInfo(Record):
    """One pack as gc sees it."""

    name: str
    objects: int = 0
    live: int = 0
    live_bytes: int = 0  # compressed bytes of its live objects
    size: int = 0  # .pack + .idx on disk
    keep: bool = False  # a .keep file protects it

    json_extra = ("action",)

    @property
    def action(self) -> str:
        """ "keep", "delete" or "rewrite"."""
        if self.keep or self.live == self.objects:
            return "keep"
        return "delete" if self.live == 0 else "rewrite"


@dataclass
class GcResult(Record):
    """What gc found and did."""

    live_objects: int = 0
    dead_objects: int = 0
    packs: list[PackInfo] = field(default_factory=list)
    loose_dead: int = 0
    loose_dead_bytes: int = 0
    written_bytes: int = 0  # new pack(s) + index(es)
    deleted_bytes: int = 0  # old packs, indexes, loose objects, stale temporaries
    deferred: bool = False  # a save was in progress: nothing was deleted
    dry_run: bool = False
    new_packs: list[str] = field(default_factory=list)
    repacked: RepackResult | None = None  # small packs rolled up afterwards
    repaired: list[PackRepair] | None = None  # with --repair: what became of each bad pack
    numbered: list[str] = field(default_factory=list)  # with --repair: entries given a number

    json_names = (("repacked", "consolidated"),)
    json_extra = ("freed_bytes",)

    @property
    def freed_bytes(self) -> int:
        """Net bytes given back to the file system (estimated for a dry run)."""
        return self.deleted_bytes - self.written_bytes


def _pack_dir(repo: Repository) -> Path:
    return repo.objects_dir / "pack"


def _loose_objects(repo: Repository) -> dict[bytes, Path]:
    out: dict[bytes, Path] = {}
    for d in repo.objects_dir.iterdir():
        if not d.is_dir() or not _LOOSE_DIR.match(d.name):
            continue
        for f in d.iterdir():
            if _LOOSE_NAME.match(f.name):
                out[bytes.fromhex(d.name + f.name)] = f
    return out


def _temporaries(repo: Repository) -> tuple[list[Path], list[Path]]:
    """(temporary packs of live vml processes, stale ones of dead processes)."""
    live: list[Path] = []
    stale: list[Path] = []
    d = _pack_dir(repo)
    if not d.is_dir():
        return live, stale
    for f in d.iterdir():
        m = _TMP_PACK.match(f.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        (live if pid_alive(pid) else stale).append(f)
    return live, stale


SPOOL_AGE = 600.0  # seconds a fetch's spool must be left unwritten before gc may judge it


def dead_spools(objects_dir: Path) -> list[Path]:
    """The ``objects/tmp_pack_*`` files fetches killed while indexing their pack left.

    dulwich writes a pack it receives there, holding it open until it is
    renamed into ``objects/pack`` (but for the instant between closing and
    renaming it, which the age covers): one no process holds open and no one
    wrote for :data:`SPOOL_AGE` is a dead fetch's.  Where the processes that
    could hold it cannot be seen (another user's), it stays.
    """
    now = time.time()
    old: dict[tuple[int, int], Path] = {}
    for p in objects_dir.glob(SPOOL_PREFIX + "*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > SPOOL_AGE:
            old[(st.st_dev, st.st_ino)] = p
    if not old:
        return []
    owners = {p.stat().st_uid for p in old.values() if p.exists()}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = Path("/proc", pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # gone meanwhile
        except PermissionError:
            try:
                if os.stat(fd_dir.parent).st_uid in owners:
                    return []  # a writer we cannot see into
            except OSError:
                pass
            continue
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)
            except OSError:
                continue
            old.pop((st.st_dev, st.st_ino), None)
    return sorted(old.values())


def _orphan_packs(repo: Repository) -> list[Path]:
    """Pack files without their index that nothing protects.

    A pack is invisible without its index.  A writer renames its pack into
    place just before the index, under a ``.keep`` of its live process; a
    consolidation or gc killed while deleting a pack's index and pack
    leaves such a file for good.  (Whether one may go is decided by
    :func:`_redundant`: an index can also be lost to damage.)
    """
    d = _pack_dir(repo)
    if not d.is_dir():
        return []
    for keep in d.glob("pack-*.keep"):
        # A writer killed between its marker and its pack leaves the marker
        # alone: _kept drops it when its process is gone.
        if not keep.with_suffix(".pack").exists() and not keep.with_suffix(".idx").exists():
            keep_protects(keep)
    return [
        p
        for p in d.glob("pack-*.pack")
        if not p.with_suffix(".idx").exists() and not keep_protects(p.with_suffix(".keep"))
    ]


@dataclass
class _Survey:
    """What gc found in the packs, given the live objects."""

    extents: dict[str, list[tuple[bytes, int, int, int | None]]]  # packs to rewrite
    kept_ids: set[bytes]  # objects of packs that stay as they are
    ids_of: dict[str, list[bytes]]  # objects of packs that go whole
    going: list[PackInfo]


def _refuse_set_aside(repo: Repository) -> None:
    set_aside = repo.packs.set_aside()
    if set_aside:
        # Objects only a set-aside pack holds would look unreachable, and
        # so would everything only they reach.
        name, why = next(iter(set_aside.items()))
        raise CorruptRepository(
            f"pack {name} is set aside ({why}); gc deletes nothing while a pack is set aside",
            "run `vml gc --repair` to rebuild or salvage it, then `vml gc`",
        )


def _mark_all(reader: PackReader, roots: list[bytes], orphans: list[Path]) -> set[bytes]:
    """Every object the refs reach; refuses when one of them cannot be read."""
    live: set[bytes] = set()
    try:
        mark(reader, roots, live)
    except CorruptRepository as err:
        # What the unreadable commit or tree names cannot be seen, so it
        # would look unreachable.
        if orphans:
            raise CorruptRepository(
                f"{err.message}; pack {orphans[0].name} has no index and may hold it; "
                "gc deletes nothing",
                "run `vml gc --repair` to index or salvage that pack, then `vml gc`",
            ) from None
        raise CorruptRepository(
            f"{err.message}; gc deletes nothing while something refs reach is unreadable",
            "run `vml fsck` to see which entries are damaged; `vml rm --force` them "
            "or bring the objects back, then `vml gc`",
        ) from None
    return live


def _survey(
    pack_dir: Path, pack_names: list[str], live: set[bytes], dry_run: bool, result: GcResult
) -> _Survey:
    """Each pack's live share and fate: kept, rewritten, or deleted whole."""
    extents: dict[str, list[tuple[bytes, int, int, int | None]]] = {}
    # Read once here, not again later: the ids of packs that stay (no copy
    # needed) and of packs that go whole (a rescue may need them).
    kept_ids: set[bytes] = set()
    ids_of: dict[str, list[bytes]] = {}
    for name in pack_names:
        pack = pack_dir / f"{name}.pack"
        idx = pack_dir / f"{name}.idx"
        psize = pack.stat().st_size
        ext = pack_extents(idx, psize)
        info = PackInfo(name, objects=len(ext), size=psize + idx.stat().st_size)
        info.keep = keep_protects(pack_dir / f"{name}.keep")
        for sha, _off, length, _crc in ext:
            if sha in live:
                info.live += 1
                info.live_bytes += length
        result.packs.append(info)
        if info.action == "rewrite":
            extents[name] = ext
        elif not dry_run and info.action == "keep":
            kept_ids.update(sha for sha, *_ in ext)
        elif not dry_run:
            ids_of[name] = [sha for sha, *_ in ext]
    going = [p for p in result.packs if p.action != "keep"]
    return _Survey(extents, kept_ids, ids_of, going)


def _copy_live(
    repo: Repository,
    reader: PackReader,
    pack_dir: Path,
    survey: _Survey,
    live: set[bytes],
    result: GcResult,
    progress: ProgressFn,
) -> None:
    """Copy the live objects of the packs to rewrite into one new pack, still compressed."""
    writer = PackWriter(repo)
    try:
        total = sum(len(e) for e in survey.extents.values())
        done = 0
        for name, ext in survey.extents.items():
            fd = os.open(pack_dir / f"{name}.pack", os.O_RDONLY)
            try:
                for sha, off, length, crc in ext:
                    done += 1
                    progress("copy", done, total)
                    if sha not in live or sha in survey.kept_ids or sha in writer:
                        continue
                    copy_object(reader, writer, fd, sha, off, length, crc)
            finally:
                os.close(fd)
        result.written_bytes += _finish(writer, result)
    except BaseException:
        writer.abort()
        raise


def _rescue(
    repo: Repository,
    reader: PackReader,
    survey: _Survey,
    live: set[bytes],
    loose: dict[bytes, Path],
    dead_loose: dict[bytes, Path],
    result: GcResult,
) -> None:
    """Under the lock: keep what refs moved onto while we copied (a save finished meanwhile)."""
    reader.refresh()
    added = mark(reader, ref_roots(repo), live)
    added += mark_areas(reader, area_roots(repo), live)
    rescue = [s for s in added if not _safe_elsewhere(s, survey.kept_ids, loose, dead_loose)]
    doomed_ids: set[bytes] = set()
    for name in survey.extents:
        doomed_ids.update(s for s, *_ in survey.extents[name])
    for p in survey.going:
        if p.name not in survey.extents:
            doomed_ids.update(survey.ids_of[p.name])
    rescue = [s for s in rescue if s in doomed_ids or s in dead_loose]
    if not rescue:
        return
    writer = PackWriter(repo)
    try:
        for sha in rescue:
            type_num, data = reader.read(sha)
            writer.add_compressed(type_num, sha, len(data), deflate(data))
        result.written_bytes += _finish(writer, result)
    except BaseException:
        writer.abort()
        raise
    for sha in rescue:
        dead_loose.pop(sha, None)


def collect(
    repo: Repository,
    *,
    dry_run: bool = False,
    progress: ProgressFn = no_progress,
) -> GcResult:
    """Reclaim every object no ref reaches (see the module docstring)."""
    result = GcResult(dry_run=dry_run)
    pack_dir = _pack_dir(repo)
    # What exists now is all gc may ever delete.
    pack_names = (
        sorted(p.stem for p in pack_dir.glob("pack-*.idx") if p.with_suffix(".pack").exists())
        if pack_dir.is_dir()
        else []
    )
    _refuse_set_aside(repo)
    loose = _loose_objects(repo)
    _busy, stale_tmp = _temporaries(repo)
    orphans = _orphan_packs(repo)
    # Refs first, then the pack list: objects are on disk before any ref
    # points at them, so every object the roots reach is in a pack seen now.
    roots = ref_roots(repo)
    held = area_roots(repo)
    reader = PackReader(repo)
    try:
        progress("mark", 0, 0)
        live = _mark_all(reader, roots, orphans)
        mark_areas(reader, held, live)
        result.live_objects = len(live)
        stale_tmp += [p for p in orphans if _redundant(reader, p, live)]
        survey = _survey(pack_dir, pack_names, live, dry_run, result)
        dead_loose = {sha: p for sha, p in loose.items() if sha not in live}
        result.loose_dead = len(dead_loose)
        result.loose_dead_bytes = sum(p.stat().st_size for p in dead_loose.values())
        result.dead_objects = sum(p.objects - p.live for p in result.packs if not p.keep) + len(
            dead_loose
        )
        if dry_run:
            result.deleted_bytes = (
                sum(p.size for p in survey.going)
                + result.loose_dead_bytes
                + sum(f.stat().st_size for f in stale_tmp)
                + sum(f.stat().st_size for f in dead_spools(repo.objects_dir))
            )
            # The rewritten packs' live objects go into a new pack (headers aside).
            result.written_bytes = sum(p.live_bytes for p in survey.going)
            return result
        # Objects that stay where they are need no copy.
        _copy_live(repo, reader, pack_dir, survey, live, result, progress)
        with repo.lock(what="repository (gc)"):
            # Refs may have moved while we copied: whatever they reach now stays.
            _rescue(repo, reader, survey, live, loose, dead_loose, result)
            busy, _stale = _temporaries(repo)
            if busy:
                result.deferred = True
                return result
            # Never a pack gc just wrote (a pack's name is its content's hash:
            # what the rescue copies can be a pack that was going, byte for
            # byte), nor one a writer claimed since (remove_packs).
            going = [p.name for p in survey.going if p.name not in result.new_packs]
            if pack_dir.is_dir():
                result.deleted_bytes += remove_packs(pack_dir, going)
                result.deleted_bytes += _remove_leftovers(pack_dir, stale_tmp)
            for f in dead_spools(repo.objects_dir):
                result.deleted_bytes += unlink_counted(f)
            for f in dead_loose.values():
                result.deleted_bytes += unlink_counted(f)
            if pack_dir.is_dir():
                fsync_dir(pack_dir)
            # Let dulwich's store drop the deleted packs (the reader closes below).
            repo.reopen_store()
        return result
    finally:
        reader.close()


def _remove_leftovers(pack_dir: Path, leftovers: list[Path]) -> int:
    """Delete dead writers' temporaries and redundant indexless packs, unless taken since.

    Under the packs' lock: a pack a writer published meanwhile (its
    index is back, or it is claimed) and a temporary of a live process (a
    pid reused) stay.
    """
    freed = 0
    with pack_dir_lock(pack_dir):
        for f in leftovers:
            m = _TMP_PACK.match(f.name)
            if m is not None and pid_alive(int(m.group(1))):
                continue
            if m is None and (
                f.with_suffix(".idx").exists() or protects_locked(f.with_suffix(".keep"))
            ):
                continue
            freed += unlink_counted(f)
    return freed


def _redundant(reader: PackReader, pack: Path, live: set[bytes]) -> bool:
    """May a pack without an index go?  Only when no live object exists only there.

    Read from its start (its ids are unknown without the index): a pack
    left by a consolidation or gc killed between deleting an index and its
    pack holds copies of objects that are elsewhere; one whose index was
    lost to damage may hold the only copy, and is refused.
    """
    scan = scan_pack(pack)
    if not scan.whole:
        unread = f"it could not be read whole: {scan.stopped}"
    else:
        needed = [o.sha for o in scan.objects if o.sha in live and not reader.contains(o.sha)]
        if not needed:
            return True
        unread = f"it holds {len(needed)} objects entries need and no other copy"
    raise CorruptRepository(
        f"pack {pack.name} has no index and {unread}; gc deletes nothing",
        "run `vml gc --repair` to index or salvage it, then `vml gc`",
    )


def _safe_elsewhere(
    sha: bytes, kept_ids: set[bytes], loose: dict[bytes, Path], dead_loose: dict[bytes, Path]
) -> bool:
    return sha in kept_ids or (sha in loose and sha not in dead_loose)


def _finish(writer: PackWriter, result: GcResult) -> int:
    writer.finish()
    writer.release()  # it holds live objects only: refs already reach them
    result.new_packs.extend(writer.names)
    return writer.disk_bytes
