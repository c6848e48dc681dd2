"""Reading packs without trusting their index: fsck's pass over every byte, and repair.

:func:`check_pack_objects` (``vml fsck``) reads every object of every usable
pack once and compares it with the CRC-32 its index recorded when it was
written (isal computes it at memory speed), and inflates commits, trees and
tags and checks their ids: a flipped byte anywhere is found without
rebuilding a single image.

:func:`repair` (``vml gc --repair``) deals with the packs set aside
(packindex.py) and with packs that lost their index.  It reads the pack
from its start, object by object, as ``git index-pack`` does: each object's
id is computed from its inflated bytes streamed through SHA-1 (whole
objects are never held; a delta git made is resolved from its base, one
chain at a time, with a bounded cache), so memory stays flat whatever the
pack's size.  A whole pack (every object reads, its SHA-1 trailer matches)
gets a new index; otherwise every object that still reads is copied into a
new pack and the damaged files move to ``<repo>/vml/quarantine/``, where
nothing deletes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.pack import apply_delta, write_pack_index_v2
from isal import isal_zlib

from vml.errors import CorruptRepository
from vml.plumbing.keeps import claimed_locked, keep_protects, pack_dir_lock
from vml.plumbing.packindex import IDX_MAGIC, index_problem
from vml.plumbing.packreader import TYPE_NAMES, PackReader, pack_extents, parse_object_header
from vml.plumbing.packwriter import PackWriter, deflate
from vml.plumbing.repository import Repository, fsync_dir
from vml.progress import ProgressFn, no_progress
from vml.records import Record

OFS_DELTA = 6
REF_DELTA = 7
_CHUNK = 1 << 20
_BASE_CACHE = 32 << 20  # bytes of resolved delta bases kept while resolving
QUARANTINE = "quarantine"

# -- fsck: every object against its index's CRC-32 -----------------------------


@dataclass
class PackDamage:
    """An object whose bytes in a pack no longer match its index."""

    pack: str
    sha: bytes
    message: str
    elsewhere: bool  # another copy reads intact


def check_pack_objects(
    repo: Repository, reader: PackReader, tick: ProgressFn = no_progress
) -> list[PackDamage]:
    """Compare every object of every usable pack with its CRC-32; inflate metadata objects.

    Reads each pack once, in order, one object at a time.  Commits, trees
    and tags are also inflated and their ids checked (blobs are covered by
    the CRC: their ids are checked when an entry is verified or rebuilt).
    """
    pack_dir = repo.objects_dir / "pack"
    found: list[PackDamage] = []
    names = sorted(p.stem for p in pack_dir.glob("pack-*.idx")) if pack_dir.is_dir() else []
    usable = []
    for name in names:
        try:
            if repo.packs.problem(name) is None:
                usable.append(name)
        except FileNotFoundError:
            continue
    total = 0
    extents: dict[str, list[tuple[bytes, int, int, int | None]]] = {}
    for name in usable:
        try:
            size = (pack_dir / f"{name}.pack").stat().st_size
            extents[name] = pack_extents(pack_dir / f"{name}.idx", size)
        except FileNotFoundError:
            continue  # consolidated away meanwhile: its objects are in the new pack
        total += len(extents[name])
    done = 0
    for name, ext in extents.items():
        try:
            fd = os.open(pack_dir / f"{name}.pack", os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            for sha, off, length, crc in ext:
                done += 1
                tick("packs", done, total)
                why = _object_damage(fd, sha, off, length, crc)
                if why is None:
                    continue
                try:
                    reader.read(sha)
                    elsewhere = True
                except CorruptRepository:
                    elsewhere = False
                found.append(PackDamage(name, sha, why, elsewhere))
        finally:
            os.close(fd)
    return found


def _object_damage(fd: int, sha: bytes, off: int, length: int, crc: int | None) -> str | None:
    """Why the object at ``off`` does not match its index, or None."""
    head = os.pread(fd, 32, off)
    try:
        type_num, size, hlen = parse_object_header(head)
    except (CorruptRepository, IndexError):
        return "its header is damaged"
    if crc is not None:
        got = 0
        pos = off
        while pos < off + length:
            part = os.pread(fd, min(_CHUNK, off + length - pos), pos)
            if not part:
                return "the pack ends inside it"
            got = isal_zlib.crc32(part, got)
            pos += len(part)
        if got & 0xFFFFFFFF != crc:
            return "its bytes do not match the CRC-32 its index recorded"
    if type_num in (1, 2, 4) and size <= 64 << 20:
        try:
            d = isal_zlib.decompressobj()
            data = d.decompress(os.pread(fd, length - hlen, off + hlen), size + 1)
        except Exception:  # isal raises its own error type
            return "it does not inflate"
        h = hashlib.sha1(TYPE_NAMES[type_num] + b" %d\0" % len(data))
        h.update(data)
        if len(data) != size or h.digest() != sha:
            return "its content does not match its id"
    return None


# -- reading a pack from its start ------------------------------------------------


@dataclass(slots=True)
class _Obj:
    offset: int
    length: int  # header and compressed bytes
    crc: int
    type_num: int
    size: int
    base: int | bytes | None = None  # a delta's base: its offset (ofs) or id (ref)
    data_at: int = 0  # where the compressed stream starts
    sha: bytes | None = None  # None for a delta until it is resolved


@dataclass
class Scan:
    """What reading a pack from its start found."""

    count: int  # objects the pack's header announces
    objects: list[_Obj] = field(default_factory=list)
    stopped: str | None = None  # why reading stopped early, if it did
    whole: bool = False  # every object read and resolved, and the trailer matches


class _Pack:
    """A pack file read by offset (pread), with a small cache of resolved bases."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self._cache: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._cached = 0

    def close(self) -> None:
        os.close(self.fd)

    def header(self, off: int) -> tuple[int, int, int | bytes | None, int]:
        """``(type, size, base, data offset)`` of the object at ``off``."""
        raw = os.pread(self.fd, 64, off)
        type_num, size, i = parse_object_header(raw)
        base: int | bytes | None = None
        if type_num == OFS_DELTA:
            c = raw[i]
            i += 1
            rel = c & 0x7F
            while c & 0x80:
                c = raw[i]
                i += 1
                rel = ((rel + 1) << 7) | (c & 0x7F)
            if rel <= 0 or rel > off:
                raise CorruptRepository(
                    f"a delta at pack offset {off} names a base outside the pack"
                )
            base = off - rel
        elif type_num == REF_DELTA:
            base = bytes(raw[i : i + 20])
            i += 20
        elif type_num not in TYPE_NAMES:
            raise CorruptRepository(f"unknown object type {type_num} at pack offset {off}")
        if i > len(raw):
            raise CorruptRepository(f"pack truncated at offset {off}")
        return type_num, size, base, off + i

    def inflate(
        self, pos: int, size: int, sink: Callable[[bytes], None] | None = None, crc: int = 0
    ) -> tuple[int, bytes, int]:
        """Inflate the stream at ``pos``: ``(compressed length, data, CRC-32)``.

        With ``sink``, the data goes there at most a chunk at a time and is
        not kept (``data`` is then empty): memory stays flat even for a
        stream that inflates a thousandfold.  The CRC-32 continues ``crc``
        over the compressed bytes the stream uses, so each byte is read once.
        """
        d = isal_zlib.decompressobj()
        parts: list[bytes] = []
        got = 0
        start = pos
        try:
            while not d.eof:
                raw = os.pread(self.fd, _CHUNK, pos)
                if not raw:
                    raise CorruptRepository(f"pack truncated inside the object at offset {start}")
                feed = raw
                while feed and not d.eof:
                    out = d.decompress(feed, _CHUNK)
                    feed = d.unconsumed_tail
                    got += len(out)
                    if got > size:
                        raise CorruptRepository(f"the object at pack offset {start} is too long")
                    if sink is not None:
                        sink(out)
                    else:
                        parts.append(out)
                used = len(raw) - len(d.unused_data) if d.eof else len(raw)
                crc = isal_zlib.crc32(memoryview(raw)[:used], crc)
                pos += used
        except CorruptRepository:
            raise
        except Exception as e:  # isal's own error
            raise CorruptRepository(
                f"the object at pack offset {start} does not inflate ({e})"
            ) from None
        if got != size:
            raise CorruptRepository(f"the object at pack offset {start} has the wrong size")
        return pos - start, b"".join(parts), crc & 0xFFFFFFFF

    def content(self, off: int, by_id: dict[bytes, int], depth: int = 0) -> tuple[int, bytes]:
        """``(type, bytes)`` of the object at ``off``, deltas resolved."""
        hit = self._cache.get(off)
        if hit is not None:
            self._cache.move_to_end(off)
            return hit
        if depth > 10_000:
            raise CorruptRepository("a delta chain in the pack loops")
        type_num, size, base, at = self.header(off)
        data = self.inflate(at, size)[1]
        if base is not None:
            base_off = base if isinstance(base, int) else by_id.get(base)
            if base_off is None:
                raise CorruptRepository(f"a delta's base {bytes(base).hex()} is not in the pack")
            type_num, base_data = self.content(base_off, by_id, depth + 1)
            data = b"".join(apply_delta(base_data, data))
            self._keep(base_off, type_num, base_data)
        return type_num, data

    def _keep(self, off: int, type_num: int, data: bytes) -> None:
        if len(data) > _BASE_CACHE // 4:
            return
        self._cache[off] = (type_num, data)
        self._cached += len(data)
        while self._cached > _BASE_CACHE:
            _off, (_t, old) = self._cache.popitem(last=False)
            self._cached -= len(old)


