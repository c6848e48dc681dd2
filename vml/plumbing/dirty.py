"""What changed in an area's disks since its entry: dirty bitmaps, trusted only where the cache agrees.

A dirty bitmap (``vm/bitmaps.py``) says which guest clusters QEMU wrote;
it is trusted for a save only when everything below holds, and otherwise
the disk is read whole (every block holding data) and the save says why:

- the save is incremental on the entry the area holds, and the area cache
  is valid for that entry (so its records vouch for every block the bitmap
  says did not change);
- the bitmap's record names that entry as where it started, and the disk
  is the same file (inode) of the same virtual size;
- QEMU (a running VM) or the image (a qcow2 at rest) has the bitmap,
  recording and consistent (not left *in use* by a QEMU that died).

This module decides; ``vm/bitmaps.py`` and ``vm/live.py`` talk to QEMU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vml.errors import VMControlError
from vml.plumbing.areas import load_state, stat_signature
from vml.plumbing.cache import BlockRecords, Cache, CachedFile
from vml.plumbing.images import Changed
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.description import QemuDisk, QemuSpec
from vml.plumbing.vm.qcow2 import Unmappable
from vml.plumbing.vm.qemu import closed_stats

if TYPE_CHECKING:  # a save at rest does not import what only live saves use
    from vml.plumbing.vm.live import Reference, Rotation
    from vml.plumbing.vm.qmp import QMPClient


def _distrust(
    area: Path, disk: QemuDisk, cf: CachedFile | None, rec: bitmaps.Record | None, held: str
) -> str | None:
    """Why the bitmap record of ``disk`` cannot be trusted for a save on ``held`` (None: it can)."""
    if rec is None:
        return "no dirty bitmap records its writes (one starts at `vml run` after a save)"
    if rec.since != held:
        return f"its dirty bitmap {rec.name} started before the entry the area holds"
    if cf is None or cf.kind != "image":
        return "the area cache does not describe it"
    path = area / disk.path
    try:
        st = os.stat(path)
    except OSError as e:
        return f"it cannot be looked at ({e.strerror})"
    if st.st_ino != rec.inode:
        return "it is not the file its dirty bitmap was started on"
    if bitmaps.virtual_size(path, disk.format) != rec.size:
        return "its size changed since its dirty bitmap started"
    return None


@dataclass
class LiveRefs:
    """What a live save may copy less of: per file, what the area's entry held."""

    refs: dict[str, Reference] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    held: str | None = None  # the entry the references describe
    opened: list[BlockRecords] = field(default_factory=list)

    def close(self) -> None:
        """Close the cache records the references read."""
        for r in self.opened:
            r.close()
        self.opened = []


def live_refs(area: Path, spec: QemuSpec, cache: Cache, held: str | None) -> LiveRefs:
    """References for a live save incremental on ``held`` (nothing when the cache is not valid)."""
    from vml.plumbing.vm.live import Reference

    out = LiveRefs(held=held)
    if held is None:
        return out
    if not cache.valid_for(held):
        out.notes.append("the area cache does not describe the area's entry: its files read whole")
        return out
    records = bitmaps.load_records(area)
    ram = cache.files.get(spec.ram_file)
    recs = cache.records(spec.ram_file) if ram is not None and ram.kind == "image" else None
    if recs is not None:
        out.opened.append(recs)
        if recs.nblocks:
            out.refs[spec.ram_file] = Reference(cache.block_size, recs.size, recs.block_hash)
    for disk in spec.disks:
        cf = cache.files.get(disk.path)
        why = _distrust(area, disk, cf, records.get(disk.path), held)
        if why is None and cf is not None:
            rec = records[disk.path]
            pages = cache.records(disk.path)
            if pages is not None:
                out.opened.append(pages)
                pages.nblocks  # noqa: B018 (its checksum checked now, not in the pause)
            out.refs[disk.path] = Reference(
                cache.block_size,
                cf.size,
                bitmap=rec.name,
                pages=pages.page_hashes_or_none if pages is not None else None,
                page_size=cache.page_size,
            )
        elif cf is not None and cf.kind == "image":
            out.notes.append(f"{disk.path}: read whole: {why}")
    return out


def settle_live(
    area: Path,
    spec: QemuSpec,
    rotations: list[Rotation],
    settled: list[Rotation],
    entry: str | None,
) -> None:
    """Record the bitmaps a live save left: each new one starts at ``entry`` (None: the save failed).

    A rotation not settled (QEMU refused or went away) is forgotten.
    After a failed save, a disk whose old bitmap was folded back into the
    new one keeps its old starting point.
    """
    records = bitmaps.load_records(area)
    fmt = {d.path: d.format for d in spec.disks}
    ok = {r.new for r in settled}
    for r in rotations:
        old = records.pop(r.path, None)
        if r.new not in ok:
            continue
        since = entry if entry is not None else (old.since if r.old is not None and old else None)
        if since is None:
            continue
        path = area / r.path
        size = bitmaps.virtual_size(path, fmt[r.path])
        if size is not None:
            records[r.path] = bitmaps.Record(r.new, since, path.stat().st_ino, size, r.persistent)
    bitmaps.save_records(area, records)


