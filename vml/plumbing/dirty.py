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
  recording and consistent (not left *in use* by a QEMU that died); for a
  raw disk at rest, its dirty ranges were kept before QEMU ended
  (``keep_at_stop``: by ``vml stop``, or by the keeper when the guest
  powered itself off), and they are intact and tied to the record;
- at rest, the disk's ``stat`` is the one QEMU left (nothing wrote it since).

A raw disk's ranges kept at one stop are *carried* into the next ``vml
run`` (a new bitmap starts; the next stop, or live save, adds the two).

This module decides; ``vm/bitmaps.py`` and ``vm/live.py`` talk to QEMU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vml.errors import QMPError, VMControlError
from vml.plumbing.areas import load_state, stat_signature
from vml.plumbing.cache import BlockRecords, Cache, CachedFile
from vml.plumbing.images import Changed
from vml.plumbing.vm import bitmaps
from vml.plumbing.vm.description import QemuDisk, QemuSpec
from vml.plumbing.vm.qcow2 import Unmappable, merge_ranges
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
        rec = records.get(disk.path)
        why = _distrust(area, disk, cf, rec, held)
        carried: list[tuple[int, int]] = []
        if why is None and rec is not None and rec.carried:
            try:
                carried = bitmaps.read_kept(area, rec, rec.carried)
            except bitmaps.KeptUnusable as e:
                why = str(e)
        if why is None and cf is not None and rec is not None:
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
                carried=carried,
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
        since: str | None
        if entry is not None:  # saved: the new bitmap starts from it, nothing carried
            since, carried = entry, None
        elif r.old is not None and old is not None:
            # Folded back after a failed save: the earlier runs' ranges still count.
            since, carried = old.since, old.carried
        else:
            continue
        if since is None:
            continue
        path = area / r.path
        size = bitmaps.virtual_size(path, fmt[r.path])
        if size is not None:
            records[r.path] = bitmaps.Record(
                r.new, since, path.stat().st_ino, size, r.persistent, carried=carried
            )
    bitmaps.save_records(area, records)


def at_rest(
    area: Path, spec: QemuSpec, cache: Cache | None, held: str | None, read: set[str]
) -> tuple[dict[str, Changed], list[str]]:
    """What changed in the disks ``read`` (their stat differs from the cache's) of a VM at rest.

    A qcow2 image keeps its bitmap at rest (what ``qemu-nbd -r -B`` reads);
    a raw disk has the ranges ``vml stop`` kept (``keep_at_stop``).
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
        if why is None and rec is not None and not rec.persistent and not rec.kept:
            why = (
                "QEMU keeps a raw disk's dirty bitmap only while it runs, and it ended "
                "without its dirty ranges kept (killed or crashed, or so was their keeper?)"
            )
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
    if not rec.persistent:  # a raw disk: the ranges kept when QEMU ended (guest = file offsets)
        try:
            ranges = bitmaps.read_kept(area, rec, rec.kept)
        except bitmaps.KeptUnusable as e:
            return str(e)
        _changed(path, cf, ranges, out, disk.path)
        return None
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
    _changed(path, cf, written + rest, out, disk.path)
    return None


def _changed(
    path: Path, cf: CachedFile, ranges: list[tuple[int, int]], out: dict[str, Changed], rel: str
) -> None:
    size = path.stat().st_size
    if size > cf.size:
        ranges.append((cf.size, size))  # the file grew
    out[rel] = Changed(sorted(ranges), partial=False)


# --- vml run -------------------------------------------------------------------


@dataclass(frozen=True)
class StartPlan:
    """Per disk, decided before QEMU opens it: the bitmap to keep, and whether to start one."""

    keep: dict[str, str]  # disk path -> a recorded bitmap still good to use
    fresh: set[str]  # disks unchanged since the area's entry (a new bitmap may start now)
    entry: str | None
    # Raw disks unchanged since QEMU closed them, whose kept dirty ranges
    # still count from the entry: disk path -> those ranges' file (carried on).
    carry: dict[str, str] = field(default_factory=dict)


def start_plan(area: Path, spec: QemuSpec) -> StartPlan:
    """What ``vml run`` can trust of each disk, from the cache and the records, before QEMU starts."""
    state = load_state(area)
    entry = state.entry if state is not None else None
    cache = Cache.peek(area)
    keep: dict[str, str] = {}
    fresh: set[str] = set()
    carry: dict[str, str] = {}
    if entry is None or not cache.valid_for(entry):
        return StartPlan(keep, fresh, None)
    records = bitmaps.load_records(area)
    closed = closed_stats(area, spec)  # before `prepare_run_dir` clears it
    for disk in spec.disks:
        cf = cache.files.get(disk.path)
        rec = records.get(disk.path)
        try:
            if rec is not None and _distrust(area, disk, cf, rec, entry) is None:
                if rec.persistent:
                    keep[disk.path] = rec.name
                elif _carries(area, disk, rec, closed):
                    carry[disk.path] = str(rec.kept)
            if cf is not None and cf.stat == stat_signature(os.stat(area / disk.path)):
                fresh.add(disk.path)
        except OSError:
            continue
    return StartPlan(keep, fresh, entry, carry)


def _carries(
    area: Path, disk: QemuDisk, rec: bitmaps.Record, closed: dict[str, list[int]] | None
) -> bool:
    """Whether a raw disk's kept ranges hold every write since ``rec.since`` (so a run adds on)."""
    if closed is None or closed.get(disk.path) != _signature(area, disk):
        return False
    try:  # also refuses a record that names no kept ranges
        bitmaps.read_kept(area, rec, rec.kept)
    except bitmaps.KeptUnusable:
        return False
    return True


