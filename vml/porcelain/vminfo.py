"""The VM as entries record it: crash-consistent saves, files saved from outside, notes.

An entry's ``vm`` metadata is ``VMInfo.to_json()`` plus two keys:

- ``crash_consistent``: true when the VM was saved running (``--force-running``);
- ``external_files``: ``[{"source": "/abs/path", "path": ".external/1/name"}]``,
  the files outside the area saved with ``--include-external`` and the
  area-relative name each is stored (and checked out) under.

Files from one source folder share one ``.external/<n>/`` folder and keep
their names, so descriptors that name each other relatively (a VMDK and its
``-flat`` extent) still find each other there.  Nothing inside the VM's own
files is rewritten: they still name the original paths (see ``docs/VMS.md``).
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vml.errors import AreaError, CorruptRepository
from vml.plumbing.vm.info import VMInfo
from vml.records import Record

EXTERNAL_DIR = ".external"
_MAX_EXTERNAL = 4096  # a chain longer than this is a loop or a mistake


@dataclass(frozen=True)
class ExternalFile(Record):
    """A file outside the area saved with an entry, and its name inside the entry."""

    source: str  # absolute path where it was read
    path: str  # area-relative name: .external/<n>/<basename>


@dataclass(frozen=True)
class LiveSave(Record):
    """How an entry saved while its VM ran was taken (``vm.live``).

    ``via`` says through what: ``vml run`` (VML's own QEMU, memory as a file),
    ``qmp`` (``vml commit --qmp``) or ``libvirt`` (a running libvirt domain).
    """

    pause_seconds: float
    state_file: str  # the <name>.vmstate the entry holds
    qemu: str
    machine: str
    accel: str
    saved: str
    steps: dict[str, float]
    copied_bytes: int
    via: str = "vml run"  # or "qmp" (--qmp), "libvirt" (a libvirt domain)
    resume_file: str | None = None  # qmp, libvirt: the <name>.resume.json the entry holds
    domain: str | None = None  # libvirt: the domain's name

    @classmethod
    def from_metadata(cls, live: object) -> LiveSave | None:
        """The record, or None when absent or malformed."""
        if not isinstance(live, dict):
            return None
        try:
            steps = live.get("steps", {})
            return cls(
                float(live["pause_seconds"]),
                str(live["state_file"]),
                str(live.get("qemu", "")),
                str(live.get("machine", "")),
                str(live.get("accel", "")),
                str(live.get("saved", "")),
                {str(k): float(v) for k, v in steps.items()} if isinstance(steps, dict) else {},
                int(live.get("copied_bytes", 0)),
                str(live.get("via", "vml run")),
                _opt_str(live.get("resume_file")),
                _opt_str(live.get("domain")),
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            return None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RunState(Record):
    """A VM running under ``vml run`` now (``vml status``)."""

    pid: int
    state: str  # QEMU's run state: running, paused, postmigrate, ...; busy while a save holds it


@dataclass(frozen=True)
class EntryVM(Record):
    """The VM as an entry recorded it (or as an area holds it now: ``vml status``).

    Its JSON form is the ``vm`` metadata of the entry: ``VMInfo``'s fields
    with ``crash_consistent``, ``external_files``, ``live`` (saved while it
    ran under ``vml run``) and ``vml_run`` (``vml status``: it runs so now).
    """

    info: VMInfo
    crash_consistent: bool = False
    external_files: tuple[ExternalFile, ...] = ()
    live: LiveSave | None = None
    vml_run: RunState | None = None

    json_flatten = ("info",)

    @property
    def known(self) -> bool:
        """True when the area holds a VM VML recognised (not an empty or unknown folder)."""
        return self.info.hypervisor != "none"

    @classmethod
    def from_metadata(cls, vm: object) -> EntryVM | None:
        """An entry's ``vm`` metadata, typed; None when it has none or it is malformed.

        Entries made before the crash-consistent flag and external files were
        recorded get their defaults (saved running: crash-consistent; none).
        A malformed description (``vml fsck`` names such entries) shows as no
        VM rather than breaking every listing that includes the entry.
        """
        if not isinstance(vm, dict):
            return None
        try:
            info = VMInfo.from_json(vm)
        except CorruptRepository:
            return None
        live = LiveSave.from_metadata(vm.get("live"))
        flag = vm.get("crash_consistent", info.power_state == "running" and live is None)
        return cls(info, flag is True, tuple(saved_externals(vm)), live)


def entry_vm(vm: VMInfo, externals: Iterable[ExternalFile] = ()) -> dict[str, object]:
    """The ``vm`` metadata stored with an entry."""
    doc = vm.to_json()
    doc["crash_consistent"] = vm.power_state == "running"
    doc["external_files"] = [{"source": e.source, "path": e.path} for e in externals]
    return doc


def saved_externals(vm: dict[str, object] | None) -> list[ExternalFile]:
    """The external files an entry's ``vm`` metadata lists (none for older entries)."""
    items = vm.get("external_files") if vm else None
    out: list[ExternalFile] = []
    if isinstance(items, list):
        for it in items:
            if isinstance(it, dict):
                src, path = it.get("source"), it.get("path")
                if isinstance(src, str) and isinstance(path, str):
                    out.append(ExternalFile(src, path))
    return out


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def external_sources(area: Path, vm: VMInfo) -> list[str]:
    """Every file outside ``area`` the VM needs, following their extents and backing files.

    ``check_saveable`` names the files the area's own disks and config point
    at; those may in turn be descriptors or overlays naming more files (a
    golden image's own base).  All of them are needed to rebuild the VM, so
    an entry that misses one cannot be restored: raise ``AreaError`` naming
    any that is not a readable regular file on this host (missing, a device,
    a Windows path or URL written in a descriptor).
    """
    # Only a save with --include-external reads disks here (`vml log` pays nothing).
    from vml.plumbing.vm.formats import read_disk

    root = os.path.realpath(area)
    todo = list(vm.external)
    found: list[str] = []
    seen: set[str] = set()
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.add(p)
        if len(seen) > _MAX_EXTERNAL:
            raise AreaError("the VM names too many files outside the area", "check its disks")
        try:
            st = os.stat(p) if os.path.isabs(p) else None
        except OSError:
            st = None
        if st is None or not stat_mod.S_ISREG(st.st_mode):
            raise AreaError(
                f"cannot save {p}, which the VM needs outside the area: "
                "it is not a readable regular file on this host",
                "copy it into the area and point the VM at the copy, or make it reachable here",
            )
        found.append(p)
        disk = read_disk(Path(p))
        if disk is None:
            continue
        folder = os.path.dirname(p)
        for ref in [*disk.extents, *([disk.backing] if disk.backing else [])]:
            if "://" in ref or ref.startswith("json:"):
                todo.append(ref)  # refused above, by name
                continue
            real = os.path.realpath(os.path.join(folder, ref))
            if not _inside(real, root):
                todo.append(real)
    return found


def plan_externals(
    sources: list[str],
    area_paths: Iterable[str],
    previous: list[ExternalFile],
    restored: set[str],
) -> tuple[list[ExternalFile], set[str]]:
    """Choose the name each external file is saved under.

    A source saved before (``previous``: the parent's and the area entry's
    lists) keeps its name, so the new entry stores only its changed blocks.
    Otherwise each source folder gets the first free ``.external/<n>/``.
    ``restored`` holds area files that are unchanged copies a checkout made
    of an external file: the source, read afresh, takes their place.  Any
    other area file under a folder is never overwritten: that folder moves
    to a fresh number.  Returns the plan and the area files it replaces.
    """
    area_set = set(area_paths)
    used = {
        parts[1]
        for parts in (p.split("/") for p in area_set)
        if len(parts) >= 3 and parts[0] == EXTERNAL_DIR
    }
    before = {e.source: e.path for e in reversed(previous)}  # the first listed wins
    groups: dict[str, list[str]] = {}
    for s in sources:
        groups.setdefault(os.path.dirname(s), []).append(s)
    plan: list[ExternalFile] = []
    replaced: set[str] = set()
    taken: set[str] = set()
    for folder in sorted(groups):
        members = sorted(groups[folder])
        names = {s: os.path.basename(s) for s in members}
        n: str | None = None
        for s in members:
            old = before.get(s)
            if old is not None and old.count("/") == 2 and old.split("/")[2] == names[s]:
                n = old.split("/")[1]
                break
        if n is not None:
            prefix = f"{EXTERNAL_DIR}/{n}/"
            mine = {prefix + names[s] for s in members}
            occupants = {p for p in area_set if p.startswith(prefix)}
            if n in taken or not occupants <= (mine & restored):
                n = None
            else:
                replaced |= occupants
        if n is None:
            k = 1
            while str(k) in used or str(k) in taken:
                k += 1
            n = str(k)
        taken.add(n)
        plan.extend(ExternalFile(s, f"{EXTERNAL_DIR}/{n}/{names[s]}") for s in members)
    return plan, replaced


def _how_to_point(vm: VMInfo, e: ExternalFile) -> str:
    """The command or edit that makes the VM use the saved copy instead of ``e.source``."""
    for d in vm.disks:
        if e.source not in d.external:
            continue
        rel = os.path.relpath(e.path, os.path.dirname(d.path) or ".")
        if d.backing == e.source and d.format == "qcow2":
            return f"run `qemu-img rebase -u -b {rel} -F FORMAT {d.path}` (no data is copied)"
        if d.format.startswith("vmdk"):
            return f'edit {d.path} to name "{rel}" instead'
        return f"point {d.path} at {rel}"
    if vm.config is not None:
        return f"edit {vm.config} to name {e.path} instead"
    return "edit the file that names it (see docs/VMS.md)"


def checkout_notes(vm: dict[str, object] | None, origin: str, area: Path, now: VMInfo) -> list[str]:
    """What the user must know to boot entry ``vm`` (saved from ``origin``) checked out in ``area``.

    ``now`` describes the area after the checkout: a file it needs outside
    the area that was not saved with the entry is a path written absolutely
    (often into the area it was saved from), which the copy must not share.
    """
    saved_vm = EntryVM.from_metadata(vm)
    if saved_vm is None:
        return []
    notes: list[str] = []
    if saved_vm.crash_consistent:
        notes.append(
            "this entry was saved while the VM was running (crash-consistent): "
            "the guest starts as after a power cut and may check its file systems"
        )
    saved = saved_vm.external_files
    for e in saved:
        there = "still there" if os.path.exists(e.source) else "missing on this host"
        notes.append(
            f"{e.path} is the saved copy of {e.source} ({there}); the VM still names "
            f"{e.source}: to use the copy, {_how_to_point(saved_vm.info, e)}"
        )
    saved_sources = {e.source for e in saved}
    unsaved = [p for p in now.external if p not in saved_sources]
    if unsaved:
        notes.append(
            "the VM here names files outside this folder that the entry does not hold: "
            + ", ".join(unsaved)
            + " (absolute paths, probably into the area it was saved from): point them into "
            + "this folder (qcow2: `qemu-img rebase -u -b NEW IMAGE`; VMDK: edit the descriptor; "
            + "libvirt: `virsh edit`)"
        )
    moved = os.path.realpath(area) != os.path.realpath(origin)
    hypervisor = saved_vm.info.hypervisor
    config = saved_vm.info.config
    if moved and hypervisor == "vmware":
        key = f" in {config}" if config is not None else ""
        notes.append(
            f"VMware will ask whether this VM was moved or copied (it was saved in {origin}): "
            f'answer "I Copied It" to run it next to the original; set uuid.action = "keep"'
            f"{key} to never be asked"
        )
    elif moved and hypervisor == "virtualbox":
        where = str(area / config) if config is not None else str(area)
        notes.append(
            "VirtualBox knows VMs and disks by UUID: unregister the original (or give this copy "
            "new UUIDs with `VBoxManage clonevm` or `VBoxManage internalcommands sethduuid`), "
            f"then `VBoxManage registervm {where}`"
        )
    live = saved_vm.live
    if live is not None and live.via in ("qmp", "libvirt"):
        how = (
            f"`vml run {area}` resumes it through libvirt as domain {live.domain} "
            "(which must not run elsewhere)"
            if live.via == "libvirt"
            else f"`vml run {area}` resumes it with the command line of the QEMU it was saved from"
        )
        notes.append(
            f"this entry holds the VM running (saved live through {live.via}): {how}; "
            f"{live.resume_file} says how to resume it by hand"
        )
    if config is not None and config.endswith(".qemu.json"):
        # VML's own description names files relative to the area: nothing to edit.
        if saved_vm.live is not None and saved_vm.live.via == "vml run":
            notes.append(
                f"this entry holds the VM running (saved live): `vml run {area}` resumes it "
                "where it was"
            )
    elif moved and hypervisor == "qemu" and config is not None:
        notes.append(
            f"libvirt names disks by absolute path: edit the <source file=...> paths in {config} "
            f"to point into {area}, then `virsh define` it (undefine a domain of the same name "
            "or UUID first)"
        )
    return notes
