"""Save a VM that VML runs without shutting it down: pause, copy aside, continue.

``live_snapshot(area)`` is a context manager for a VM under ``vml run``:

1. QMP ``stop`` (QEMU drains and flushes its block layer), then each
   disk's dirty bitmap is rotated in one QMP ``transaction`` (disable the
   current one, start the next);
2. copy the memory file and every disk image aside into
   ``<area>/.vml/stage/<pid>/`` (holes stay holes; a reflink where the
   file system can) -- or, given a :class:`Reference` of what the area's
   entry held, only what changed since, at its own offset in a sparse
   copy: a disk's dirty clusters (the disabled bitmap read through NBD)
   and, for a qcow2, the metadata pages whose xxh3 differs from the
   entry's; the memory file's blocks whose xxh3 differs from the entry's
   (``LiveSnapshot.changed`` lists the ranges copied);
3. ``migrate`` the device state (``x-ignore-shared``: the RAM file is left
   out, ~0.5 MB) there too (after the copies: the migration ends by
   handing the disks over, which drops their page cache);
4. ``cont``: the guest goes on, and the caller reads the copies at leisure.

It yields a ``LiveSnapshot``: ``files`` maps the area-relative name each
copy stands for (``<stem>.ram``, each disk, and ``<stem>.vmstate``, a name
the area itself never holds while the VM runs) to the staged file, and
``pause_seconds`` is how long the guest was stopped.  The VM is continued
on any error, and the stage is removed on exit.  Should the saving process
die while the guest is paused, ``vml run --continue`` continues it (and
``vml status`` says it is paused).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from vml.errors import AreaError, QMPError, VMControlError
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.description import STATE_SUFFIX, QemuSpec, find_spec
from vml.plumbing.vm.formats import data_ranges
from vml.plumbing.vm.qcow2 import DataMap, Unmappable, merge_ranges
from vml.plumbing.vm.qemu import (
    RunPaths,
    StateHeader,
    copy_sparse,
    current_machine,
    now_iso,
    read_run_info,
    save_device_state,
    vml_vm,
)
from vml.plumbing.vm.qmp import QMPClient


@dataclass(frozen=True)
class Reference:
    """What the area's entry held of one file, so that only what changed since is copied.

    ``size`` and ``block_size`` are the file's then; a memory file gives
    ``hashes`` (the xxh3-128 of its block ``n`` then, None if unknown), a
    disk the ``bitmap`` that has recorded every write to it since and its
    ``pages`` hashes (to copy only the metadata pages that changed).
    """

    block_size: int
    size: int
    hashes: Callable[[int], bytes | None] | None = None
    bitmap: str | None = None
    # A disk's page hashes then (xxh3-64 of each page of block n), and the page size.
    pages: Callable[[int], bytes | None] | None = None
    page_size: int = 4096
    # A raw disk's dirty guest ranges of earlier runs since the entry, which
    # ``bitmap`` (started at the last `vml run`) does not hold.
    carried: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Rotation:
    """A disk's bitmaps after the pause: ``new`` records from it on, ``old`` (if any) up to it."""

    path: str
    device: str
    old: str | None
    new: str
    persistent: bool


@dataclass
class LiveSnapshot:
    """A consistent copy of a running VM's memory, device state and disks."""

    #: Area-relative name -> staged copy (memory file, disks, device state).
    files: dict[str, Path]
    #: How long the guest was stopped, in seconds.
    pause_seconds: float
    #: What the device state records about the QEMU that saved it.
    header: StateHeader
    #: Bytes of data copied while paused (holes and reflinks cost none).
    copied_bytes: int = 0
    #: Time of each step while paused: stop, device state, copies, cont.
    steps: dict[str, float] = field(default_factory=dict)
    #: Area path -> the byte ranges copied (a memory file's: whole blocks;
    #: a disk's: its dirty clusters); the copy holds nothing else.  A file
    #: not listed was copied whole.
    changed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: The disks' bitmaps as the pause left them (see ``settle_rotations``).
    rotations: list[Rotation] = field(default_factory=list)
    #: Why a file was copied whole although a reference was given.
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        """What an entry records of this save (``vm.live`` in its metadata)."""
        h = self.header
        return {
            "pause_seconds": round(self.pause_seconds, 4),
            "state_file": next(p for p in self.files if p.endswith(STATE_SUFFIX)),
            "qemu": h.qemu,
            "machine": h.machine,
            "accel": h.accel,
            "saved": h.saved,
            "steps": {k: round(v, 4) for k, v in self.steps.items()},
            "copied_bytes": self.copied_bytes,
        }


