"""Pack files VML writes and reads itself.

dulwich's ``add_objects``/``repack`` hold every object in memory and
``add_pack_data`` reads a finished pack twice more; image data is too big for
that.  :class:`PackWriter` streams already-compressed objects into a
standard version-2 git pack and writes its index; :class:`PackReader` reads
whole (non-delta) objects straight from the pack with a fast inflater and
falls back to dulwich for anything else (loose objects, deltas made by git).

A pack becomes visible to git and dulwich when its ``.idx`` exists, so the
index is renamed into place last, after the pack and the index are on disk.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.objects import RawObjectID, ShaFile, sha_to_hex
from dulwich.pack import load_pack_index, write_pack_index_v2
from isal import igzip_lib, isal_zlib

from vml.errors import CorruptRepository
from vml.plumbing.keeps import claim_line, claim_locked, pack_dir_lock, unclaim, unclaim_locked
from vml.plumbing.packindex import object_ends
from vml.plumbing.repository import Repository, fsync_dir, start_writeback

BLOB = 3
TREE = 2
COMMIT = 1
TYPE_NAMES = {1: b"commit", 2: b"tree", 3: b"blob", 4: b"tag"}

_PROBE = 16 << 10
# A pack this big is sealed in the background while the next one fills.
_ROLL_BYTES = 192 << 20
# Start the disk writing a big pack every this many bytes (see start_writeback).
_WRITEBACK_EVERY = 32 << 20
_PROBE_MIN = 256 << 10
# Objects this big are read exactly as long as their stream (PackReader._end_of).
_EXACT_FROM = 64 << 10


def blob_id(data: bytes | memoryview) -> bytes:
    """The binary git object id of a blob holding ``data``."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.digest()


def deflate(data: bytes | memoryview) -> bytes:
    """Compress for a pack: isal level 1, or stored (zlib level 0) when it does not pay.

    Both produce ordinary zlib streams that git reads.  Disk images hold much
    incompressible data (encrypted, compressed or random files): two 16 KiB
    probes spot it, so it is stored without spending a full compression pass,
    and inflating it later runs at memory speed.
    """
    n = len(data)
    if n >= _PROBE_MIN:
        mv = memoryview(data)
        half = n // 2
        probe = len(isal_zlib.compress(mv[:_PROBE], 1)) + len(
            isal_zlib.compress(mv[half : half + _PROBE], 1)
        )
        if probe > 2 * _PROBE * 0.97:
            return stored(data)
    out: bytes = isal_zlib.compress(data, 1)
    if len(out) > n * 0.98:
        out = stored(data)
    return out


_STORED_BLOCK = 0xFFFF


