"""Dirty bitmaps: QEMU's record of the disk clusters a guest wrote, so a save reads only those.

For a VM that VML runs, each disk gets a dirty bitmap (``vml-<random>``,
64 KiB granularity), persistent on qcow2 (QEMU stores it in the image when
it closes it; a bitmap still flagged *in use* afterwards means QEMU did not
close it cleanly and it is not trusted); on a raw disk QEMU keeps it only
while it runs, so VML reads a raw disk's bitmap when it ends QEMU (``vml
stop``) and keeps the dirty ranges in ``.vml/dirty-<bitmap>.ranges``
(:func:`write_kept`).  VML remembers, in ``.vml/bitmaps.json``, which bitmap of
which disk has recorded every write since the disk held which entry
(``since``), with the disk's inode and virtual size then.  A save trusts a
bitmap only when that entry is the one the area holds and its cache
vouches for (and the save's parent), the inode and size still match, and
QEMU (or the image) says the bitmap is there, recording and consistent;
otherwise the disk is read whole, and the save says why.

At each live save the bitmaps are rotated in one QMP ``transaction``
(disable the current one, add the next), and the disabled one is read
through an NBD export of the disk (``block-export-add`` with
``bitmaps``) by ``qemu-img map --output=json`` with ``x-dirty-bitmap``,
which reports dirty extents as ``"data": false``.  A VM at rest with a
persistent bitmap has it in the qcow2 file, read there (``qcow2``: what
``qemu-nbd -r -B NAME`` would export, without starting QEMU's tools).
Bitmaps count guest offsets; :func:`file_ranges` turns them into ranges of
the image file (the same for raw, mapped through qcow2's tables).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from vml.errors import QMPError, VMControlError
from vml.plumbing.vm import qcow2
from vml.plumbing.vm.ignore import VML_DIR

if TYPE_CHECKING:
    from vml.plumbing.vm.qmp import QMPClient

GRANULARITY = 1 << 16
PREFIX = "vml-"
RECORDS = "bitmaps.json"
_TIMEOUT = 30.0


def new_name() -> str:
    """A fresh bitmap name: random, so a copy of another area's image never matches."""
    return PREFIX + secrets.token_hex(8)


@dataclass
class Record:
    """A bitmap that has recorded every write to one disk since it held entry ``since``."""

    name: str
    since: str | None  # entry id (hex); None: not yet known (a save in progress)
    inode: int
    size: int  # the disk's virtual size when it started
    persistent: bool
    # A raw disk's dirty ranges, in a file of ``.vml/`` (``write_kept``):
    # ``kept``, every write since ``since`` up to when QEMU closed the disk
    # (the bitmap is gone; only valid at rest); ``carried``, the writes of
    # earlier runs since ``since``, which bitmap ``name`` does not hold.
    kept: str | None = None
    carried: str | None = None


def _records_path(area: Path) -> Path:
    return area / VML_DIR / RECORDS