def _disk_files(area: Path, spec: QemuSpec) -> list[str]:
    """Disk images the VM writes (backing files are read-only to QEMU, not copied)."""
    out = []
    for d in spec.disks:
        if not (area / d.path).is_file():
            raise AreaError(f"disk {d.path} of {spec.stem} is missing", "")
        out.append(d.path)
    return out


def _drop_dead_stages(root: Path) -> None:
    """Remove what killed saves left in ``.vml/stage/<pid>/`` (their pid is gone)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name.isdigit() and not Path(f"/proc/{name}").exists():
            shutil.rmtree(root / name, ignore_errors=True)


def _staged_name(stage: Path, rel: str) -> Path:
    dest = stage / "files" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


@dataclass
class _Pause:
    """What happens while the guest is paused, and what it leaves."""

    area: Path
    spec: QemuSpec
    stage: Path
    refs: Mapping[str, Reference]
    files: dict[str, Path] = field(default_factory=dict)
    changed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    rotations: list[Rotation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    copied: int = 0
    # A qcow2 disk's data clusters, read before the pause (see qcow2.data_clusters).
    known_data: dict[str, DataMap] = field(default_factory=dict)


def _plan_rotations(client: QMPClient, p: _Pause) -> dict[str, str]:
    """Each disk's rotation (a new bitmap; the old one when it can be trusted); device -> node."""
    present, nodes = bitmaps.live_bitmaps(client)
    for i, d in enumerate(p.spec.disks):
        dev = f"vml-disk{i}"
        ref = p.refs.get(d.path)
        old = ref.bitmap if ref is not None else None
        if old is not None:
            found = next((b for b in present.get(dev, []) if b.name == old), None)
            why = None
            if found is None:
                why = "QEMU has no such bitmap (was it restarted?)"
            elif found.inconsistent:
                why = "it is flagged inconsistent"
            elif not found.recording or found.granularity != bitmaps.GRANULARITY:
                why = "it is not recording"
            if why is not None:
                p.notes.append(
                    f"{d.path}: read whole: its dirty bitmap {old} cannot be used ({why})"
                )
                old = None
        if old is not None and d.format == "qcow2":
            # The L2 tables read whole now, while the guest runs: the pause
            # then reads only those of the dirty clusters.
            # (Unmappable: the pause finds it again and says so.)
            with contextlib.suppress(Unmappable, OSError):
                p.known_data[d.path] = bitmaps.data_clusters(p.area / d.path)
        new = bitmaps.new_name()
        p.rotations.append(Rotation(d.path, dev, old, new, d.format == "qcow2"))
    return nodes


def _rotate(client: QMPClient, p: _Pause) -> None:
    try:
        bitmaps.rotate(client, [(r.device, r.old, r.new, r.persistent) for r in p.rotations])
    except QMPError as e:
        p.notes.append(f"the disks' dirty bitmaps could not be rotated ({e.message}): read whole")
        p.rotations = []