def stored(data: bytes | memoryview) -> bytes:
    """``data`` as a zlib stream of stored (uncompressed) deflate blocks.

    What ``zlib.compress(data, 0)`` makes, in other words, at memory speed:
    zlib's own Adler-32 ran at a GB/s, isal's runs at several.
    """
    mv = memoryview(data).cast("B")
    n = len(mv)
    parts: list[bytes | memoryview] = [b"\x78\x01"]
    for pos in range(0, max(n, 1), _STORED_BLOCK):
        chunk = mv[pos : pos + _STORED_BLOCK]
        final = pos + _STORED_BLOCK >= n
        parts.append(struct.pack("<BHH", final, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(chunk)
    parts.append(struct.pack(">I", isal_zlib.adler32(mv)))
    return b"".join(parts)


def parse_object_header(raw: bytes) -> tuple[int, int, int]:
    """``(type, inflated size, header length)`` of a packed object's header bytes."""
    if not raw:
        raise CorruptRepository("pack truncated at an object header")
    type_num = (raw[0] >> 4) & 7
    size = raw[0] & 15
    shift = 4
    i = 1
    while raw[i - 1] & 0x80:
        if i >= len(raw):
            raise CorruptRepository("bad object header in a pack")
        size |= (raw[i] & 0x7F) << shift
        shift += 7
        i += 1
    return type_num, size, i


def _object_header(type_num: int, size: int) -> bytes:
    out = bytearray()
    c = (type_num << 4) | (size & 15)
    size >>= 4
    while size:
        out.append(c | 0x80)
        c = size & 0x7F
        size >>= 7
    out.append(c)
    return bytes(out)


class _Segment:
    """One pack file being written (the header's count is fixed up when sealed)."""

    def __init__(self, pack_dir: Path, n: int) -> None:
        self.tmp = pack_dir / f"tmp_vml_{os.getpid()}_{threading.get_ident()}_{id(self)}_{n}.pack"
        self.f = open(self.tmp, "w+b")  # noqa: SIM115 (closed when sealed or aborted)
        self.f.write(b"PACK" + struct.pack(">LL", 2, 0))
        self.offset = 12
        self.unsynced = 0
        self.entries: list[tuple[bytes, int, int]] = []

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


class PackWriter:
    """Stream objects into new packs in ``repo``.

    Not thread safe: feed it from one thread (compress in others).  A pack
    is sealed (its count written, its SHA-1 trailer computed over the whole
    file, its index written) only once it is complete; so that this last
    pass does not all fall at the end of a big save, a pack that reaches
    ``roll_bytes`` is sealed in a background thread while the next one
    fills.
    """

    def __init__(
        self, repo: Repository, durable: bool = True, roll_bytes: int | None = None
    ) -> None:
        self.repo = repo
        self.durable = durable
        self.roll_bytes = _ROLL_BYTES if roll_bytes is None else roll_bytes
        self.stored_bytes = 0
        self._dir = repo.objects_dir / "pack"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._seen: set[bytes] = set()
        self._count = 0
        self._n = 0
        self._seg: _Segment | None = _Segment(self._dir, self._n)
        self._sealing: list[Future[str]] = []
        self._sealer: ThreadPoolExecutor | None = None
        self._ending = False  # near_end() was called
        # This writer's claim on each pack it sealed (keeps.py).
        self._line = claim_line(f"{threading.get_ident():x}.{id(self):x}")
        self._claimed: list[str] = []
        self.names: list[str] = []

    def __contains__(self, sha: bytes) -> bool:
        return sha in self._seen

    @property
    def count(self) -> int:
        """Objects written so far."""
        return self._count

    @property
    def disk_bytes(self) -> int:
        """Bytes the finished packs take on disk (packs and indexes)."""
        return sum(
            (self._dir / f"{n}{ext}").stat().st_size
            for n in self.names
            for ext in (".pack", ".idx")
        )

    def add_compressed(self, type_num: int, sha: bytes, size: int, zdata: bytes) -> bool:
        """Append an object whose id and zlib stream are already computed.

        Returns False (and writes nothing) when this writer already holds it.
        """
        if sha in self._seen:
            return False
        seg = self._seg
        assert seg is not None, "add after finish"
        header = _object_header(type_num, size)
        # isal's CRC-32 (carry-less multiply) is ~4x zlib's.
        crc = isal_zlib.crc32(zdata, isal_zlib.crc32(header))
        seg.f.write(header)
        seg.f.write(zdata)
        seg.entries.append((sha, seg.offset, crc & 0xFFFFFFFF))
        self._seen.add(sha)
        self._count += 1
        n = len(header) + len(zdata)
        seg.offset += n
        self.stored_bytes += n
        seg.unsynced += n
        if self.durable and seg.unsynced >= _WRITEBACK_EVERY:
            seg.f.flush()
            start_writeback(seg.f.fileno())
            seg.unsynced = 0
        if seg.offset >= self.roll_bytes:
            self._roll()
        return True

    def _roll(self) -> None:
        """Seal the pack being filled in the background; the next objects start a new one."""
        assert self._seg is not None
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vml-seal")
        self._sealing.append(self._sealer.submit(self._seal, self._seg))
        self._n += 1
        self._seg = _Segment(self._dir, self._n)

    def near_end(self) -> None:
        """The caller has little left to write: seal what is written so far now, once.

        The last pack can only be hashed once its last object is in, so
        a save waits for that pass over the whole last pack at its end,
        with one core idle.  A writer that rolled over already (a big save)
        seals the pack it is filling in the background instead, while the
        rest is still being compressed, so the last pack holds only that
        rest.  A writer that did not roll (a later save, a few dozen MiB)
        is left as it is: one pack per save keeps look-ups cheap.
        """
        seg = self._seg
        if self._ending or seg is None:
            return
        self._ending = True
        # Worth a pack of its own only if hashing it would take a while.
        if self._n > 0 and seg.offset >= self.roll_bytes // 8:
            self._roll()

    def add_blob(self, data: bytes | memoryview, sha: bytes | None = None) -> bytes:
        """Add a blob; returns its binary id."""
        sha = blob_id(data) if sha is None else sha
        if sha not in self._seen:
            self.add_compressed(BLOB, sha, len(data), deflate(data))
        return sha

    def add_object(self, obj: ShaFile) -> bytes:
        """Add a small dulwich object (tree, commit, blob); returns its binary id."""
        raw = obj.as_raw_string()
        sha = bytes.fromhex(obj.id.decode())
        if sha not in self._seen:
            self.add_compressed(obj.type_num, sha, len(raw), deflate(raw))
        return sha

    def release(self) -> None:
        """The packs' objects are reachable from refs now: drop this writer's claims."""
        for name in self._claimed:
            unclaim(self._dir / f"{name}.keep", self._line)
        self._claimed = []

    def _wait_sealed(self) -> BaseException | None:
        error: BaseException | None = None
        for fut in self._sealing:
            try:
                self._sealed(fut.result())
            except BaseException as e:  # surfaces in finish(), after every seal ended
                error = error or e
        self._sealing = []
        if self._sealer is not None:
            self._sealer.shutdown(wait=True)
            self._sealer = None
        return error

    def _sealed(self, name: str) -> None:
        self.names.append(name)
        self._claimed.append(name)

    def abort(self) -> None:
        """Drop the unfinished pack, and this writer's claims on the sealed ones.

        A sealed pack is never deleted here: once its index is in place any
        command may rely on its objects (a save names a block it finds there
        instead of storing it, gc or a repair copies no object it holds),
        and their refs may reach them by now.  Only gc, which reads the refs
        under the repository lock, judges it; it goes there when nothing
        reaches it.
        """
        if self._seg is not None:
            self._seg.abort()
            self._seg = None
        self._wait_sealed()
        self.release()
        self.names = []

    def finish(self) -> str | None:
        """Seal every pack; returns the last pack's name, or None if nothing was written.

        ``names`` lists every pack written.  Each stays protected by a
        ``.keep`` marker until :meth:`release`.
        """
        seg, self._seg = self._seg, None
        try:
            if seg is not None and seg.entries:
                self._sealed(self._seal(seg))
            elif seg is not None:
                seg.abort()
        except BaseException:
            self._seg = None
            error = self._wait_sealed()
            self.abort()
            raise
        error = self._wait_sealed()
        if error is not None:
            self.abort()
            raise error
        if self.durable and self.names:
            fsync_dir(self._dir)
        return self.names[-1] if self.names else None

    def _seal(self, seg: _Segment) -> str:
        """Write the count, the trailer and the index of one pack; make it visible; its name."""
        f = seg.f
        idx_tmp: Path | None = None
        try:
            f.seek(8)
            f.write(struct.pack(">L", len(seg.entries)))
            f.flush()
            if self.durable:
                # The disk writes what is still dirty while the pack is hashed
                # (read back from the page cache): the fsync below waits less.
                start_writeback(f.fileno())
            f.seek(0)
            checksum = hashlib.file_digest(f, "sha1").digest()
            f.seek(0, os.SEEK_END)
            f.write(checksum)
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
            f.close()
            name = f"pack-{checksum.hex()}"
            # Index first, under a temporary name: nothing is visible until
            # both files are complete, and a failure (no space) leaves only
            # temporary files, never a pack without its index.
            # Named like the temporary pack (pid first), so gc knows whose it is,
            # and not `*.idx`: git reads every `*.idx` in the folder as an index,
            # and one cut short by a kill made `git fsck` fail until a gc.
            idx_tmp = seg.tmp.with_name(f"{seg.tmp.stem}.idx-tmp")
            seg.entries.sort()
            with open(idx_tmp, "wb") as idx:
                write_pack_index_v2(idx, seg.entries, checksum)
                idx.flush()
                if self.durable:
                    os.fsync(idx.fileno())
            self._publish(seg.tmp, idx_tmp, name)
        except BaseException:
            seg.abort()
            if idx_tmp is not None:
                idx_tmp.unlink(missing_ok=True)
            raise
        return name

    def _publish(self, pack_tmp: Path, idx_tmp: Path, name: str) -> None:
        """Claim pack ``name`` and put it in place, the .idx last.

        One step under the packs' lock (keeps.py): another writer of
        the same bytes either published it before (we find it, and our
        claim marks it shared) or after (it finds ours).
        Until the caller's refs reach these objects, a concurrent gc would
        see them as garbage: the claim in the .keep (git's own convention,
        which gc honours) protects the pack until release().
        """
        pack = self._dir / f"{name}.pack"
        idx = self._dir / f"{name}.idx"
        with pack_dir_lock(self._dir):
            found = pack.exists() and idx.exists()
            keep = self._dir / f"{name}.keep"
            claim_locked(keep, self._line, shared=found)
            try:
                # Found or not, our complete, fsynced files replace whatever
                # is there: the same bytes (a reader keeps the inode it
                # opened), or a pack left without its index, or a damaged one.
                os.replace(pack_tmp, pack)
                os.replace(idx_tmp, idx)
            except BaseException:
                unclaim_locked(keep, self._line)
                raise


def _largest_first(idx_paths: Iterable[Path]) -> list[Path]:
    """Indexes, largest pack first (name breaks ties; a missing pack counts as empty).

    A look-up tries packs in turn; most blocks of any entry sit in the big
    pack of the first save, so trying it first makes most hits cost one
    index search whatever the number of packs.
    """
    sized: list[tuple[int, str, Path]] = []
    for idx in idx_paths:
        try:
            size = idx.with_suffix(".pack").stat().st_size
        except FileNotFoundError:
            size = 0  # the health check says why (or that it vanished)
        sized.append((-size, idx.name, idx))
    return [idx for _size, _name, idx in sorted(sized)]


class PackReader:
    """Read objects by id, whole objects straight from packs with isal.

    Thread safe for reads once constructed: the pack list is loaded up front
    (dulwich's pack cache has no lock) and every read uses ``os.pread``.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._packs: list[tuple[object, int]] = []
        self._fds: list[int] = []
        # Per pack file: its index's path, and (once a large object is read)
        # where each object ends (object_ends).
        self._idx_paths: dict[int, Path] = {}
        self._ends: dict[int, array[int]] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Load the packs present now (call after writing a pack)."""
        pack_dir = self.repo.objects_dir / "pack"
        # A consolidation or gc beside us deletes packs only once the packs
        # replacing them are visible: when one vanishes while we load, list
        # again and the replacements are there.
        for _attempt in range(100):
            self.close()
            if not pack_dir.is_dir() or self._load_all(pack_dir):
                break
        # dulwich's store serves loose objects and deltified ones; prime its
        # pack cache now, before any reader thread touches it.
        self.repo.reopen_store()

    def _load_all(self, pack_dir: Path) -> bool:
        """Open every usable pack listed now; False when one vanished meanwhile.

        A pack whose index is damaged, or disagrees with its pack, is set
        aside (packindex.py): it is passed over and a warning names it.
        """
        for idx_path in _largest_first(pack_dir.glob("pack-*.idx")):
            try:
                if self.repo.packs.problem(idx_path.stem) is not None:
                    continue
                index = load_pack_index(str(idx_path), DEFAULT_OBJECT_FORMAT)
            except FileNotFoundError:
                return False
            try:
                fd = os.open(idx_path.with_suffix(".pack"), os.O_RDONLY)
            except FileNotFoundError:
                close = getattr(index, "close", None)
                if close is not None:
                    close()
                return False
            self._packs.append((index, fd))
            self._fds.append(fd)
            self._idx_paths[fd] = idx_path
        return True

    def close(self) -> None:
        """Close the pack files."""
        for index, _fd in self._packs:
            close = getattr(index, "close", None)
            if close is not None:
                close()
        for fd in self._fds:
            os.close(fd)
        self._packs = []
        self._fds = []
        self._idx_paths = {}
        self._ends = {}

    def _locate(self, sha: bytes) -> tuple[int, int] | None:
        return next(self._locate_all(sha), None)

    def _locate_all(self, sha: bytes) -> Iterator[tuple[int, int]]:
        for index, fd in self._packs:
            try:
                offset = index.object_offset(sha)  # type: ignore[attr-defined]
            except KeyError:
                continue
            yield fd, int(offset)

    def position(self, sha: bytes) -> tuple[int, int]:
        """Where ``sha`` sits (a pack, an offset): sorting ids by it reads packs in order."""
        found = self._locate(sha)
        return found if found is not None else (1 << 62, 0)

    def contains(self, sha: bytes) -> bool:
        """True when a pack or the loose store holds ``sha``."""
        if self._locate(sha) is not None:
            return True
        return self.repo.git.object_store.contains_loose(sha_to_hex(RawObjectID(sha)))

    def in_packs(self, sha: bytes) -> bool:
        """True when one of the loaded packs holds ``sha`` (no loose look-up)."""
        return self._locate(sha) is not None

    def object_size(self, sha: bytes) -> int | None:
        """The size of object ``sha`` from its pack header (no inflating); None if unknown."""
        for fd, offset in self._locate_all(sha):
            try:
                return parse_object_header(os.pread(fd, 32, offset))[1]
            except CorruptRepository:
                continue  # damaged here; the read itself will say so
        return None

    def read(
        self, sha: bytes, expect_type: int | None = None, *, verify: bool = True
    ) -> tuple[int, bytes]:
        """Return ``(type_num, data)`` of object ``sha``, checking its id.

        ``verify=False`` skips the id check of a packed object (the caller
        checks the data another way: a restore checks each block it builds
        against the entry's checks); damage that stops it inflating is still
        reported.

        An object may be stored in several packs (each save packs what it
        needs, and small files recur); a damaged copy is passed over when an
        intact one exists, so damage to one pack harms only what it alone holds.
        """
        got: tuple[int, bytes] | None = None
        damage: CorruptRepository | None = None
        for fd, offset in self._locate_all(sha):
            try:
                packed = self._read_packed(fd, offset)
                if packed is None:
                    break  # a delta git made: let dulwich resolve it
                if verify:
                    self._check_id(sha, *packed)
            except CorruptRepository as e:
                damage = damage or e
                continue
            got = packed
            break
        if got is None and damage is not None:
            # Every packed copy is damaged; dulwich would read the same packs.
            raise damage
        if got is None:
            try:
                with self._lock:
                    type_num, data = self.repo.git.object_store.get_raw(
                        sha_to_hex(RawObjectID(sha))
                    )
                got = (type_num, bytes(data))
                self._check_id(sha, *got)
            except KeyError:
                raise self.missing(sha) from None
        type_num, data = got
        if expect_type is not None and type_num != expect_type:
            raise CorruptRepository(
                f"object {sha.hex()} is a {TYPE_NAMES.get(type_num, b'?').decode()}, expected a "
                f"{TYPE_NAMES.get(expect_type, b'?').decode()}"
            )
        return type_num, data

    def read_head(self, sha: bytes, n: int) -> bytes:
        """The first ``n`` bytes of blob ``sha`` (all of a shorter one), **unchecked**.

        Only as much of its stream is inflated: for a caller that wants a
        header and checks nothing by it (a restore planning what to gather).
        An object not packed whole (loose, or a delta git made) is read whole.
        """
        for fd, offset in self._locate_all(sha):
            type_num, size, i = parse_object_header(os.pread(fd, 32, offset))
            if type_num != BLOB:
                break
            want, pos = min(n, size), offset + i
            comp = os.pread(fd, want + (want >> 3) + 64, pos)
            if not _zlib_header(comp):
                break
            d = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_DEFLATE)
            try:
                out = d.decompress(memoryview(comp)[2:], want)
                while len(out) < want and not d.eof and comp:
                    pos += len(comp)
                    comp = os.pread(fd, 1 << 16, pos) if d.needs_input else b""
                    out += d.decompress(comp, want - len(out))
            except Exception:  # isal raises its own IsalError
                break  # damaged here: the whole read says so
            return out
        return self.read(sha, BLOB, verify=False)[1][:n]

    def missing(self, sha: bytes) -> CorruptRepository:
        """The error for an object no usable pack and no loose file holds.

        When a pack is set aside, the object is probably there: say so, and
        how to get it back.
        """
        bad = self.repo.packs.known_bad()
        if not bad:
            return CorruptRepository(f"object {sha.hex()} is missing")
        name, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return CorruptRepository(
            f"object {sha.hex()} is missing: pack {name}{more} is set aside ({why})",
            "run `vml gc --repair` to rebuild or salvage it",
        )

    def data(self, sha: bytes, type_num: int) -> bytes:
        """The content of object ``sha``, which must be of ``type_num`` (id checked)."""
        return self.read(sha, type_num)[1]

    @staticmethod
    def _check_id(sha: bytes, type_num: int, data: bytes) -> None:
        h = hashlib.sha1(TYPE_NAMES.get(type_num, b"?") + b" %d\0" % len(data))
        h.update(data)
        if h.digest() != sha:
            raise CorruptRepository(
                f"object {sha.hex()} is damaged (its content does not match its id)"
            )

    def _end_of(self, fd: int, offset: int) -> int:
        """Where the object at ``offset`` of pack ``fd`` ends, by its index (0: unknown)."""
        ends = self._ends.get(fd)
        if ends is None:
            with self._lock:
                ends = self._ends.get(fd)
                if ends is None:
                    idx = self._idx_paths.get(fd)
                    size = os.fstat(fd).st_size
                    ends = self._ends[fd] = array("Q") if idx is None else object_ends(idx, size)
        i = bisect_right(ends, offset)
        return ends[i] if i < len(ends) else 0

    def _read_packed(self, fd: int, offset: int) -> tuple[int, bytes] | None:
        type_num, size, i = parse_object_header(os.pread(fd, 32, offset))
        if type_num not in TYPE_NAMES:
            return None  # a delta git made: let dulwich resolve it
        pos = offset + i
        # Never ask for more than the pack holds: a hostile header may claim
        # any size, and pread allocates what it is asked for.
        left = max(0, os.fstat(fd).st_size - pos)
        want = min(size + (size >> 6) + 64, left)
        if size >= _EXACT_FROM:
            # Where the next object starts bounds this one's stream: a block
            # deflated to a third is read as that third, not as its inflated
            # size (the copy out of the page cache was 2.9x the stream).  A
            # wrong hint only costs more reads below.
            end = self._end_of(fd, offset)
            if pos < end:
                want = min(want, end - pos)
        first = os.pread(fd, want, pos)
        stored = _inflate_stored(first, size)
        if stored is not None:
            return type_num, stored
        # One decompressor for the whole object, each call bounded by what is
        # still to come (+1 to see a stream that runs past the declared
        # size): a hostile stream inflates ~1000x, and an unbounded call would
        # hold all of it before the size check.  The stream is (nearly always)
        # whole in the first read: one call, the GIL released, output in one
        # buffer.  Trailing bytes of the next object are left unconsumed.
        # The stream is inflated raw, past its zlib header: its Adler-32 is
        # not computed (8% of inflating), since the bytes are checked anyway,
        # by the object id here or by the caller's own check (a restore's
        # block check, which reads a block again verified when it fails).
        if not _zlib_header(first):
            raise CorruptRepository(f"object at pack offset {offset} is not a zlib stream")
        d = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_DEFLATE)
        parts: list[bytes] = []
        total = 0
        pos += 2
        left -= 2
        try:
            comp: bytes | memoryview | None = memoryview(first)[2:]
            while not d.eof:
                if comp is None:
                    comp = os.pread(fd, min(1 << 20, left), pos)
                if not comp:
                    raise CorruptRepository(f"pack truncated inside object at offset {offset}")
                pos += len(comp)
                left -= len(comp)
                out = d.decompress(comp, size + 1 - total)
                comp = None
                parts.append(out)
                total += len(out)
                if total > size:
                    break
                if not d.eof and not d.needs_input:
                    break  # output bound reached without the end: wrong size
        except CorruptRepository:
            raise
        except Exception as e:  # isal raises its own IsalError
            raise CorruptRepository(
                f"object at pack offset {offset} does not inflate: {e}"
            ) from None
        data = b"".join(parts)
        if len(data) != size:
            raise CorruptRepository(f"object at pack offset {offset} has the wrong size")
        return type_num, data