def _object_id(type_num: int, data: bytes) -> bytes:
    h = hashlib.sha1(TYPE_NAMES[type_num] + b" %d\0" % len(data))
    h.update(data)
    return h.digest()


def scan_pack(path: Path) -> Scan:
    """Read the pack at ``path`` from its start; every object's id, offset and CRC-32.

    Stops at the first object that does not read (its end is then
    unknown).  Memory: one object's inflated chunk at a time for whole
    objects; deltas are resolved afterwards, one chain at a time.
    """
    p = _Pack(path)
    try:
        head = os.pread(p.fd, 12, 0)
        if len(head) < 12 or head[:4] != b"PACK":
            return Scan(0, stopped="it is not a pack")
        scan = Scan(int.from_bytes(head[8:12], "big"))
        off = 12
        end = p.size - 20
        by_id: dict[bytes, int] = {}
        while len(scan.objects) < scan.count:
            if off >= end:
                scan.stopped = f"it ends after {len(scan.objects)} of its {scan.count} objects"
                break
            try:
                type_num, size, base, at = p.header(off)
                h = None
                if base is None:
                    h = hashlib.sha1(TYPE_NAMES[type_num] + b" %d\0" % size)
                head_crc = isal_zlib.crc32(os.pread(p.fd, at - off, off))
                sink = h.update if h is not None else _discard
                used, _, crc = p.inflate(at, size, sink, head_crc)
            except CorruptRepository as e:
                scan.stopped = e.message
                break
            length = at - off + used
            obj = _Obj(off, length, crc, type_num, size, base, at)
            if h is not None:
                obj.sha = h.digest()
                by_id.setdefault(obj.sha, off)
            scan.objects.append(obj)
            off += length
        _resolve(p, scan, by_id)
        if scan.stopped is None and off == end and all(o.sha is not None for o in scan.objects):
            digest = _sha1_prefix(p.fd, end)
            trailer = os.pread(p.fd, 20, end)
            scan.whole = digest == trailer
            if not scan.whole:
                scan.stopped = "its checksum does not match its content"
        elif scan.stopped is None and off != end:
            scan.stopped = "it has bytes after its last object"
        return scan
    finally:
        p.close()


