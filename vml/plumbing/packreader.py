"""Reading objects from the packs of a repository.

:class:`PackReader` looks objects up by id across every pack, largest first,
and reads whole (non-delta) objects straight from the pack with a fast
inflater; it falls back to dulwich's object store for anything else (loose
objects, deltas made by git).  The pack object format both sides share (the
type numbers, an object's header, a blob's id) is read here; packwriter.py
writes packs and imports it from here, so that a command that only reads
never loads the writing code.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.objects import RawObjectID, sha_to_hex
from dulwich.pack import load_pack_index
from isal import igzip_lib

from vml.errors import CorruptRepository
from vml.plumbing.packindex import object_ends
from vml.plumbing.repository import Repository

BLOB = 3
TREE = 2
COMMIT = 1
TYPE_NAMES = {1: b"commit", 2: b"tree", 3: b"blob", 4: b"tag"}
_TYPE_NUMBERS = {name: n for n, name in TYPE_NAMES.items()}

# Objects this big are read exactly as long as their stream (PackReader._end_of).
_EXACT_FROM = 64 << 10


def blob_id(data: bytes | memoryview) -> bytes:
    """The binary git object id of a blob holding ``data``."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.digest()


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
        self._objects = str(repo.objects_dir)
        self._packs: list[tuple[object, int]] = []
        self._fds: list[int] = []
        # Per pack file: its index's path, and (once a large object is read)
        # where each object ends (object_ends).
        self._idx_paths: dict[int, Path] = {}
        self._ends: dict[int, array[int]] = {}
        self._lock = threading.Lock()
        # Trees read since remember_trees() began (None: not remembering).
        self._trees: dict[bytes, bytes] | None = None
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
        if expect_type == TREE and self._trees is not None and sha in self._trees:
            return TREE, self._trees[sha]
        got: tuple[int, bytes] | None = None
        damage: CorruptRepository | None = None
        # VML writes each entry's commit loose: look there first, not in every pack.
        loose_first = expect_type == COMMIT
        if loose_first:
            got = self._read_loose(sha)
        for fd, offset in () if got is not None else self._locate_all(sha):
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
        if got is None and not loose_first:
            got = self._read_loose(sha)
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
        if type_num == TREE and verify and self._trees is not None:
            self._trees[sha] = data
        return type_num, data

    @contextmanager
    def remember_trees(self) -> Iterator[None]:
        """Within the block, a tree read (and checked) once is not read again.

        For one thread walking one entry (``vml fsck``), whose every path
        look-up starts from the same root tree: the trees are forgotten on
        leaving, so memory stays bounded by one entry's trees.
        """
        before, self._trees = self._trees, {}
        try:
            yield
        finally:
            self._trees = before

    def _read_loose(self, sha: bytes) -> tuple[int, bytes] | None:
        """Loose object ``sha``, id checked; None when it is not loose or not intact.

        Read straight from its file: dulwich's store would first search every
        pack again and list the pack folder.  Anything odd (damage, an unknown
        type) is left to the store's own reading, which says what is wrong.
        """
        hexsha = sha.hex()
        try:
            with open(f"{self._objects}/{hexsha[:2]}/{hexsha[2:]}", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        try:
            d = zlib.decompressobj()
            head = d.decompress(raw, 64)
            kind, sep, rest = head.partition(b"\0")
            name, _, size_text = kind.partition(b" ")
            type_num = _TYPE_NUMBERS.get(name)
            if not sep or type_num is None or not size_text.isdigit():
                return None
            size = int(size_text)
            if len(rest) > size:
                return None
            data = rest + d.decompress(d.unconsumed_tail, size + 1 - len(rest))
        except zlib.error:
            return None
        if len(data) != size or not d.eof:
            return None
        try:
            self._check_id(sha, type_num, data)
        except CorruptRepository:
            return None
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