def _zlib_header(comp: bytes) -> bool:
    """Does ``comp`` start with a zlib header for deflate, without a preset dictionary?"""
    return (
        len(comp) >= 2
        and comp[0] & 0x0F == 8
        and not (comp[0] << 8 | comp[1]) % 31
        and not comp[1] & 0x20
    )


def _inflate_stored(comp: bytes, size: int) -> bytes | None:
    """Unwrap a zlib stream made only of stored blocks, at memory speed.

    Incompressible blocks are written stored (zlib level 0); unwrapping them
    is a few slices, where a general inflater runs at a third of the speed.
    Returns None for anything else (the caller inflates normally).  The
    Adler-32 is not checked: the object id (SHA-1) is checked by the caller.
    """
    if not _zlib_header(comp):
        return None
    pos = 2
    # Slices of a view cost nothing; the join below is the one copy.
    view = memoryview(comp)
    parts: list[memoryview] = []
    total = 0
    while True:
        if pos + 5 > len(comp) or comp[pos] & 0x06:
            return None  # not a stored block (or truncated): take the general path
        final = comp[pos] & 1
        n = comp[pos + 1] | comp[pos + 2] << 8
        if n ^ (comp[pos + 3] | comp[pos + 4] << 8) != 0xFFFF or pos + 5 + n > len(comp):
            return None
        parts.append(view[pos + 5 : pos + 5 + n])
        total += n
        pos += 5 + n
        if final:
            break
        if total > size:
            return None
    if total != size:
        return None
    return b"".join(parts)