def _discard(data: bytes) -> None:
    pass


def _sha1_prefix(fd: int, n: int) -> bytes:
    """SHA-1 of the first ``n`` bytes of ``fd``, read in chunks."""
    h = hashlib.sha1()
    pos = 0
    while pos < n:
        part = os.pread(fd, min(8 << 20, n - pos), pos)
        if not part:
            break
        h.update(part)
        pos += len(part)
    return h.digest()


def _resolve(p: _Pack, scan: Scan, by_id: dict[bytes, int]) -> None:
    """Give every delta whose chain resolves its id (a ref-delta may name a later object)."""
    todo = [o for o in scan.objects if o.sha is None]
    while todo:
        later = []
        for o in todo:
            if isinstance(o.base, bytes) and o.base not in by_id:
                later.append(o)
                continue
            try:
                type_num, data = p.content(o.offset, by_id)
            except CorruptRepository:
                continue  # stays unresolved: not recovered
            o.sha = _object_id(type_num, data)
            by_id.setdefault(o.sha, o.offset)
        if len(later) == len(todo):
            break
        todo = later


# -- repair ----------------------------------------------------------------------


@dataclass
class PackRepair(Record):
    """What ``vml gc --repair`` did to one pack."""

    pack: str
    problem: str
    action: str  # "reindexed", "salvaged", "quarantined" (an index without its pack)
    objects: int = 0  # objects the rebuilt index or the new pack holds
    lost: int = 0  # objects the pack announced that could not be read
    new_pack: str | None = None
    quarantined: list[str] = field(default_factory=list)  # paths under <repo>/vml/