def at_rest(
    area: Path, spec: QemuSpec, cache: Cache | None, held: str | None, read: set[str]
) -> tuple[dict[str, Changed], list[str]]:
    """What changed in the disks ``read`` (their stat differs from the cache's) of a VM at rest.

    Only a qcow2 image keeps its bitmap at rest (``qemu-nbd -r -B``).
    """
    out: dict[str, Changed] = {}
    notes: list[str] = []
    if held is None or cache is None or not cache.valid_for(held):
        return out, notes
    records = bitmaps.load_records(area)
    closed = closed_stats(area, spec)
    for disk in spec.disks:
        if disk.path not in read:
            continue
        cf = cache.files.get(disk.path)
        rec = records.get(disk.path)
        why = _distrust(area, disk, cf, rec, held)
        if why is None and disk.format == "raw":
            why = "QEMU keeps a raw disk's dirty bitmap only while the VM runs"
        if why is None and (closed is None or closed.get(disk.path) != _signature(area, disk)):
            # Written since QEMU closed it: by something its bitmap did not see.
            why = "it changed since QEMU closed it"
        if why is None and rec is not None and cf is not None:
            why = _at_rest_ranges(area, disk, rec, cf, cache, out)
        if why is not None and cf is not None and cf.kind == "image":
            notes.append(f"{disk.path}: read whole: {why}")
    return out, notes


def _signature(area: Path, disk: QemuDisk) -> list[int] | None:
    try:
        return stat_signature(os.stat(area / disk.path))
    except OSError:
        return None


def _pages_that_changed(
    cache: Cache, path: Path, rel: str, ranges: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Of ``ranges`` (a qcow2's metadata and such), the pages that differ from the cache's."""
    recs = cache.records(rel)
    if recs is None or not recs.nblocks:
        return ranges
    fd = os.open(path, os.O_RDONLY)
    try:
        return bitmaps.changed_pages(
            fd, ranges, cache.block_size, cache.page_size, recs.page_hashes_or_none
        )
    finally:
        os.close(fd)
        recs.close()


def _at_rest_ranges(
    area: Path,
    disk: QemuDisk,
    rec: bitmaps.Record,
    cf: CachedFile,
    cache: Cache,
    out: dict[str, Changed],
) -> str | None:
    path = area / disk.path
    try:
        found = next((b for b in bitmaps.image_bitmaps(path) if b.name == rec.name), None)
    except (Unmappable, OSError) as e:
        return f"its dirty bitmap could not be read ({e})"
    if found is None:
        return f"its dirty bitmap {rec.name} is missing from the image"
    if found.inconsistent:
        return f"its dirty bitmap {rec.name} is flagged in use (QEMU did not close the image)"
    if not found.recording or found.granularity != bitmaps.GRANULARITY:
        return f"its dirty bitmap {rec.name} is not recording"
    try:
        dirty = bitmaps.dirty_at_rest(path, rec.name)
        written, rest = bitmaps.file_ranges(path, disk.format, dirty)
        if rest:
            rest = _pages_that_changed(cache, path, disk.path, rest)
    except (VMControlError, Unmappable, OSError) as e:
        return f"its dirty bitmap could not be read ({e})"
    ranges = written + rest
    size = path.stat().st_size
    if size > cf.size:
        ranges.append((cf.size, size))  # the file grew
    out[disk.path] = Changed(sorted(ranges), partial=False)
    return None


# --- vml run -------------------------------------------------------------------


@dataclass(frozen=True)
class StartPlan:
    """Per disk, decided before QEMU opens it: the bitmap to keep, and whether to start one."""

    keep: dict[str, str]  # disk path -> a recorded bitmap still good to use
    fresh: set[str]  # disks unchanged since the area's entry (a new bitmap may start now)
    entry: str | None


def start_plan(area: Path, spec: QemuSpec) -> StartPlan:
    """What ``vml run`` can trust of each disk, from the cache and the records, before QEMU starts."""
    state = load_state(area)
    entry = state.entry if state is not None else None
    cache = Cache.peek(area)
    keep: dict[str, str] = {}
    fresh: set[str] = set()
    if entry is None or not cache.valid_for(entry):
        return StartPlan(keep, fresh, None)
    records = bitmaps.load_records(area)
    for disk in spec.disks:
        cf = cache.files.get(disk.path)
        try:
            if _distrust(area, disk, cf, records.get(disk.path), entry) is None:
                keep[disk.path] = records[disk.path].name
            if cf is not None and cf.stat == stat_signature(os.stat(area / disk.path)):
                fresh.add(disk.path)
        except OSError:
            continue
    return StartPlan(keep, fresh, entry)


def start_bitmaps(client: QMPClient, area: Path, spec: QemuSpec, plan: StartPlan) -> None:
    """With QEMU started (not yet running the guest): keep, start or drop each disk's bitmap.

    A kept bitmap must be there, recording and consistent; stale ``vml-``
    bitmaps (an earlier run's, or one left in use by a QEMU that died) are
    removed, so they do not pile up in qcow2 images.
    """
    records = bitmaps.load_records(area)
    present, _nodes = bitmaps.live_bitmaps(client)
    for i, disk in enumerate(spec.disks):
        dev = f"vml-disk{i}"
        keep = plan.keep.get(disk.path)
        mine = [b for b in present.get(dev, []) if b.name.startswith(bitmaps.PREFIX)]
        good = next((b for b in mine if b.name == keep), None)
        if good is None or good.inconsistent or not good.recording:
            keep = None
        for b in mine:
            if b.name != keep:
                bitmaps.remove(client, dev, b.name)
        if keep is not None:
            continue
        records.pop(disk.path, None)
        if disk.path in plan.fresh and plan.entry is not None:
            name = bitmaps.new_name()
            persistent = disk.format == "qcow2"
            bitmaps.add(client, dev, name, persistent)
            path = area / disk.path
            size = bitmaps.virtual_size(path, disk.format)
            if size is not None:
                records[disk.path] = bitmaps.Record(
                    name, plan.entry, path.stat().st_ino, size, persistent
                )
    bitmaps.save_records(area, records)