def start_bitmaps(client: QMPClient, area: Path, spec: QemuSpec, plan: StartPlan) -> None:
    """With QEMU started (not yet running the guest): keep, start or drop each disk's bitmap.

    A kept bitmap must be there, recording and consistent; stale ``vml-``
    bitmaps (an earlier run's, or one left in use by a QEMU that died) are
    removed, so they do not pile up in qcow2 images.  A raw disk whose
    ranges the last stop kept (``plan.carry``) gets a new bitmap that
    carries them on.
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
        fresh = disk.path in plan.fresh
        carried = None if fresh else plan.carry.get(disk.path)
        if (fresh or carried) and plan.entry is not None:
            name = bitmaps.new_name()
            persistent = disk.format == "qcow2"
            bitmaps.add(client, dev, name, persistent)
            path = area / disk.path
            size = bitmaps.virtual_size(path, disk.format)
            if size is not None:
                records[disk.path] = bitmaps.Record(
                    name, plan.entry, path.stat().st_ino, size, persistent, carried=carried
                )
    bitmaps.save_records(area, records)


# --- vml stop ------------------------------------------------------------------


def keep_at_stop(client: QMPClient, area: Path, spec: QemuSpec) -> list[str]:
    """Keep each raw disk's dirty ranges before QEMU quits (the guest stopped: no more writes).

    Called through ``keeper.keep_and_quit``, under the area lock.

    QEMU holds a raw disk's bitmap only in memory: it is read here (an NBD
    export, ``bitmaps.dirty_live``), added to the ranges the run carried
    from an earlier stop, and kept in ``.vml/`` for the next save at rest
    (``at_rest``) or run.  A disk whose bitmap cannot be read keeps no
    ranges (a save reads it whole).  Returns what went wrong.
    """
    records = bitmaps.load_records(area)
    # Ranges this run kept already (`vml stop` and the keeper both end QEMU
    # this way: whoever comes second) are left as they are.
    if not any(_to_keep(records.get(d.path)) for d in spec.disks):
        # No raw disk's bitmap to keep (a qcow2 stores its own): QEMU is not asked.
        return []
    present, nodes = bitmaps.live_bitmaps(client)
    wanted: dict[str, tuple[str, str, str]] = {}  # disk path -> (device, node, bitmap)
    carried: dict[str, list[tuple[int, int]]] = {}
    notes: list[str] = []
    for i, disk in enumerate(spec.disks):
        rec = records.get(disk.path)
        if rec is None or not _to_keep(rec):
            continue
        dev = f"vml-disk{i}"
        records[disk.path] = replace(rec, kept=None, carried=None)  # until read below
        found = next((b for b in present.get(dev, []) if b.name == rec.name), None)
        try:
            # Not recording: a live save rotated it and did not settle (its
            # successor, unrecorded, holds the writes since).
            if found is None or found.inconsistent or not found.recording:
                raise bitmaps.KeptUnusable(f"QEMU has no recording dirty bitmap {rec.name}")
            if found.granularity != bitmaps.GRANULARITY:
                raise bitmaps.KeptUnusable(f"its dirty bitmap {rec.name} is not VML's")
            carried[disk.path] = bitmaps.read_kept(area, rec, rec.carried) if rec.carried else []
            # A read-only export takes only a disabled bitmap (the guest is stopped).
            client.execute("block-dirty-bitmap-disable", {"node": dev, "name": rec.name})
        except (bitmaps.KeptUnusable, QMPError) as e:
            notes.append(f"{disk.path}: its dirty ranges were not kept: {e}")
            continue
        wanted[disk.path] = (dev, nodes.get(dev, dev), rec.name)
    try:
        dirty = bitmaps.dirty_live(client, list(wanted.values()))
    except (QMPError, VMControlError) as e:
        notes.append(f"the raw disks' dirty ranges were not kept ({e.message})")
        dirty = {}
    for path, (dev, _node, _name) in wanted.items():
        rec = records[path]
        if dev not in dirty:
            continue
        try:
            kept = bitmaps.write_kept(area, rec, merge_ranges(carried[path] + dirty[dev]))
        except OSError as e:
            notes.append(f"{path}: its dirty ranges were not kept ({e.strerror})")
            continue
        records[path] = replace(rec, kept=kept)
    bitmaps.save_records(area, records)
    return notes


def _to_keep(rec: bitmaps.Record | None) -> bool:
    """Whether ``rec`` is a raw disk's bitmap whose ranges are still to be kept.

    A record names kept ranges only once a keep of this run wrote them all
    (a run starts every record afresh: ``start_bitmaps``).
    """
    return rec is not None and not rec.persistent and rec.since is not None and rec.kept is None