def candidates(repo: Repository) -> dict[str, str]:
    """Packs to repair: the set-aside ones and packs without an index (name -> why)."""
    out = dict(repo.packs.set_aside(warn=False))  # the repair reports them
    pack_dir = repo.objects_dir / "pack"
    if pack_dir.is_dir():
        for pack in sorted(pack_dir.glob("pack-*.pack")):
            if pack.with_suffix(".idx").exists() or keep_protects(pack.with_suffix(".keep")):
                continue
            out.setdefault(pack.stem, "it has no index")
    return out


def repair(repo: Repository, tick: ProgressFn = no_progress) -> list[PackRepair]:
    """Rebuild the index of every whole pack set aside; salvage the others (module docstring).

    Call under the maintenance lock (one gc at a time).
    """
    done: list[PackRepair] = []
    for name, why in candidates(repo).items():
        done.append(_repair_one(repo, name, why, tick))
    repo.reopen_store()
    return done


def _repair_one(repo: Repository, name: str, why: str, tick: ProgressFn) -> PackRepair:
    pack_dir = repo.objects_dir / "pack"
    pack = pack_dir / f"{name}.pack"
    idx = pack_dir / f"{name}.idx"
    res = PackRepair(name, why, "quarantined")
    if not pack.exists():
        res.quarantined = _quarantine(repo, {idx: file_identity(idx)})
        return res
    seen = file_identity(pack)  # before reading: what the scan judges
    scan = scan_pack(pack)
    tick("repair", len(scan.objects), scan.count)
    if scan.whole:
        entries = sorted((o.sha, o.offset, o.crc) for o in scan.objects if o.sha is not None)
        trailer = _tail(pack)
        tmp = pack_dir / f"tmp_vml_{os.getpid()}_repair.idx-tmp"  # not *.idx: git reads those
        with open(tmp, "wb") as f:
            write_pack_index_v2(f, entries, trailer)
            f.flush()
            os.fsync(f.fileno())
        if index_problem(tmp, pack) is not None:  # never replace one bad index by another
            tmp.unlink()
            raise CorruptRepository(f"rebuilding the index of {name} failed; nothing was changed")
        os.replace(tmp, idx)
        fsync_dir(pack_dir)
        res.action, res.objects = "reindexed", len(entries)
        return res
    _salvage(repo, pack, idx, scan, res, seen)
    return res


def _tail(pack: Path) -> bytes:
    with open(pack, "rb") as f:
        f.seek(-20, os.SEEK_END)
        return f.read(20)