def _dirty_disks(
    client: QMPClient, p: _Pause, nodes: dict[str, str]
) -> dict[str, list[tuple[int, int]]]:
    """File ranges that changed, per disk whose old bitmap is read (guest offsets mapped)."""
    wanted = [(r.device, nodes.get(r.device, r.device), r.old) for r in p.rotations if r.old]
    if not wanted:
        return {}
    try:
        dirty = bitmaps.dirty_live(client, [(dev, node, str(old)) for dev, node, old in wanted])
    except (QMPError, VMControlError) as e:
        p.notes.append(f"the disks' dirty bitmaps could not be read ({e.message}): read whole")
        return {}
    out: dict[str, list[tuple[int, int]]] = {}
    fmt = {d.path: d.format for d in p.spec.disks}
    for r in p.rotations:
        if r.device not in dirty:
            continue
        src = p.area / r.path
        ref = p.refs[r.path]
        try:
            guest = dirty[r.device]
            if ref.carried:
                guest = merge_ranges(ref.carried + guest)
            written, rest = bitmaps.file_ranges(src, fmt[r.path], guest, p.known_data.get(r.path))
            if rest and ref.pages is not None:
                rest = _pages_that_changed(src, rest, ref)
        except (Unmappable, OSError) as e:
            p.notes.append(f"{r.path}: read whole: {e}")
            continue
        ranges = written + rest
        size = src.stat().st_size
        if size != ref.size:  # the file grew (or shrank): its new end is read whole
            ranges.append((min(size, ref.size) // ref.block_size * ref.block_size, size))
        # Only the changed bytes: the save fills the rest of their blocks
        # from the parent (the clean bytes need not be in any cache now).
        out[r.path] = merge_ranges([(a, min(b, size)) for a, b in ranges if a < size])
    return out


def _pages_that_changed(
    path: Path, ranges: list[tuple[int, int]], ref: Reference
) -> list[tuple[int, int]]:
    assert ref.pages is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        return bitmaps.changed_pages(fd, ranges, ref.block_size, ref.page_size, ref.pages)
    finally:
        os.close(fd)


def _aligned(ranges: list[tuple[int, int]], block: int, size: int) -> list[tuple[int, int]]:
    """Whole blocks covering ``ranges``, merged, within ``size``."""
    return merge_ranges(
        [(a // block * block, min(-(-b // block) * block, size)) for a, b in ranges if a < size]
    )


#: Bytes of a memory file mapped at once while hashing it: its pages count in
#: the process's resident set while mapped (RSS stays flat whatever the RAM).
HASH_WINDOW = 16 << 20


def _changed_blocks(path: Path, ref: Reference) -> list[tuple[int, int]]:
    """The blocks of a memory file whose xxh3-128 differs from the reference's (memory speed).

    The file is mapped a window at a time (reading it would copy every byte
    in the guest's pause; one mapping of it whole would put the guest's RAM
    in VML's resident set).
    """
    assert ref.hashes is not None
    bs = ref.block_size
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = data_ranges(fd, size) if size else []
        window = max(1, HASH_WINDOW // bs) * bs
        if window % mmap.ALLOCATIONGRANULARITY:
            window = bs * mmap.ALLOCATIONGRANULARITY  # offsets must be page-aligned
        i = 0
        for w in range(0, size, window):
            w_end = min(w + window, size)
            while i < len(data) and data[i][1] <= w:
                i += 1
            if i < len(data) and data[i][0] < w_end:
                with mmap.mmap(fd, w_end - w, access=mmap.ACCESS_READ, offset=w) as mm:
                    out += _changed_in_window(memoryview(mm), w, w_end, bs, data[i:], ref)
            else:  # the whole window is a hole
                out += _changed_in_window(None, w, w_end, bs, [], ref)
    finally:
        os.close(fd)
    return merge_ranges(out)


def _changed_in_window(
    view: memoryview | None,
    base: int,
    stop: int,
    bs: int,
    data: list[tuple[int, int]],
    ref: Reference,
) -> list[tuple[int, int]]:
    """The changed blocks of the window ``[base, stop)`` (``view`` None: it is a hole)."""
    assert ref.hashes is not None
    out: list[tuple[int, int]] = []
    i = 0
    try:
        for start in range(base, stop, bs):
            blk_end = min(start + bs, stop)
            while i < len(data) and data[i][1] <= start:
                i += 1
            if view is not None and i < len(data) and data[i][0] < blk_end:
                h = xxhash.xxh3_128_digest(view[start - base : blk_end - base])
            else:
                h = _zero_hash(blk_end - start)  # a hole: zeros, never read
            if h != ref.hashes(start // bs):
                out.append((start, blk_end))
    finally:
        if view is not None:
            view.release()  # the mapping closes only with no view left
    return out


_ZERO_HASHES: dict[int, bytes] = {}


def _zero_hash(length: int) -> bytes:
    h = _ZERO_HASHES.get(length)
    if h is None:
        h = _ZERO_HASHES[length] = xxhash.xxh3_128_digest(bytes(length))
    return h


def copy_ranges(src: Path, dst: Path, ranges: list[tuple[int, int]]) -> int:
    """A sparse copy of ``src`` holding only ``ranges`` (at their offsets); bytes copied.

    Like ``copy_sparse`` it carries ``src``'s permission bits and times;
    everything outside ``ranges`` is a hole, which the caller must not read.
    """
    copied = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        st = os.fstat(fi.fileno())
        try:
            os.ftruncate(fo.fileno(), st.st_size)
            for a, b in ranges:
                off = a
                while off < b:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), b - off, off, off)
                    if n <= 0:
                        break
                    off += n
                copied += off - a
        finally:
            os.fchmod(fo.fileno(), st.st_mode & 0o7777)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return copied


def _copy_files(p: _Pause, dirty: dict[str, list[tuple[int, int]]]) -> None:
    """Copy the memory file and the disks aside: only what changed, where a reference says."""
    for rel in [p.spec.ram_file, *_disk_files(p.area, p.spec)]:
        dest = _staged_name(p.stage, rel)
        ref = p.refs.get(rel)
        ranges = dirty.get(rel)
        src = p.area / rel
        if ranges is None and ref is not None and ref.hashes and src.stat().st_size == ref.size:
            ranges = _changed_blocks(src, ref)
        if ranges is None:
            # A disk's unwritten extents (an ext4 journal mke2fs made) stay
            # holes: QEMU's `stop` flushed the disks, so this writes nothing
            # back; the memory file's dirty pages are the guest's RAM.
            disk = rel != p.spec.ram_file
            p.copied += copy_sparse(p.area / rel, dest, skip_unwritten=disk)
        else:
            p.copied += copy_ranges(p.area / rel, dest, ranges)
            p.changed[rel] = ranges
        p.files[rel] = dest


def _pause_and_copy(client: QMPClient, p: _Pause) -> StateHeader:
    """Stop, rotate the bitmaps, copy what changed, save device state; the caller continues."""
    info = read_run_info(p.area)
    nodes = _plan_rotations(client, p)
    t = time.monotonic()
    client.execute("stop")
    p.steps["stop"] = time.monotonic() - t
    t = time.monotonic()
    _rotate(client, p)
    p.steps["bitmaps"] = time.monotonic() - t
    header = StateHeader(
        qemu=str(info.get("qemu", "")) or _version(client),
        machine=current_machine(client),
        arch=p.spec.arch,
        accel=str(info.get("accel", "tcg")),
        memory_mib=p.spec.memory_mib,
        ram_file=p.spec.ram_file,
        saved=now_iso(),
    )
    # The disks and memory first: the device state's migration ends by
    # handing the block devices over (QEMU stores qcow2 bitmaps, drops the
    # disks' page cache), after which reading them costs disk reads.
    t = time.monotonic()
    dirty = _dirty_disks(client, p, nodes)
    p.steps["dirty_map"] = time.monotonic() - t
    t = time.monotonic()
    _copy_files(p, dirty)
    p.steps["copy"] = time.monotonic() - t
    t = time.monotonic()
    state = _staged_name(p.stage, p.spec.state_file)
    save_device_state(client, state, header)
    p.files[p.spec.state_file] = state
    p.steps["device_state"] = time.monotonic() - t
    return header


def _version(client: QMPClient) -> str:
    v = client.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
    return f"{v.get('major', 0)}.{v.get('minor', 0)}.{v.get('micro', 0)}"


@contextlib.contextmanager
def live_snapshot(
    area: Path, refs: Mapping[str, Reference] | None = None, *, timeout: float = 30.0
) -> Iterator[LiveSnapshot]:
    """Pause the VM VML runs for ``area``, copy its state aside, continue it; see the module doc.

    ``refs`` (area path -> what the area's entry held of it) lets the
    pause copy only what changed since.  The caller holds the area's lock,
    and settles the disks' bitmaps afterwards (``settle_rotations``).
    Raises ``VMControlError`` when no VM runs under ``vml run`` here, or it
    is paused after an interrupted save (``vml run --continue`` first).
    """
    spec = find_spec(area)
    running = vml_vm(area)
    if spec is None or running is None:
        raise VMControlError(f"no VM runs under `vml run` in {area}", "start it with `vml run`")
    paths = RunPaths(area)
    _drop_dead_stages(paths.stage)
    stage = paths.stage / str(os.getpid())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    p = _Pause(area, spec, stage, refs or {})
    try:
        with QMPClient.connect(paths.qmp, timeout=timeout) as client:
            status = client.execute("query-status").get("status")
            if status != "running":
                raise VMControlError(
                    f"the VM in {area} is {status}, not running",
                    "`vml run --continue` continues it; then save again",
                )
            t0 = time.monotonic()
            try:
                header = _pause_and_copy(client, p)
            finally:
                # Whatever happened, the guest goes on (a QMP failure here is
                # reported, and `vml run --continue` is the way out).
                t = time.monotonic()
                try:
                    client.execute("cont", timeout=timeout)
                except QMPError as e:
                    raise VMControlError(
                        f"the VM in {area} was paused and could not be continued: {e.message}",
                        "run `vml run --continue`",
                    ) from e
                pause = time.monotonic() - t0
            p.steps["cont"] = time.monotonic() - t
        yield LiveSnapshot(
            p.files, pause, header, p.copied, p.steps, p.changed, p.rotations, p.notes
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.stage.rmdir()  # when no other save uses it


def settle_rotations(area: Path, rotations: list[Rotation], saved: bool) -> list[Rotation]:
    """After the save: keep only each disk's new bitmap, or fold the old one back into it.

    ``saved``: the new bitmaps start at the new entry; every other ``vml-``
    bitmap of the disk goes.  Otherwise each new bitmap takes its old one's
    bits (QMP ``block-dirty-bitmap-merge``), so it covers everything since
    the area's entry again, or goes where no old one was trusted.  Returns
    the rotations settled; those not (QEMU gone or refusing) must not be
    trusted.
    """
    done: list[Rotation] = []
    if not rotations:
        return done
    try:
        with QMPClient.connect(RunPaths(area).qmp, timeout=10.0) as client:
            present, _nodes = bitmaps.live_bitmaps(client)
            for r in rotations:
                try:
                    if r.old is not None and not saved:
                        bitmaps.merge_back(client, r.device, r.old, r.new)
                    keep = r.new if saved or r.old is not None else None
                    for b in present.get(r.device, []):
                        if b.name.startswith(bitmaps.PREFIX) and b.name not in (keep, r.old):
                            bitmaps.remove(client, r.device, b.name)
                    if r.old is not None and saved:
                        bitmaps.remove(client, r.device, r.old)
                    if keep is not None:
                        done.append(r)
                except QMPError:
                    continue
    except QMPError:
        pass
    return done