def load_records(area: Path) -> dict[str, Record]:
    """Disk path -> its bitmap record (empty when none or unreadable)."""
    try:
        doc = json.loads(_records_path(area).read_text())
        return {p: Record(**r) for p, r in doc.get("disks", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def save_records(area: Path, records: dict[str, Record]) -> None:
    """Write the records (atomically; an accelerator: no fsync); drop kept ranges none names."""
    path = _records_path(area)
    if not records:
        path.unlink(missing_ok=True)
    else:
        doc = {"vml_bitmaps": 1, "disks": {p: _as_doc(r) for p, r in sorted(records.items())}}
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(doc) + "\n")
            os.replace(tmp, path)
    named = {n for r in records.values() for n in (r.kept, r.carried) if n}
    _drop_kept(area, named)


def _as_doc(r: Record) -> dict[str, Any]:
    doc = asdict(r)
    for key in ("kept", "carried"):  # absent when unset: the records older VMLs wrote
        if doc[key] is None:
            del doc[key]
    return doc


def drop_records(area: Path) -> None:
    """Forget every bitmap record, and the ranges kept (the disks were rewritten by a checkout)."""
    _records_path(area).unlink(missing_ok=True)
    _drop_kept(area, set())


# --- a raw disk's dirty ranges, kept when QEMU ends ---------------------------------

KEPT_PREFIX = "dirty-"
KEPT_SUFFIX = ".ranges"
_KEPT_MAGIC = b"VML-DIRTY-RANGES 1\n"


class KeptUnusable(ValueError):
    """Kept dirty ranges that are missing, unreadable, or not those of the record."""


def _drop_kept(area: Path, keep: set[str]) -> None:
    """Remove the kept-ranges files of ``.vml/`` not named in ``keep``."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(area / VML_DIR):
            n = entry.name
            if n.startswith(KEPT_PREFIX) and n.endswith((KEPT_SUFFIX, ".tmp")) and n not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def write_kept(area: Path, rec: Record, ranges: list[tuple[int, int]]) -> str:
    """Keep ``ranges`` (dirty guest ranges of ``rec``'s disk) in ``.vml/``; the file's name.

    The file: a magic line, one line of JSON tying it to the record (its
    bitmap, ``since``, the disk's inode and virtual size), the ranges as
    zlib-compressed deltas of 64-bit offsets, and the xxh3-128 of all that
    before it.  Written aside and renamed (an accelerator: no fsync; a torn
    file fails its checksum and the disk is read whole).
    """
    name = f"{KEPT_PREFIX}{rec.name}{KEPT_SUFFIX}"
    deltas: list[int] = []
    prev = 0
    for a, b in ranges:
        deltas += (a - prev, b - a)
        prev = b
    head = {"bitmap": rec.name, "since": rec.since, "inode": rec.inode, "size": rec.size}
    body = (
        _KEPT_MAGIC
        + json.dumps(head, sort_keys=True).encode()
        + b"\n"
        + zlib.compress(struct.pack(f"<{len(deltas)}Q", *deltas), 1)
    )
    path = area / VML_DIR / name
    tmp = path.with_name(name + ".tmp")
    tmp.write_bytes(body + xxhash.xxh3_128_digest(body))
    os.replace(tmp, path)
    return name


def read_kept(area: Path, rec: Record, name: str | None) -> list[tuple[int, int]]:
    """The dirty guest ranges kept in ``name`` for ``rec``; ``KeptUnusable`` says why not."""
    if not name or not name.startswith(KEPT_PREFIX) or not name.endswith(KEPT_SUFFIX):
        raise KeptUnusable("no dirty ranges were kept for it")
    try:
        data = (area / VML_DIR / os.path.basename(name)).read_bytes()
    except OSError as e:
        raise KeptUnusable(f"its kept dirty ranges cannot be read ({e.strerror})") from None
    body, digest = data[:-16], data[-16:]
    if not body.startswith(_KEPT_MAGIC) or xxhash.xxh3_128_digest(body) != digest:
        raise KeptUnusable("its kept dirty ranges are damaged (checksum)")
    try:
        line, _, packed = body[len(_KEPT_MAGIC) :].partition(b"\n")
        head = json.loads(line)
        raw = zlib.decompress(packed)
        deltas = struct.unpack(f"<{len(raw) // 8}Q", raw)
    except (ValueError, struct.error, zlib.error) as e:
        raise KeptUnusable(f"its kept dirty ranges are damaged ({e})") from None
    bitmap = name[len(KEPT_PREFIX) : -len(KEPT_SUFFIX)]
    if head != {"bitmap": bitmap, "since": rec.since, "inode": rec.inode, "size": rec.size}:
        raise KeptUnusable("its kept dirty ranges are not those of its dirty bitmap's record")
    out: list[tuple[int, int]] = []
    prev = 0
    for i in range(0, len(deltas) - 1, 2):
        start = prev + deltas[i]
        prev = start + deltas[i + 1]
        out.append((start, prev))
    return out


# --- what QEMU says --------------------------------------------------------------


@dataclass(frozen=True)
class QemuBitmap:
    """One dirty bitmap as QEMU (``query-block``) or the image (``qemu-img info``) lists it."""

    name: str
    recording: bool
    inconsistent: bool
    granularity: int
    persistent: bool


def live_bitmaps(client: QMPClient) -> tuple[dict[str, list[QemuBitmap]], dict[str, str]]:
    """Device -> its bitmaps, and device -> its top node's name, from a running QEMU."""
    out: dict[str, list[QemuBitmap]] = {}
    nodes: dict[str, str] = {}
    for b in client.execute("query-block"):
        ins = b.get("inserted")
        if not isinstance(ins, dict):
            continue
        dev = str(b.get("device"))
        nodes[dev] = str(ins.get("node-name"))
        out[dev] = [
            QemuBitmap(
                str(m.get("name")),
                bool(m.get("recording")),
                bool(m.get("inconsistent", False)),
                int(m.get("granularity", 0)),
                bool(m.get("persistent", False)),
            )
            for m in ins.get("dirty-bitmaps", [])
        ]
    return out, nodes


def image_bitmaps(path: Path) -> list[QemuBitmap]:
    """The persistent bitmaps a qcow2 image at rest holds (its bitmap directory, as ``qemu-img info`` lists it).

    Read here, not by starting ``qemu-img``; a bitmap is *inconsistent*
    when flagged in use or when the image's bitmaps extension is not
    flagged consistent.  Raises ``qcow2.Unmappable`` or ``OSError`` for an
    image whose bitmaps cannot be read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        found = qcow2.stored_bitmaps(fd)
    finally:
        os.close(fd)
    return [QemuBitmap(b.name, b.auto, b.in_use, b.granularity, True) for b in found]


def virtual_size(path: Path, fmt: str) -> int | None:
    """The disk's size as the guest sees it (the file's size for raw)."""
    if fmt == "raw":
        return path.stat().st_size
    with contextlib.suppress(OSError, qcow2.Unmappable):
        fd = os.open(path, os.O_RDONLY)
        try:
            return qcow2.read_header(fd).size
        finally:
            os.close(fd)
    return None


def add(client: QMPClient, device: str, name: str, persistent: bool) -> None:
    """Start a bitmap on ``device`` (recording from now)."""
    client.execute(
        "block-dirty-bitmap-add",
        {"node": device, "name": name, "persistent": persistent, "granularity": GRANULARITY},
    )


def remove(client: QMPClient, device: str, name: str) -> None:
    """Drop a bitmap (from the image too, for a persistent one)."""
    client.execute("block-dirty-bitmap-remove", {"node": device, "name": name})


def rotate(client: QMPClient, steps: list[tuple[str, str | None, str, bool]]) -> None:
    """In one transaction, per ``(device, old, new, persistent)``: disable ``old``, add ``new``.

    Atomic: every write lands in exactly one of the two, and none is lost.
    """
    actions: list[dict[str, Any]] = []
    for device, old, new, persistent in steps:
        if old is not None:
            actions.append(
                {"type": "block-dirty-bitmap-disable", "data": {"node": device, "name": old}}
            )
        actions.append(
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": device,
                    "name": new,
                    "persistent": persistent,
                    "granularity": GRANULARITY,
                },
            }
        )
    if actions:
        client.execute("transaction", {"actions": actions})


def merge_back(client: QMPClient, device: str, old: str, new: str) -> None:
    """Undo a rotation whose save failed: ``new`` takes ``old``'s bits, ``old`` goes."""
    client.execute("block-dirty-bitmap-merge", {"node": device, "target": new, "bitmaps": [old]})
    remove(client, device, old)


# --- reading a bitmap --------------------------------------------------------------


def parse_map(text: str) -> list[tuple[int, int]]:
    """Dirty ``[start, end)`` guest ranges from ``qemu-img map --output=json`` over NBD.

    With ``x-dirty-bitmap`` the map reports the bitmap instead of the
    allocation: a dirty extent is one with ``"data": false``.
    """
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise VMControlError(f"qemu-img map said something unreadable: {e}", "") from None
    out: list[tuple[int, int]] = []
    for ext in doc:
        if not ext.get("data", True):
            start, length = int(ext["start"]), int(ext["length"])
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + length)
            else:
                out.append((start, start + length))
    return out


def _map_command(socket: Path, export: str, bitmap: str) -> list[str]:
    opts = (
        f"driver=nbd,server.type=unix,server.path={socket},export={export},"
        f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    )
    return ["qemu-img", "map", "--output=json", "--image-opts", opts]


def _maps(commands: list[list[str]]) -> list[list[tuple[int, int]]]:
    """Run the ``qemu-img map`` commands side by side; each one's dirty ranges."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for cmd in commands:
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=_TIMEOUT)
            if proc.returncode != 0:
                raise VMControlError(f"qemu-img map failed: {stderr.strip()}", "")
            out.append(parse_map(stdout))
        return out
    except OSError as e:
        raise VMControlError(f"cannot run qemu-img map: {e}", "install qemu-utils") from e
    except subprocess.TimeoutExpired as e:
        raise VMControlError("qemu-img map did not answer in time", "") from e
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _socket_dir() -> Iterator[Path]:
    """A private folder for NBD sockets (short path: a unix socket's is limited)."""
    d = Path(tempfile.mkdtemp(prefix="vml-nbd-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dirty_live(
    client: QMPClient, exports: list[tuple[str, str, str]]
) -> dict[str, list[tuple[int, int]]]:
    """Dirty guest ranges of each ``(device, node, bitmap)`` of a running (paused) QEMU.

    Every disk is exported at once and mapped side by side.
    """
    if not exports:
        return {}
    with _socket_dir() as d:
        sock = d / "nbd.sock"
        client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        added: list[str] = []
        try:
            for i, (device, node, bitmap) in enumerate(exports):
                eid = f"vml-export{i}"
                client.execute(
                    "block-export-add",
                    {"type": "nbd", "id": eid, "node-name": node, "name": device,
                     "bitmaps": [bitmap], "writable": False},
                )  # fmt: skip
                added.append(eid)
            found = _maps([_map_command(sock, dev, bitmap) for dev, _node, bitmap in exports])
        finally:
            for eid in added:
                with contextlib.suppress(QMPError):
                    client.execute("block-export-del", {"id": eid})
            with contextlib.suppress(QMPError):
                client.execute("nbd-server-stop")
    return {dev: ranges for (dev, _node, _b), ranges in zip(exports, found, strict=True)}


def dirty_at_rest(path: Path, bitmap: str) -> list[tuple[int, int]]:
    """Dirty guest ranges of a qcow2 image at rest: its stored bitmap ``bitmap``, read here.

    What ``qemu-nbd -r -B`` and ``qemu-img map`` answer (a test holds the
    two to the same answer), without starting either.  Raises
    ``qcow2.Unmappable`` for a bitmap that is missing or cannot be read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        found = next((b for b in qcow2.stored_bitmaps(fd) if b.name == bitmap), None)
        if found is None:
            raise qcow2.Unmappable(f"its dirty bitmap {bitmap} is missing from the image")
        return qcow2.stored_dirty_ranges(fd, found)
    finally:
        os.close(fd)


def file_ranges(
    path: Path,
    fmt: str,
    dirty: list[tuple[int, int]],
    known_data: qcow2.DataMap | None = None,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The ranges of the image *file* that may differ, given the dirty *guest* ranges.

    Two lists: what the guest wrote, and what may have changed besides
    (worth comparing before copying).  Raw: the same offsets, and nothing
    besides.  qcow2: the dirty clusters' data, and all the rest but the
    clean clusters' data (see ``qcow2``; ``known_data``: its data clusters
    as read a moment before); raises ``qcow2.Unmappable`` for an image that
    cannot be mapped.
    """
    if fmt == "raw":
        return list(dirty), []
    fd = os.open(path, os.O_RDONLY)
    try:
        return qcow2.changed_ranges(fd, dirty, known_data)
    finally:
        os.close(fd)


def changed_pages(
    fd: int,
    ranges: list[tuple[int, int]],
    block_size: int,
    page_size: int,
    page_hashes: Callable[[int], bytes | None],
) -> list[tuple[int, int]]:
    """The pages of ``ranges`` whose xxh3-64 differs from ``page_hashes(block)`` (the cache's).

    A qcow2's metadata is a few MiB and mostly unchanged between saves:
    comparing it page by page with what the area's entry held keeps the
    copy, and the save, to the pages that really changed.
    """
    out: list[tuple[int, int]] = []
    per = block_size // page_size
    for start, end in ranges:
        a = start // page_size * page_size
        data = os.pread(fd, end - a + page_size, a)
        for off in range(a, min(end, a + len(data)), page_size):
            page = data[off - a : off - a + page_size]
            n, k = divmod(off // page_size, per)
            old = page_hashes(n)
            if old is None or old[8 * k : 8 * k + 8] != xxhash.xxh3_64_digest(page):
                if out and out[-1][1] == off:
                    out[-1] = (out[-1][0], off + len(page))
                else:
                    out.append((off, off + len(page)))
    return out


def data_clusters(path: Path) -> qcow2.DataMap:
    """A qcow2 image's data clusters (a map of its host clusters), its L2 tables read whole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return qcow2.data_clusters(fd)
    finally:
        os.close(fd)