def _index_entries(idx: Path, pack: Path) -> list[tuple[bytes, int]]:
    """The (id, offset) pairs of an index that is itself intact, else none."""
    try:
        data = idx.read_bytes()
    except FileNotFoundError:
        return []
    if hashlib.sha1(data[:-20]).digest() != data[-20:] or data[:4] != IDX_MAGIC:
        return []
    problem = index_problem(idx, pack)
    if problem is not None and "index" in problem:
        return []
    count = struct.unpack(">L", data[8 + 255 * 4 : 8 + 256 * 4])[0]
    ids_at = 8 + 1024
    offs_at = ids_at + 28 * count
    large_at = offs_at + 4 * count
    out = []
    for i in range(count):
        sha = data[ids_at + 20 * i : ids_at + 20 * i + 20]
        off = int.from_bytes(data[offs_at + 4 * i : offs_at + 4 * i + 4], "big")
        if off & 0x80000000:
            k = off & 0x7FFFFFFF
            off = int.from_bytes(data[large_at + 8 * k : large_at + 8 * k + 8], "big")
        out.append((sha, off))
    return out


def _salvage(
    repo: Repository,
    pack: Path,
    idx: Path,
    scan: Scan,
    res: PackRepair,
    seen: tuple[int, ...] | None,
) -> None:
    """Copy every object that still reads into a new pack; move the damaged files aside.

    ``seen``: the identity of the pack file ``scan`` read.
    """
    p = _Pack(pack)
    reader = PackReader(repo)  # set-aside packs excluded: "contains" means elsewhere
    writer = PackWriter(repo)
    try:
        by_id = {o.sha: o.offset for o in scan.objects if o.sha is not None}
        offsets = [(o.sha, o.offset) for o in scan.objects if o.sha is not None]
        # An intact index (the pack side is what broke) finds objects past
        # the first damaged one.
        offsets += [(s, off) for s, off in _index_entries(idx, pack) if s not in by_id]
        recovered = set()
        for sha, off in offsets:
            assert sha is not None
            if sha in recovered:
                continue
            try:
                type_num, data = p.content(off, by_id)
            except CorruptRepository:
                continue
            if _object_id(type_num, data) != sha:
                continue
            recovered.add(sha)
            by_id.setdefault(sha, off)
            if not reader.contains(sha):
                writer.add_compressed(type_num, sha, len(data), deflate(data))
        writer.finish()
        res.objects = len(recovered)
        res.lost = max(scan.count, len(offsets)) - len(recovered)
        res.new_pack = writer.names[-1] if writer.names else None
        # The recovered objects are durable in the new pack before the old goes.
        res.quarantined = _quarantine(
            repo, {pack: seen, idx: None, pack.with_suffix(".keep"): None}
        )
        res.action = "salvaged"
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.release()
        reader.close()
        p.close()


def file_identity(path: Path) -> tuple[int, ...] | None:
    """Which file ``path`` is now (None: there is none): a file put in its place differs."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _quarantine(repo: Repository, paths: dict[Path, tuple[int, ...] | None]) -> list[str]:
    """Move damaged pack files into ``<repo>/vml/quarantine/`` (never deleted by VML).

    ``paths`` are files of one pack, each with the identity it had when it
    was judged damaged (None: not judged).  Under the packs' lock: a writer
    may have published that very pack afresh since it was scanned (a pack's
    name is its content's hash), whole; then nothing moves, whether the
    writer still claims it or its refs reach it already.
    """
    where = repo.vml_dir / QUARANTINE
    where.mkdir(parents=True, exist_ok=True)
    first = next(iter(paths))
    pack_dir = first.parent
    pack = pack_dir / f"{first.stem}.pack"
    with pack_dir_lock(pack_dir):
        if claimed_locked(pack.with_suffix(".keep")) or (pack not in paths and pack.exists()):
            return []
        if any(seen is not None and file_identity(p) != seen for p, seen in paths.items()):
            return []  # replaced since it was scanned: not the damaged file
        return _move_aside(repo, where, list(paths))


def _move_aside(repo: Repository, where: Path, paths: list[Path]) -> list[str]:
    moved = []
    # The index first: a pack never stays visible without it.
    for path in sorted(paths, key=lambda x: x.suffix != ".idx"):
        if not path.exists():
            continue
        target = where / path.name
        n = 1
        while target.exists():
            target = where / f"{path.name}.{n}"
            n += 1
        try:
            os.replace(path, target)
        except OSError:
            shutil.move(str(path), str(target))
        moved.append(str(target.relative_to(repo.path)))
    fsync_dir(where)
    if paths:
        fsync_dir(paths[0].parent)
    return moved
