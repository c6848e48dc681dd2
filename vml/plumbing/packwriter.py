"""Pack files VML writes itself.

dulwich's ``add_objects``/``repack`` hold every object in memory and
``add_pack_data`` reads a finished pack twice more; image data is too big for
that.  :class:`PackWriter` streams already-compressed objects into a
standard version-2 git pack and writes its index.  Reading them back is
packreader.py's, which also holds the object format both sides share.

A pack becomes visible to git and dulwich when its ``.idx`` exists, so the
index is renamed into place last, after the pack and the index are on disk.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dulwich.objects import ShaFile
from dulwich.pack import write_pack_index_v2
from isal import isal_zlib

from vml.errors import CorruptRepository
from vml.plumbing.keeps import claim_line, claim_locked, pack_dir_lock, unclaim, unclaim_locked
from vml.plumbing.packreader import BLOB, PackReader, blob_id, parse_object_header
from vml.plumbing.repository import Repository, fsync_dir, start_writeback

_PROBE = 16 << 10
# Probes that save less than this share are not worth a full pass.  On W2's
# real data (a guest's disk and RAM), blocks whose probes save under 10%
# compress to ~0.86-0.94 of their size, at half the speed of the rest: storing
# them took ~0.1 s of CPU off a ~3.3 s first save for 0.6% more stored, and
# 0.0-0.5% more per later save.
_PROBE_RATIO = 0.9
# A pack this big is sealed in the background while the next one fills.
_ROLL_BYTES = 192 << 20
# Start the disk writing a big pack every this many bytes (see start_writeback).
_WRITEBACK_EVERY = 32 << 20
_PROBE_MIN = 256 << 10


def deflate(data: bytes | memoryview) -> bytes:
    """Compress for a pack: isal level 1, or stored (zlib level 0) when it does not pay.

    Both produce ordinary zlib streams that git reads.  Disk images hold much
    incompressible data (encrypted, compressed or random files): two 16 KiB
    probes spot it, so it is stored without spending a full compression pass,
    and inflating it later runs at memory speed; so is data the probes find
    barely compressible (see ``_PROBE_RATIO``).
    """
    n = len(data)
    if n >= _PROBE_MIN:
        mv = memoryview(data)
        half = n // 2
        probe = len(isal_zlib.compress(mv[:_PROBE], 1)) + len(
            isal_zlib.compress(mv[half : half + _PROBE], 1)
        )
        if probe > 2 * _PROBE * _PROBE_RATIO:
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
        is left as it is: one pack per save keeps look-ups cheap; should it
        roll over later, the next call seals the pack it fills then.
        """
        seg = self._seg
        if self._ending or seg is None or self._n == 0:
            return
        self._ending = True
        # Worth a pack of its own only if hashing it would take a while.
        if seg.offset >= self.roll_bytes // 8:
            self._roll()

    @property
    def filling(self) -> int:
        """Bytes in the pack being filled: what sealing it now would hash."""
        return self._seg.offset if self._seg is not None else 0

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