def write_loose(repo: Repository, obj: ShaFile, durable: bool = True) -> bytes:
    """Write one small object as a loose file, durably; returns its binary id.

    Used for the one commit object each entry adds under the repository lock,
    where a whole pack would be overkill.
    """
    hexid = obj.id.decode()
    d = repo.objects_dir / hexid[:2]
    d.mkdir(exist_ok=True)
    final = d / hexid[2:]
    if not final.exists():
        raw = obj.as_legacy_object()
        tmp = d / f"tmp_obj_{os.getpid()}_{hexid[2:]}"
        with open(tmp, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        if durable:
            fsync_dir(d)
    return bytes.fromhex(hexid)


def pack_extents(idx_path: Path, pack_size: int) -> list[tuple[bytes, int, int, int | None]]:
    """(sha, offset, length, crc) of every object of a pack, in pack order."""
    index = load_pack_index(str(idx_path), DEFAULT_OBJECT_FORMAT)
    try:
        items = sorted(
            ((bytes(s), int(o), c) for s, o, c in index.iterentries()), key=lambda x: x[1]
        )
    finally:
        index.close()
    out: list[tuple[bytes, int, int, int | None]] = []
    for i, (sha, off, crc) in enumerate(items):
        end = items[i + 1][1] if i + 1 < len(items) else pack_size - 20
        out.append((sha, off, end - off, crc))
    return out


def copy_object(
    reader: PackReader,
    writer: PackWriter,
    fd: int,
    sha: bytes,
    off: int,
    length: int,
    crc: int | None,
) -> None:
    """Copy one packed object as it is (still compressed), or rebuild it if it is a delta."""
    raw = os.pread(fd, length, off)
    if len(raw) != length or (crc is not None and isal_zlib.crc32(raw) & 0xFFFFFFFF != crc):
        raise CorruptRepository(
            f"object {sha.hex()} is damaged in its pack; nothing was deleted",
            "run `vml verify --all` to see which entries it affects",
        )
    type_num, size, hlen = parse_object_header(raw)
    if type_num in (1, 2, 3, 4):
        writer.add_compressed(type_num, sha, size, raw[hlen:])
        return
    # A delta made by git: store it whole (reading it checks its id).
    type_num, data = reader.read(sha)
    writer.add_compressed(type_num, sha, len(data), deflate(data))
