"""Pack indexes are checked before anything trusts them; a bad pack is set aside.

A pack is usable only when its index is whole (its SHA-1 trailer matches
its content, the fan-out table never decreases, its size fits its object
count) and agrees with its pack (the pack's header counts as many objects,
and the pack's SHA-1 trailer is the one the index names).  The checks read
the index (about 28 bytes per object) and 32 bytes of the pack: cheap enough
for every command, and done once per pack per process.

A pack that fails is *set aside*: no reader uses it, neither
:class:`~vml.plumbing.packreader.PackReader` nor dulwich's object store (which
would otherwise fail on it at every look-up, loose objects included), and a
warning names it once (logger ``vml``).  Nothing on disk changes: a read
command writes nothing to a damaged repository.  ``vml gc --repair``
rebuilds the index from the pack, or salvages what the pack still holds
(packscan.py); until then ``vml gc`` deletes nothing, since objects only the
set-aside pack holds would look unreachable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import threading
from array import array
from pathlib import Path
from typing import Any

log = logging.getLogger("vml")

IDX_MAGIC = b"\377tOc"
_FANOUT = 256 * 4
_TRAILER = 40  # the pack's SHA-1, then the index's own
# The remedy every warning about a set-aside pack ends with.
REMEDY = "`vml fsck` names the entries that need it; `vml gc --repair` rebuilds or salvages it"


def _index_count(data: bytes) -> tuple[int, int] | str:
    """``(object count, bytes per object before the trailer)`` or why the index is unusable."""
    if data[:4] == IDX_MAGIC:
        if len(data) < 8:
            return "its index is truncated"
        version = int.from_bytes(data[4:8], "big")
        if version != 2:
            return f"its index has unknown version {version}"
        head = 8
    else:
        head = 0  # version 1: no magic, the fan-out table first
    if len(data) < head + _FANOUT + _TRAILER:
        return "its index is truncated"
    fan = struct.unpack(">256L", data[head : head + _FANOUT])
    if any(fan[i] > fan[i + 1] for i in range(255)):
        return "its index is garbled (its fan-out table)"
    count = fan[255]
    if head:  # v2: ids, CRC-32s, 32-bit offsets, then 8 bytes per large offset
        fixed = head + _FANOUT + 28 * count + _TRAILER
        if len(data) < fixed:
            return "its index is truncated"
        if (len(data) - fixed) % 8 or (len(data) - fixed) // 8 > count:
            return "its index has the wrong size"
    elif len(data) != _FANOUT + 24 * count + _TRAILER:
        return "its index has the wrong size"
    return count, head


def index_problem(idx: Path, pack: Path) -> str | None:
    """Why the pack ``pack`` with index ``idx`` cannot be used, or None when it can.

    Raises FileNotFoundError when the index is gone (a gc or consolidation
    beside us deleted it: the caller lists the packs again).
    """
    data = idx.read_bytes()
    parsed = _index_count(data)
    if isinstance(parsed, str):
        return parsed
    count, _head = parsed
    if hashlib.sha1(data[:-20]).digest() != data[-20:]:
        return "its index is garbled (its checksum does not match)"
    try:
        fd = os.open(pack, os.O_RDONLY)
    except FileNotFoundError:
        if not idx.exists():
            raise
        return "its pack file is missing"
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 12, 0)
        tail = os.pread(fd, 20, size - 20) if size >= 32 else b""
    finally:
        os.close(fd)
    if len(head) < 12 or head[:4] != b"PACK" or int.from_bytes(head[4:8], "big") not in (2, 3):
        return "its pack file is not a pack"
    if int.from_bytes(head[8:12], "big") != count or tail != data[-40:-20]:
        return "its pack is truncated or is not the pack its index describes"
    return None


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class PackHealth:
    """Which packs of one repository may be read; each is checked once per process.

    A pack's verdict is kept as long as its index and pack files are the
    same files (inode, size, mtime): a pack rebuilt by ``gc --repair`` is
    checked again.
    """

    def __init__(self, pack_dir: Path) -> None:
        self.pack_dir = pack_dir
        self._lock = threading.Lock()
        self._verdicts: dict[str, tuple[tuple[int, ...], str | None]] = {}
        self._warned: set[tuple[str, str]] = set()

    def problem(self, name: str, *, warn: bool = True) -> str | None:
        """Why pack ``name`` (a basename such as ``pack-<sha>``) is set aside, or None.

        The first time a pack is found set aside, a warning names it (unless
        ``warn`` is false: the caller reports it itself).  Raises
        FileNotFoundError when its index vanished meanwhile.
        """
        idx = self.pack_dir / f"{name}.idx"
        pack = self.pack_dir / f"{name}.pack"
        try:
            sig: tuple[int, ...] = _signature(idx) + _signature(pack)
        except FileNotFoundError:
            sig = _signature(idx)  # raises if the index is gone too
        with self._lock:
            known = self._verdicts.get(name)
        if known is None or known[0] != sig:
            known = (sig, index_problem(idx, pack))
        problem = known[1]
        with self._lock:
            self._verdicts[name] = (sig, problem)
            if problem is None or (name, problem) in self._warned:
                return problem
            self._warned.add((name, problem))  # without ``warn``: the caller says it
            if not warn:
                return problem
        log.warning("pack %s is set aside: %s; %s", name, problem, REMEDY)
        return problem

    def known_bad(self) -> dict[str, str]:
        """The packs found set aside so far in this process (no new checks)."""
        with self._lock:
            return {n: p for n, (_sig, p) in sorted(self._verdicts.items()) if p is not None}

    def set_aside(self, *, warn: bool = True) -> dict[str, str]:
        """Check every pack in the folder now; returns the set-aside ones: name -> why."""
        out: dict[str, str] = {}
        if not self.pack_dir.is_dir():
            return out
        for idx in sorted(self.pack_dir.glob("*.idx")):
            if idx.name.startswith("tmp_"):
                continue
            try:
                problem = self.problem(idx.stem, warn=warn)
            except FileNotFoundError:
                continue
            if problem is not None:
                out[idx.stem] = problem
        return out


def guard_store(store: Any, health: PackHealth) -> None:
    """Make dulwich's object store pass over set-aside packs.

    dulwich opens every ``.pack`` that has an ``.idx`` and reads the index
    at the first look-up of any object (packs are searched before loose
    objects), so one damaged index would break every read.  Its pack list
    is refreshed by ``_update_pack_cache``: wrapped here so that a pack the
    health check refuses is evicted as soon as it is listed.
    """
    original = getattr(store, "_update_pack_cache", None)
    cache = getattr(store, "_pack_cache", None)
    evict = getattr(store, "_evict_pack", None)
    if original is None or not isinstance(cache, dict) or evict is None:
        return  # another dulwich: leave it as it is

    def update() -> list[Any]:
        # Only packs opened just now need a look: a refused one is evicted,
        # so it comes back here at every listing (its verdict is cached).
        fresh = {id(p) for p in original()}
        kept = []
        for name, pack in list(store._pack_cache.items()):
            if id(pack) not in fresh:
                continue
            try:
                refused = health.problem(name) is not None
            except FileNotFoundError:
                refused = False  # vanished: dulwich drops it at its next listing
            if refused:
                evict(pack)
            else:
                kept.append(pack)
        return kept

    store._update_pack_cache = update


def object_ends(idx: Path, pack_size: int) -> array[int]:
    """Every object's offset in the pack, sorted, then where the last one ends.

    An object runs from its offset to the next object's (or to the pack's
    SHA-1 trailer): what a reader needs to read a compressed object in one
    piece, and no more.  The index is trusted only as a hint: a reader
    bounds every read by the pack's size and reads on when a stream needs
    more.  Empty when the index cannot be read as expected (a reader then
    guesses as before).
    """
    out: array[int] = array("Q")
    try:
        data = idx.read_bytes()
    except OSError:
        return out
    parsed = _index_count(data)
    if isinstance(parsed, str):
        return out
    count, head = parsed
    if head:  # v2: 32-bit offsets after the ids and CRC-32s; the MSB points into the 64-bit ones
        at = head + _FANOUT + 24 * count
        small = array("I", data[at : at + 4 * count])
        large = array("Q", data[at + 4 * count : len(data) - _TRAILER])
        if sys.byteorder == "little":
            small.byteswap()
            large.byteswap()
        if max(small, default=0) < 0x80000000:
            out = array("Q", small)  # a pack under 2 GiB: no 64-bit offsets
        else:
            for off in small:
                if off & 0x80000000:
                    i = off & 0x7FFFFFFF
                    if i >= len(large):
                        return array("Q")
                    off = large[i]
                out.append(off)
    else:  # v1: (offset, id) pairs after the fan-out table
        rows = struct.iter_unpack(">L20x", data[_FANOUT : _FANOUT + 24 * count])
        out.extend(off for (off,) in rows)
    ordered = array("Q", sorted(out))
    ordered.append(max(pack_size - 20, 0))
    return ordered
